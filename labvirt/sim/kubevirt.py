"""KubeVirt's part of the simulator: VirtualMachineInstance admission and lifecycle.

``VmiAdmission`` plays the API server's schema check and KubeVirt's mutating and validating
webhooks. ``KubeVirt`` plays virt-controller, virt-handler and the kube-scheduler: it listens to
the store and, through a ``Scheduler`` (never a sleep), moves each VMI through
Pending -> Scheduling -> Scheduled -> Running, and through graceful deletion. Boot times are drawn
from a seeded distribution so that runs repeat; ``time_scale`` shrinks every duration for tests.
"""

from __future__ import annotations

import functools
import json
import math
import random
import re
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema

from labvirt.sim.clock import Scheduler
from labvirt.sim.errors import ApiError, invalid, not_found
from labvirt.sim.nodes import Cluster, Placement, PodRequest
from labvirt.sim.quantity import QUANTITY_PATTERN, QuantityError, to_bytes, to_millicores
from labvirt.sim.store import Obj, ResourceType, Store, clone, rfc3339

VMI = ResourceType(
    group="kubevirt.io",
    version="v1",
    plural="virtualmachineinstances",
    singular="virtualmachineinstance",
    kind="VirtualMachineInstance",
    namespaced=True,
    short_names=("vmi", "vmis"),
    categories=("all",),
    custom=True,
)

FINALIZER = "kubevirt.io/foregroundDeleteVirtualMachine"
NODE_NAME_LABEL = "kubevirt.io/nodeName"
DEFAULT_GRACE_PERIOD_SECONDS = 30
RUNTIME_USER_NONROOT = 107
LAUNCHER_IMAGE = "quay.io/kubevirt/virt-launcher:v1.9.0"
CREATE_VALIDATOR = "virtualmachineinstances-create-validator.kubevirt.io"
UPDATE_VALIDATOR = "virtualmachineinstances-update-validator.kubevirt.io"
NO_MEMORY_MESSAGE = (
    "no memory requested, at least one of 'spec.domain.memory.guest', "
    "'spec.domain.memory.hugepages.pageSize' or 'spec.domain.resources.requests.memory' "
    "must be set"
)
UPDATE_RESTRICTED_MESSAGE = "update of VMI object is restricted"
READY_FALSE_REASONS = {
    "PodNotExists": "virt-launcher pod has not yet been scheduled",
    "PodTerminating": "virt-launcher pod is terminating",
    "GuestNotRunning": "Guest VM is not reported as running",
    "PodConditionMissing": "virt-launcher pod is missing the Ready condition",
}
FINAL_PHASES = frozenset({"Succeeded", "Failed"})

EMULATION_SLOWDOWN = 4.0  # software emulation (no nested virtualisation) boots this much slower
BOOT_SPREAD_SIGMA = 0.25  # lognormal sigma of boot times around their median
BOOT_FACTOR_RANGE = (0.6, 2.0)  # truncation of the lognormal factor
# How a boot splits: virt-controller creates the launcher pod, the pod pulls the container
# disk and starts (-> Scheduled), virt-handler starts the domain (-> Running).
POD_CREATE_SHARE, POD_START_SHARE, DOMAIN_START_SHARE = 0.04, 0.66, 0.30
GUEST_SERVICES_SHARE = 0.75  # guest services (sshd, agent) answer this long after the domain
LAUNCHER_MEMORY_OVERHEAD = 180 * 2**20  # virt-launcher, libvirt and QEMU beside the guest RAM
MEMORY_OVERHEAD_PER_VCPU = 8 * 2**20
CPU_ALLOCATION_RATIO = 10  # KubeVirt requests 1000m / ratio per vCPU when the VMI sets none
DEFAULT_PROBE_PERIOD_SECONDS = 10
SYNC_FAILED_REASON = "Synchronizing with the Domain failed."
SYNC_FAILED_MESSAGE = (
    'server error. command SyncVMI failed: "LibvirtError(Code=1, Domain=10, '
    "Message='internal error: qemu unexpectedly closed the monitor: "
    "qemu-kvm: failed to initialize kvm: Cannot allocate memory')\""
)
BRIDGE_NOT_MIGRATABLE = (
    "cannot migrate VMI which does not use masquerade, bridge with "
    "kubevirt.io/allow-pod-bridge-network-live-migration VM annotation or a migratable plugin "
    "to connect to the pod network"
)

Cause = dict[str, str]


