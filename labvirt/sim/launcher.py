"""The virt-launcher pod a VMI runs in: what it asks of the scheduler and what it reports.

virt-controller renders the pod's resource request from the VMI's spec (guest memory plus the
launcher's overhead, CPU by KubeVirt's allocation ratio); once the pod runs, its network gives
the VMI's interfaces their addresses and decides whether the VMI could live-migrate.
"""

from __future__ import annotations

import math

from labvirt.sim.nodes import Placement, PodRequest
from labvirt.sim.quantity import to_bytes, to_millicores
from labvirt.sim.store import Obj
from labvirt.sim.vmi import set_condition

LAUNCHER_IMAGE = "quay.io/kubevirt/virt-launcher:v1.9.0"
LAUNCHER_MEMORY_OVERHEAD = 180 * 2**20  # virt-launcher, libvirt and QEMU beside the guest RAM
MEMORY_OVERHEAD_PER_VCPU = 8 * 2**20
CPU_ALLOCATION_RATIO = 10  # KubeVirt requests 1000m / ratio per vCPU when the VMI sets none
BRIDGE_NOT_MIGRATABLE = (
    "cannot migrate VMI which does not use masquerade, bridge with "
    "kubevirt.io/allow-pod-bridge-network-live-migration VM annotation or a migratable plugin "
    "to connect to the pod network"
)


def vcpus(spec: Obj) -> int:
    cpu = spec["domain"].get("cpu") or {}
    count = 1
    for key in ("cores", "sockets", "threads"):
        count *= int(cpu.get(key) or 1)
    return max(1, count)


def guest_memory_bytes(spec: Obj) -> int:
    domain = spec["domain"]
    guest = (domain.get("memory") or {}).get("guest")
    if guest is None:
        guest = ((domain.get("resources") or {}).get("requests") or {}).get("memory")
    return to_bytes(guest) if guest is not None else 0


def launcher_pod_request(spec: Obj) -> PodRequest:
    """What the virt-launcher pod asks the scheduler for, as virt-controller renders it."""
    domain = spec["domain"]
    resources = domain.get("resources") or {}
    asked = resources.get("requests") or {}
    limits = resources.get("limits") or {}
    count = vcpus(spec)
    if (domain.get("cpu") or {}).get("dedicatedCpuPlacement"):
        cpu = count * 1000
    elif asked.get("cpu") is not None:
        cpu = to_millicores(asked["cpu"])
    elif limits.get("cpu") is not None:
        cpu = to_millicores(limits["cpu"])
    else:
        cpu = count * 1000 // CPU_ALLOCATION_RATIO
    memory_request = asked.get("memory") or limits.get("memory")
    guest = to_bytes(memory_request) if memory_request is not None else guest_memory_bytes(spec)
    overhead = LAUNCHER_MEMORY_OVERHEAD + MEMORY_OVERHEAD_PER_VCPU * count + math.ceil(guest / 512)
    return PodRequest(cpu_millicores=cpu, memory_bytes=guest + overhead)


def pod_status(spec: Obj, placement: Placement, mac_suffix: bytes) -> Obj:
    """What the VMI's status learns once its launcher pod runs on a node."""
    return {
        "nodeName": placement.node,
        "interfaces": _interfaces(spec, placement.ip, mac_suffix),
        "launcherContainerImageVersion": LAUNCHER_IMAGE,
        "qosClass": "Burstable",
        "selinuxContext": "none",
    }


def _interfaces(spec: Obj, ip: str, mac_suffix: bytes) -> list[Obj]:
    """``status.interfaces``: the pod-network interface carries the pod's address."""
    pod_networks = {n.get("name") for n in spec.get("networks") or [] if "pod" in n}
    result = []
    for index, iface in enumerate(spec["domain"]["devices"].get("interfaces") or []):
        mac = iface.get("macAddress") or "52:54:00:" + ":".join(
            f"{(b + index) % 256:02x}" for b in mac_suffix
        )
        entry: Obj = {"name": iface["name"], "mac": mac, "queueCount": 1}
        if iface["name"] in pod_networks:
            entry.update(
                {
                    "infoSource": "domain, guest-agent",
                    "interfaceName": f"eth{index}",
                    "ipAddress": ip,
                    "ipAddresses": [ip],
                    "podInterfaceName": "eth0",
                }
            )
        else:
            entry["infoSource"] = "domain"
        result.append(entry)
    return result


def domain_status(spec: Obj) -> Obj:
    """What virt-handler reports of a running domain: CPU topology, memory, migration."""
    cpu = spec["domain"].get("cpu") or {}
    status: Obj = {
        "currentCPUTopology": {
            key: int(cpu.get(key) or 1) for key in ("cores", "sockets", "threads")
        }
    }
    guest = (spec["domain"].get("memory") or {}).get("guest")
    if guest is not None:
        status["memory"] = {
            "guestAtBoot": guest,
            "guestCurrent": guest,
            "guestRequested": guest,
        }
    status["migrationMethod"] = "BlockMigration"
    status["migrationTransport"] = "Unix"
    return status


def set_live_migratable(status: Obj, spec: Obj, now: float) -> None:
    """A pod network bound by bridge keeps the VMI from migrating, as KubeVirt reports."""
    pod_networks = {n.get("name") for n in spec.get("networks") or [] if "pod" in n}
    bridged = any(
        "bridge" in iface and iface.get("name") in pod_networks
        for iface in spec["domain"]["devices"].get("interfaces") or []
    )
    if bridged:
        set_condition(
            status,
            "LiveMigratable",
            "False",
            now,
            reason="InterfaceNotLiveMigratable",
            message=BRIDGE_NOT_MIGRATABLE,
        )
    else:
        set_condition(status, "LiveMigratable", "True", now)