@dataclass(frozen=True)
class SimulationConfig:
    boot_seconds: float = 8.0  # median creation -> Running
    emulation: bool = False  # software emulation: boots EMULATION_SLOWDOWN times slower
    nodes: int = 3
    node_cpu: int = 16
    node_memory: str = "64Gi"
    boot_failure_rate: float = 0.0
    seed: int | None = None
    time_scale: float = 1.0  # multiplies every simulated duration (tests use e.g. 0.01)
    vmi_schema_path: Path | None = None  # vmi-schema-strict.json: validate every create
    max_grace_seconds: float = 30.0

    def __post_init__(self) -> None:
        problems = []
        if self.boot_seconds <= 0:
            problems.append(f"boot_seconds must be positive, got {self.boot_seconds}")
        if self.nodes < 1:
            problems.append(f"nodes must be at least 1, got {self.nodes}")
        if self.node_cpu < 1:
            problems.append(f"node_cpu must be at least 1, got {self.node_cpu}")
        try:
            if to_bytes(self.node_memory) <= 0:
                problems.append(f"node_memory must be positive, got {self.node_memory!r}")
        except QuantityError:
            problems.append(f"node_memory is not a quantity: {self.node_memory!r}")
        if not 0.0 <= self.boot_failure_rate <= 1.0:
            problems.append(
                f"boot_failure_rate must be within [0, 1], got {self.boot_failure_rate}"
            )
        if self.time_scale <= 0:
            problems.append(f"time_scale must be positive, got {self.time_scale}")
        if self.max_grace_seconds < 0:
            problems.append(f"max_grace_seconds must not be negative, got {self.max_grace_seconds}")
        if problems:
            raise ValueError("invalid simulation config: " + "; ".join(problems))


# -- admission ---------------------------------------------------------------------------------


_JSON_TYPES: tuple[tuple[type, str], ...] = (
    (bool, "boolean"),  # before int: a bool is an int to Python, not to JSON
    (int, "integer"),
    (float, "number"),
    (str, "string"),
    (list, "array"),
    (dict, "object"),
)


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    return next((name for kind, name in _JSON_TYPES if isinstance(value, kind)), "object")


def _path(parts: Iterable[str | int]) -> str:
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text


def _required(field_path: str) -> Cause:
    return {"type": "FieldValueRequired", "message": "Required value", "field": field_path}


def _wrong_type(field_path: str, expected: str, value: object) -> Cause:
    actual = _json_type(value)
    return {
        "type": "FieldValueTypeInvalid",
        "message": f'Invalid value: "{actual}": {field_path} in body must be of type '
        f'{expected}: "{actual}"',
        "field": field_path,
    }


def _bad_quantity(field_path: str, value: object) -> Cause:
    return {
        "type": "FieldValueInvalid",
        "message": f"Invalid value: {json.dumps(value)}: {field_path} in body should match "
        f"'{QUANTITY_PATTERN}'",
        "field": field_path,
    }


@functools.lru_cache(maxsize=4)
def _schema_validator(path: str) -> jsonschema.Draft4Validator:
    """Loaded once per path: building the validator for 178 definitions is not free."""
    schema = json.loads(Path(path).read_text(encoding="utf-8"))
    return jsonschema.Draft4Validator(schema)


def _schema_causes(error: jsonschema.ValidationError) -> list[Cause]:
    """An API-server style cause for one JSON-schema error."""
    where = _path(error.absolute_path)
    instance = error.instance
    expected: Any = error.validator_value
    schema: Any = error.schema if isinstance(error.schema, dict) else {}
    if error.validator == "required" and isinstance(instance, dict):
        return [
            _required(_path([*error.absolute_path, name]))
            for name in expected
            if name not in instance
        ]
    if error.validator == "additionalProperties" and isinstance(instance, dict):
        known = schema.get("properties", {})
        patterns = schema.get("patternProperties", {})
        unknown = [
            key
            for key in instance
            if key not in known and not any(re.search(p, key) for p in patterns)
        ]
        return [
            {
                "type": "FieldValueInvalid",
                "message": f'unknown field "{_path([*error.absolute_path, key])}"',
                "field": _path([*error.absolute_path, key]),
            }
            for key in unknown
        ]
    if error.validator == "type":
        if isinstance(expected, list):
            expected = "/".join(expected)
        return [_wrong_type(where, str(expected), instance)]
    if error.validator == "enum":
        supported = ", ".join(json.dumps(v) for v in expected)
        return [
            {
                "type": "FieldValueNotSupported",
                "message": f"Unsupported value: {json.dumps(instance)}: "
                f"supported values: {supported}",
                "field": where,
            }
        ]
    if error.validator == "anyOf" and any(e.validator == "pattern" for e in error.context or ()):
        return [_bad_quantity(where, instance)]
    return [
        {
            "type": "FieldValueInvalid",
            "message": f"Invalid value: {json.dumps(instance)[:200]}: {error.message[:300]}",
            "field": where,
        }
    ]


class _Structure:
    """Hand-written checks of the fields the simulator reads, for when no schema is loaded."""

    def __init__(self) -> None:
        self.causes: list[Cause] = []

    def object(self, parent: Obj, key: str, where: str, *, required: bool = False) -> Obj | None:
        if key not in parent or (parent[key] is None and not required):
            if required:
                self.causes.append(_required(where))
            return None
        value = parent[key]
        if not isinstance(value, dict):
            self.causes.append(_wrong_type(where, "object", value))
            return None
        return value

    def named_list(self, parent: Obj, key: str, where: str) -> None:
        value = parent.get(key)
        if value is None:
            return
        if not isinstance(value, list):
            self.causes.append(_wrong_type(where, "array", value))
            return
        for index, item in enumerate(value):
            item_path = f"{where}[{index}]"
            if not isinstance(item, dict):
                self.causes.append(_wrong_type(item_path, "object", item))
            elif "name" not in item:
                self.causes.append(_required(f"{item_path}.name"))
            elif not isinstance(item["name"], str):
                self.causes.append(_wrong_type(f"{item_path}.name", "string", item["name"]))

    def scalar(self, parent: Obj, key: str, where: str, expected: str) -> None:
        if key not in parent or parent[key] is None:
            return
        value = parent[key]
        actual = _json_type(value)
        if actual != expected and not (expected == "number" and actual == "integer"):
            self.causes.append(_wrong_type(where, expected, value))

    def quantities(self, parent: Obj | None, where: str, *keys: str) -> None:
        for key in keys:
            if parent is None or key not in parent or parent[key] is None:
                continue
            try:
                to_bytes(parent[key])
            except QuantityError:
                self.causes.append(_bad_quantity(f"{where}.{key}", parent[key]))


def structure_causes(obj: Obj) -> list[Cause]:
    """Required objects and the types of the fields the controllers rely on."""
    check = _Structure()
    spec = check.object(obj, "spec", "spec", required=True)
    if spec is None:
        return check.causes
    domain = check.object(spec, "domain", "spec.domain", required=True)
    if domain is not None:
        devices = check.object(domain, "devices", "spec.domain.devices", required=True)
        if devices is not None:
            check.named_list(devices, "disks", "spec.domain.devices.disks")
            check.named_list(devices, "interfaces", "spec.domain.devices.interfaces")
            check.scalar(
                devices,
                "autoattachPodInterface",
                "spec.domain.devices.autoattachPodInterface",
                "boolean",
            )
        resources = check.object(domain, "resources", "spec.domain.resources")
        if resources is not None:
            for part in ("requests", "limits"):
                where = f"spec.domain.resources.{part}"
                check.quantities(check.object(resources, part, where), where, "memory", "cpu")
        memory = check.object(domain, "memory", "spec.domain.memory")
        check.quantities(memory, "spec.domain.memory", "guest")
        if memory is not None:
            check.object(memory, "hugepages", "spec.domain.memory.hugepages")
        cpu = check.object(domain, "cpu", "spec.domain.cpu")
        if cpu is not None:
            for key in ("cores", "sockets", "threads"):
                check.scalar(cpu, key, f"spec.domain.cpu.{key}", "integer")
            check.scalar(
                cpu, "dedicatedCpuPlacement", "spec.domain.cpu.dedicatedCpuPlacement", "boolean"
            )
    check.named_list(spec, "volumes", "spec.volumes")
    check.named_list(spec, "networks", "spec.networks")
    check.scalar(
        spec, "terminationGracePeriodSeconds", "spec.terminationGracePeriodSeconds", "integer"
    )
    for key in ("hostname", "subdomain"):
        check.scalar(spec, key, f"spec.{key}", "string")
    probe = check.object(spec, "readinessProbe", "spec.readinessProbe")
    if probe is not None:
        for key in ("initialDelaySeconds", "periodSeconds", "successThreshold", "timeoutSeconds"):
            check.scalar(probe, key, f"spec.readinessProbe.{key}", "integer")
    return check.causes


def _names(items: list[Obj]) -> list[str]:
    return [str(item.get("name", "")) for item in items]


def webhook_causes(spec: Obj) -> list[Cause]:
    """KubeVirt's create validator, in its order, for the rules the simulator enforces."""
    devices = spec["domain"]["devices"]
    causes = _network_causes(
        _names(spec.get("networks") or []), _names(devices.get("interfaces") or [])
    )
    causes.extend(_storage_causes(spec))
    if not _requests_memory(spec["domain"]):
        causes.append(
            {
                "type": "FieldValueRequired",
                "message": NO_MEMORY_MESSAGE,
                "field": "spec.domain.resources.requests.memory",
            }
        )
    return causes


def _network_causes(networks: list[str], interfaces: list[str]) -> list[Cause]:
    """pkg/network/admitter: unique names, and networks and interfaces paired by name."""
    causes: list[Cause] = []
    seen: set[str] = set()
    for index, name in enumerate(networks):
        if name in seen:
            causes.append(
                {
                    "type": "FieldValueDuplicate",
                    "message": f'Network with name "{name}" already exists, every network must '
                    "have a unique name",
                    "field": f"spec.networks[{index}].name",
                }
            )
        seen.add(name)
    for index, name in enumerate(networks):
        if name not in interfaces:
            causes.append(
                {
                    "type": "FieldValueRequired",
                    "message": f"spec.networks[{index}].name '{name}' not found.",
                    "field": f"spec.networks[{index}].name",
                }
            )
    seen = set()
    for index, name in enumerate(interfaces):
        if name in seen:
            causes.append(
                {
                    "type": "FieldValueDuplicate",
                    "message": "Only one interface can be connected to one specific network",
                    "field": f"spec.domain.devices.interfaces[{index}].name",
                }
            )
        seen.add(name)
    for index, name in enumerate(interfaces):
        if name not in networks:
            where = f"spec.domain.devices.interfaces[{index}].name"
            causes.append(
                {
                    "type": "FieldValueInvalid",
                    "message": f"{where} '{name}' not found.",
                    "field": where,
                }
            )
    return causes


def _storage_causes(spec: Obj) -> list[Cause]:
    """Disks and volumes: unique names, and every disk backed by a volume and vice versa."""
    devices = spec["domain"]["devices"]
    disks = _names(devices.get("disks") or [])
    filesystems = _names(devices.get("filesystems") or [])
    volume_items = spec.get("volumes") or []
    volumes = _names(volume_items)
    causes: list[Cause] = []
    for index, name in enumerate(disks):
        if name not in volumes:
            where = f"spec.domain.devices.disks[{index}].name"
            causes.append(
                {
                    "type": "FieldValueInvalid",
                    "message": f"{where} '{name}' does not have a matching Volume.",
                    "field": where,
                }
            )
    causes.extend(_duplicates(disks, "spec.domain.devices.disks"))
    causes.extend(_duplicates(volumes, "spec.volumes"))
    for index, name in enumerate(volumes):
        used = name in disks or name in filesystems or "memoryDump" in volume_items[index]
        if not used:
            # Upstream names the field "spec.domain.volumes" here; so do we.
            where = f"spec.domain.volumes[{index}].name"
            causes.append(
                {
                    "type": "FieldValueInvalid",
                    "message": f"{where} '{name}' not found.",
                    "field": where,
                }
            )
    return causes


def _duplicates(names: list[str], where: str) -> list[Cause]:
    causes = []
    first: dict[str, int] = {}
    for index, name in enumerate(names):
        if name in first:
            causes.append(
                {
                    "type": "FieldValueInvalid",
                    "message": f"{where}[{index}] and {where}[{first[name]}] must not have the "
                    "same Name.",
                    "field": f"{where}[{index}].name",
                }
            )
        else:
            first[name] = index
    return causes


def _requests_memory(domain: Obj) -> bool:
    requested = ((domain.get("resources") or {}).get("requests") or {}).get("memory")
    if requested is not None and to_bytes(requested) != 0:
        return True
    memory = domain.get("memory") or {}
    return memory.get("guest") is not None or memory.get("hugepages") is not None


def denied(webhook: str, causes: list[Cause]) -> str:
    """The API server's message for a validating webhook's refusal."""
    reasons = ", ".join(c["message"] for c in causes)
    return f'admission webhook "{webhook}" denied the request: {reasons}'


def set_condition(
    status: Obj,
    condition_type: str,
    value: str,
    now: float,
    *,
    reason: str | None = None,
    message: str | None = None,
) -> None:
    """Upsert a condition; ``lastTransitionTime`` moves only when the status flips."""
    conditions: list[Obj] = status.setdefault("conditions", [])
    existing = next((c for c in conditions if c.get("type") == condition_type), None)
    condition: Obj = {"type": condition_type, "status": value, "lastProbeTime": None}
    if existing is not None and existing.get("status") == value:
        condition["lastTransitionTime"] = existing.get("lastTransitionTime") or rfc3339(now)
    else:
        condition["lastTransitionTime"] = rfc3339(now)
    if reason:
        condition["reason"] = reason
    if message:
        condition["message"] = message
    if existing is None:
        conditions.append(condition)
    else:
        conditions[conditions.index(existing)] = condition


def _ready_false(status: Obj, reason: str, now: float) -> None:
    set_condition(status, "Ready", "False", now, reason=reason, message=READY_FALSE_REASONS[reason])


def enter_phase(status: Obj, phase: str, now: float) -> None:
    status["phase"] = phase
    status.setdefault("phaseTransitionTimestamps", []).append(
        {"phase": phase, "phaseTransitionTimestamp": rfc3339(now)}
    )


class VmiAdmission:
    """The schema check and KubeVirt's webhooks for VirtualMachineInstances."""

    def __init__(self, clock: Callable[[], float], schema_path: Path | None = None) -> None:
        self._clock = clock
        self._schema_path = schema_path
        if schema_path is not None:
            _schema_validator(str(schema_path))  # fail at start-up, not on the first create

    def on_create(self, obj: Obj) -> None:
        name = obj.get("metadata", {}).get("name")
        causes = self._schema_violations(obj) or structure_causes(obj)
        if causes:
            raise invalid(VMI.kind, VMI.group, name, causes)
        # The mutating webhook runs before the validating one, as in the API server.
        spec = obj["spec"]
        _default_spec(spec)
        _default_resources(spec)
        causes = webhook_causes(spec)
        if causes:
            message = denied(CREATE_VALIDATOR, causes)
            raise invalid(VMI.kind, VMI.group, name, causes, message=message)
        meta = obj["metadata"]
        finalizers = list(meta.get("finalizers") or [])
        if FINALIZER not in finalizers:
            meta["finalizers"] = [*finalizers, FINALIZER]
        annotations = _child(meta, "annotations")
        annotations.setdefault("kubevirt.io/latest-observed-api-version", VMI.version)
        annotations.setdefault("kubevirt.io/storage-observed-api-version", VMI.version)
        now = self._clock()
        status: Obj = {"guestOSInfo": {}, "runtimeUser": RUNTIME_USER_NONROOT}
        enter_phase(status, "Pending", now)
        _ready_false(status, "PodNotExists", now)
        obj["status"] = status

    def on_update(self, old: Obj, new: Obj) -> None:
        if new.get("spec") != old.get("spec"):
            causes = [
                {
                    "type": "FieldValueNotSupported",
                    "message": UPDATE_RESTRICTED_MESSAGE,
                    "field": "spec",
                }
            ]
            raise invalid(
                VMI.kind,
                VMI.group,
                old["metadata"]["name"],
                causes,
                message=denied(UPDATE_VALIDATOR, causes),
            )
        # Without a status subresource a PUT carries status; it belongs to KubeVirt's
        # controllers, so a user's copy (possibly stale) never replaces it.
        if "status" in old:
            new["status"] = clone(old["status"])
        else:
            new.pop("status", None)

    def _schema_violations(self, obj: Obj) -> list[Cause]:
        if self._schema_path is None:
            return []
        validator = _schema_validator(str(self._schema_path))
        causes: list[Cause] = []
        for error in validator.iter_errors(obj):
            for cause in _schema_causes(error):
                if cause not in causes:
                    causes.append(cause)
        return sorted(causes, key=lambda c: c.get("field", ""))


def _default_spec(spec: Obj) -> None:
    """The mutating webhook's grace period and pod network."""
    spec.setdefault("terminationGracePeriodSeconds", DEFAULT_GRACE_PERIOD_SECONDS)
    devices = spec["domain"]["devices"]
    if (
        not spec.get("networks")
        and not devices.get("interfaces")
        and devices.get("autoattachPodInterface") is not False
    ):
        spec["networks"] = [{"name": "default", "pod": {}}]
        devices["interfaces"] = [{"name": "default", "bridge": {}}]


def _child(parent: Obj, key: str) -> Obj:
    """``parent[key]`` as a dict, created when absent or null."""
    value = parent.get(key)
    if not isinstance(value, dict):
        value = parent[key] = {}
    return value


def _default_resources(spec: Obj) -> None:
    """The rest of the mutating webhook: machine, CPU, memory requests, pull policies."""
    domain = spec["domain"]
    spec.setdefault("architecture", "amd64")
    _child(domain, "machine").setdefault("type", "q35")
    cpu = _child(domain, "cpu")
    for key in ("cores", "sockets", "threads"):
        cpu.setdefault(key, 1)
    cpu.setdefault("model", "host-model")
    resources = _child(domain, "resources")
    requests = resources.get("requests") or {}
    limits = resources.get("limits") or {}
    defaults = {k: limits[k] for k in ("cpu", "memory") if k not in requests and k in limits}
    guest = (domain.get("memory") or {}).get("guest")
    if "memory" not in requests and "memory" not in defaults and guest is not None:
        defaults["memory"] = guest
    if defaults:
        resources["requests"] = {**requests, **defaults}
    requested_memory = resources.get("requests", {}).get("memory")
    if guest is None and requested_memory is not None and to_bytes(requested_memory) > 0:
        _child(domain, "memory")["guest"] = requested_memory
    for volume in spec.get("volumes") or []:
        disk = volume.get("containerDisk")
        if isinstance(disk, dict) and "imagePullPolicy" not in disk:
            image = str(disk.get("image", ""))
            latest = image.endswith(":latest") or not any(c in image for c in ":@")
            disk["imagePullPolicy"] = "Always" if latest else "IfNotPresent"


# -- scheduling requests -----------------------------------------------------------------------


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
    requests = resources.get("requests") or {}
    limits = resources.get("limits") or {}
    count = vcpus(spec)
    if (domain.get("cpu") or {}).get("dedicatedCpuPlacement"):
        cpu = count * 1000
    elif requests.get("cpu") is not None:
        cpu = to_millicores(requests["cpu"])
    elif limits.get("cpu") is not None:
        cpu = to_millicores(limits["cpu"])
    else:
        cpu = count * 1000 // CPU_ALLOCATION_RATIO
    memory_request = requests.get("memory") or limits.get("memory")
    guest = to_bytes(memory_request) if memory_request is not None else guest_memory_bytes(spec)
    overhead = LAUNCHER_MEMORY_OVERHEAD + MEMORY_OVERHEAD_PER_VCPU * count + math.ceil(guest / 512)
    return PodRequest(cpu_millicores=cpu, memory_bytes=guest + overhead)


# -- the controllers ---------------------------------------------------------------------------


@dataclass
class _Tracked:
    """What the controllers know of one VMI (by uid) beyond its stored object."""

    uid: str
    namespace: str
    name: str
    request: PodRequest
    pod_create: float  # seconds, already scaled
    pod_start: float
    domain_start: float
    guest_services: float
    shutdown: float
    finalize: float
    fails: bool
    pod_uid: str
    mac_suffix: bytes
    phase: str = "Pending"
    placement: Placement | None = None
    deleting: bool = False
    overrun: bool = False  # the grace period ends before the guest would stop


class KubeVirt:
    """virt-controller, virt-handler and the scheduler, driven by store events and timers."""

    def __init__(self, store: Store, scheduler: Scheduler, config: SimulationConfig) -> None:
        self._store = store
        self._scheduler = scheduler
        self._config = config
        self._rng = random.Random(config.seed)
        self.boot_failure_rate = config.boot_failure_rate
        self._cluster = Cluster(
            nodes=config.nodes,
            cpu_millicores=config.node_cpu * 1000,
            memory_bytes=to_bytes(config.node_memory),
        )
        self._tracked: dict[str, _Tracked] = {}
        self._waiting: list[str] = []  # uids of launcher pods that fit nowhere, oldest first
        self.admission = VmiAdmission(scheduler.now, config.vmi_schema_path)
        store.register(VMI, self.admission)
        store.add_listener(self._on_event)

    # -- public -------------------------------------------------------------------------------

    def crash(self, namespace: str, name: str) -> Obj:
        """Kill the guest of a Running VMI: it fails and its pod goes away."""
        current = self._store.peek(VMI, namespace, name)
        if current is None:
            raise not_found(VMI.plural, VMI.group, name)
        phase = (current.get("status") or {}).get("phase", "")
        if phase != "Running":
            raise ApiError(
                409,
                "Conflict",
                f'Operation cannot be fulfilled on {VMI.plural}.{VMI.group} "{name}": '
                f"the VMI is not running (phase {phase or 'unset'})",
                details={"name": name, "group": VMI.group, "kind": VMI.plural},
            )
        uid = current["metadata"]["uid"]
        tracked = self._tracked.get(uid)

        def fail(obj: Obj, now: float) -> None:
            status = obj.setdefault("status", {})
            enter_phase(status, "Failed", now)
            _ready_false(status, "PodTerminating", now)

        updated = self._write_uid(uid, namespace, name, fail)
        if tracked is not None:
            tracked.phase = "Failed"
            self._release(tracked)
        return clone(updated if updated is not None else current)

    def node_usage(self) -> list[dict[str, Any]]:
        """Per node: name, podCIDR, capacity and allocated (cpu, memory, pods)."""
        return self._cluster.usage()

    @property
    def waiting_for_capacity(self) -> int:
        """VMIs whose launcher pod fits on no node right now."""
        return len(self._waiting)

    # -- events ---------------------------------------------------------------------------------

    def _on_event(self, event_type: str, resource: ResourceType, obj: Obj, _: Obj | None) -> None:
        if resource != VMI:
            return
        meta = obj.get("metadata", {})
        uid = meta.get("uid", "")
        if event_type == "ADDED":
            self._track(obj)
        elif event_type == "MODIFIED":
            tracked = self._tracked.get(uid)
            if tracked is not None and meta.get("deletionTimestamp") and not tracked.deleting:
                self._begin_deletion(tracked, obj)
        elif event_type == "DELETED":
            self._forget(uid)

    def _track(self, obj: Obj) -> None:
        meta = obj["metadata"]
        spec = obj["spec"]
        scale = self._config.time_scale
        slowdown = EMULATION_SLOWDOWN if self._config.emulation else 1.0
        # Every VMI draws the same numbers in the same order, whatever the failure rate, so a
        # seed always yields the same timings.
        boot = self._config.boot_seconds * self._spread(BOOT_SPREAD_SIGMA) * slowdown * scale
        guest = (
            self._config.boot_seconds * GUEST_SERVICES_SHARE * self._spread(0.3) * slowdown * scale
        )
        fails_draw = self._rng.random()
        shutdown = self._rng.uniform(0.3, 0.6) * scale
        finalize = self._rng.uniform(0.1, 0.25) * scale
        pod_uid = str(uuid.UUID(int=self._rng.getrandbits(128), version=4))
        mac_suffix = bytes(self._rng.getrandbits(8) for _ in range(3))
        tracked = _Tracked(
            uid=meta["uid"],
            namespace=meta.get("namespace", ""),
            name=meta["name"],
            request=launcher_pod_request(spec),
            pod_create=boot * POD_CREATE_SHARE,
            pod_start=boot * POD_START_SHARE,
            domain_start=boot * DOMAIN_START_SHARE,
            guest_services=guest,
            shutdown=shutdown,
            finalize=finalize,
            fails=fails_draw < self.boot_failure_rate,
            pod_uid=pod_uid,
            mac_suffix=mac_suffix,
        )
        self._tracked[tracked.uid] = tracked
        self._after(tracked.pod_create, tracked, self._create_pod)

    def _spread(self, sigma: float) -> float:
        low, high = BOOT_FACTOR_RANGE
        for _ in range(20):
            factor = self._rng.lognormvariate(0.0, sigma)
            if low <= factor <= high:
                return factor
        return 1.0

    # -- lifecycle steps ------------------------------------------------------------------------

    def _create_pod(self, tracked: _Tracked) -> None:
        """virt-controller created the launcher pod; the scheduler binds it or cannot."""
        if tracked.deleting or tracked.phase != "Pending":
            return
        tracked.phase = "Scheduling"
        placement = self._cluster.place(tracked.uid, tracked.request)
        tracked.placement = placement
        message = None if placement else self._cluster.unschedulable_message(tracked.request)

        def scheduling(obj: Obj, now: float) -> None:
            status = obj.setdefault("status", {})
            enter_phase(status, "Scheduling", now)
            _ready_false(status, "GuestNotRunning", now)
            if placement is not None:
                _bound(status, tracked, placement, now)
            else:
                set_condition(
                    status, "PodScheduled", "False", now, reason="Unschedulable", message=message
                )

        if self._write(tracked, scheduling) is None:
            self._cluster.release(tracked.uid)
            return
        if placement is not None:
            self._after(tracked.pod_start, tracked, self._pod_ready)
        else:
            self._waiting.append(tracked.uid)

    def _pod_ready(self, tracked: _Tracked) -> None:
        """The launcher pod runs: the VMI has a node and an address."""
        placement = tracked.placement
        if tracked.deleting or tracked.phase != "Scheduling" or placement is None:
            return
        tracked.phase = "Scheduled"

        def scheduled(obj: Obj, now: float) -> None:
            _child(obj["metadata"], "labels")[NODE_NAME_LABEL] = placement.node
            status = obj.setdefault("status", {})
            enter_phase(status, "Scheduled", now)
            status["nodeName"] = placement.node
            status["interfaces"] = _interfaces(obj["spec"], placement.ip, tracked.mac_suffix)
            status["launcherContainerImageVersion"] = LAUNCHER_IMAGE
            status["qosClass"] = "Burstable"
            status["selinuxContext"] = "none"

        stored = self._write(tracked, scheduled)
        if stored is None:
            return
        self._after(tracked.domain_start, tracked, self._domain_up)
        probe = stored["spec"].get("readinessProbe")
        if probe and not tracked.fails:
            self._after(self._probe_delay(tracked, probe), tracked, self._probe_passed)

    def _probe_delay(self, tracked: _Tracked, probe: Obj) -> float:
        """When the first passing probe lands, counted from the pod's start like the kubelet."""
        scale = self._config.time_scale
        initial = max(0, int(probe.get("initialDelaySeconds") or 0)) * scale
        period = max(1, int(probe.get("periodSeconds") or DEFAULT_PROBE_PERIOD_SECONDS)) * scale
        needed = max(1, int(probe.get("successThreshold") or 1))
        up = tracked.domain_start + tracked.guest_services
        first = max(0, math.ceil((up - initial) / period - 1e-9))
        return initial + (first + needed - 1) * period

    def _domain_up(self, tracked: _Tracked) -> None:
        """virt-handler started the domain, or the domain failed to start."""
        if tracked.deleting or tracked.phase != "Scheduled":
            return
        if tracked.fails:
            tracked.phase = "Failed"

            def failed(obj: Obj, now: float) -> None:
                status = obj.setdefault("status", {})
                enter_phase(status, "Failed", now)
                _ready_false(status, "PodTerminating", now)
                set_condition(
                    status,
                    "Synchronized",
                    "False",
                    now,
                    reason=SYNC_FAILED_REASON,
                    message=SYNC_FAILED_MESSAGE,
                )

            self._write(tracked, failed)
            self._release(tracked)
            return
        tracked.phase = "Running"

        def running(obj: Obj, now: float) -> None:
            spec = obj["spec"]
            status = obj.setdefault("status", {})
            enter_phase(status, "Running", now)
            if spec.get("readinessProbe"):
                set_condition(
                    status,
                    "Ready",
                    "False",
                    now,
                    reason="ContainersNotReady",
                    message="containers with unready status: [compute]",
                )
            else:
                set_condition(status, "Ready", "True", now)
            _live_migratable(status, spec, now)
            cpu = spec["domain"].get("cpu") or {}
            status["currentCPUTopology"] = {
                key: int(cpu.get(key) or 1) for key in ("cores", "sockets", "threads")
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

        self._write(tracked, running)

    def _probe_passed(self, tracked: _Tracked) -> None:
        if tracked.deleting or tracked.phase != "Running":
            return

        def ready(obj: Obj, now: float) -> None:
            set_condition(obj.setdefault("status", {}), "Ready", "True", now)

        self._write(tracked, ready)

    # -- deletion -------------------------------------------------------------------------------

    def _begin_deletion(self, tracked: _Tracked, obj: Obj) -> None:
        tracked.deleting = True
        if tracked.uid in self._waiting:
            self._waiting.remove(tracked.uid)
        if tracked.placement is None or tracked.phase in FINAL_PHASES:
            # No pod (never bound, or already gone): nothing to shut down.
            self._cluster.release(tracked.uid)
            self._after(tracked.finalize, tracked, self._remove_finalizer, when_deleting=True)
            return
        grace = obj["metadata"].get("deletionGracePeriodSeconds") or 0
        if grace <= 0:
            grace = obj["spec"].get("terminationGracePeriodSeconds", DEFAULT_GRACE_PERIOD_SECONDS)
        grace = min(float(grace), self._config.max_grace_seconds) * self._config.time_scale
        tracked.overrun = 0 < grace < tracked.shutdown
        stop_after = grace if tracked.overrun else tracked.shutdown

        def terminating(obj: Obj, now: float) -> None:
            _ready_false(obj.setdefault("status", {}), "PodTerminating", now)

        self._after(
            min(0.02 * self._config.time_scale, stop_after),
            tracked,
            lambda t: self._write(t, terminating),
            when_deleting=True,
        )
        self._after(stop_after, tracked, self._guest_stopped, when_deleting=True)

    def _guest_stopped(self, tracked: _Tracked) -> None:
        """The guest shut down (or was killed when the grace period ran out)."""
        if tracked.phase not in FINAL_PHASES:
            final = "Succeeded"
            if tracked.phase != "Running" or tracked.overrun:
                final = "Failed"  # never booted, or would not stop in time
            tracked.phase = final

            def stopped(obj: Obj, now: float) -> None:
                status = obj.setdefault("status", {})
                enter_phase(status, final, now)
                _ready_false(status, "PodTerminating", now)

            if self._write(tracked, stopped) is None:
                return
        self._release(tracked)
        self._after(tracked.finalize, tracked, self._remove_finalizer, when_deleting=True)

    def _remove_finalizer(self, tracked: _Tracked) -> None:
        def unfinalize(obj: Obj, _: float) -> None:
            finalizers = obj["metadata"].get("finalizers") or []
            obj["metadata"]["finalizers"] = [f for f in finalizers if f != FINALIZER]

        self._write(tracked, unfinalize)

    def _forget(self, uid: str) -> None:
        tracked = self._tracked.pop(uid, None)
        if tracked is None:
            return
        tracked.deleting = True
        if uid in self._waiting:
            self._waiting.remove(uid)
        self._release(tracked)

    # -- capacity -------------------------------------------------------------------------------

    def _release(self, tracked: _Tracked) -> None:
        if self._cluster.release(tracked.uid):
            self._place_waiting()

    def _place_waiting(self) -> None:
        """Retry unschedulable launcher pods, oldest first, now that room may have freed."""
        for uid in list(self._waiting):
            tracked = self._tracked.get(uid)
            if tracked is None or tracked.deleting or tracked.phase != "Scheduling":
                self._waiting.remove(uid)
                continue
            placement = self._cluster.place(uid, tracked.request)
            if placement is None:
                message = self._cluster.unschedulable_message(tracked.request)

                def still_unschedulable(obj: Obj, now: float, message: str = message) -> None:
                    set_condition(
                        obj.setdefault("status", {}),
                        "PodScheduled",
                        "False",
                        now,
                        reason="Unschedulable",
                        message=message,
                    )

                self._write(tracked, still_unschedulable)
                continue
            self._waiting.remove(uid)
            tracked.placement = placement

            def bound(
                obj: Obj, now: float, t: _Tracked = tracked, p: Placement = placement
            ) -> None:
                _bound(obj.setdefault("status", {}), t, p, now)

            if self._write(tracked, bound) is None:
                self._cluster.release(uid)
                continue
            self._after(tracked.pod_start, tracked, self._pod_ready)

    # -- plumbing -------------------------------------------------------------------------------

    def _after(
        self,
        delay: float,
        tracked: _Tracked,
        step: Callable[[_Tracked], object],
        *,
        when_deleting: bool = False,
    ) -> None:
        """Run ``step`` later if this very VMI (same uid) is still known then."""
        uid = tracked.uid

        def fire() -> None:
            current = self._tracked.get(uid)
            if current is None or (current.deleting and not when_deleting):
                return
            step(current)

        self._scheduler.call_at(self._scheduler.now() + max(0.0, delay), fire)

    def _write(self, tracked: _Tracked, change: Callable[[Obj, float], None]) -> Obj | None:
        return self._write_uid(tracked.uid, tracked.namespace, tracked.name, change)

    def _write_uid(
        self, uid: str, namespace: str, name: str, change: Callable[[Obj, float], None]
    ) -> Obj | None:
        """A controller write to the object with this uid; None once it is gone or replaced."""
        now = self._scheduler.now()

        def mutate(obj: Obj) -> None:
            if obj["metadata"].get("uid") == uid:
                change(obj, now)

        stored = self._store.controller_update(VMI, namespace, name, mutate)
        if stored is None or stored["metadata"].get("uid") != uid:
            return None
        return stored


def _bound(status: Obj, tracked: _Tracked, placement: Placement, now: float) -> None:
    set_condition(status, "PodScheduled", "True", now)
    status["activePods"] = {tracked.pod_uid: placement.node}


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


def _live_migratable(status: Obj, spec: Obj, now: float) -> None:
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
