"""Reading a VMI's status the way labvirt needs it: ready for a learner, failed, or booting.

Pure functions over the VMI as the API returns it (a dict), shared by the provisioner, which
waits for environments, and the reconciler, which checks them later.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Final

from shared.domain.manifests import SESSION_LABEL, VM_LABEL
from shared.domain.reasons import Failure
from shared.domain.sessions import VmView
from shared.domain.templates import Template
from shared.domain.vmi import Vmi, condition

FINAL_VMI_PHASES: Final = frozenset({"Succeeded", "Failed"})


def is_ready(vmi: Vmi | Mapping[str, Any]) -> bool:
    """Running, Ready condition True, and not being deleted (KubeVirt's own rule)."""
    status = vmi.get("status") or {}
    if status.get("phase") != "Running" or (vmi.get("metadata") or {}).get("deletionTimestamp"):
        return False
    ready = condition(vmi, "Ready")
    return ready is not None and ready.get("status") == "True"


def is_unschedulable(vmi: Vmi | Mapping[str, Any]) -> bool:
    """The VMI's launcher pod fits on no node (``PodScheduled=False``, ``Unschedulable``)."""
    scheduled = condition(vmi, "PodScheduled")
    return (
        scheduled is not None
        and scheduled.get("status") == "False"
        and scheduled.get("reason") == "Unschedulable"
    )


def failure_of(vmi: Vmi | Mapping[str, Any]) -> str | None:
    """Why this VMI can no longer serve, or None while it can (or still may)."""
    status = vmi.get("status") or {}
    phase = status.get("phase")
    if phase in FINAL_VMI_PHASES:
        return f"VM {vmi['metadata']['name']} reached phase {phase}"
    if vmi["metadata"].get("deletionTimestamp"):
        return f"VM {vmi['metadata']['name']} is being deleted"
    return None


def vm_views(template: Template, vmis: Iterable[Vmi | Mapping[str, Any]]) -> list[VmView]:
    """One view per VM of the template, filled from its VMI when there is one."""
    by_vm = {vmi["metadata"].get("labels", {}).get(VM_LABEL): vmi for vmi in vmis}
    views = []
    for vm in template.vms:
        vmi = by_vm.get(vm.name)
        if vmi is None:
            views.append(VmView(name=vm.name, hostname=vm.hostname))
            continue
        status = vmi.get("status") or {}
        interfaces = status.get("interfaces") or []
        views.append(
            VmView(
                name=vm.name,
                hostname=vmi.get("spec", {}).get("hostname", vm.hostname),
                ip=interfaces[0].get("ipAddress") if interfaces else None,
                phase=status.get("phase") or "Pending",
                ready=is_ready(vmi),
            )
        )
    return views


def warm_environment_problem(
    session_id: str, expected: set[str], vmis: Mapping[str, Vmi | Mapping[str, Any]]
) -> Failure | None:
    """Why a claimed warm environment cannot serve ``session_id``, or None when it can."""
    missing = sorted(expected - vmis.keys())
    if missing:
        return Failure.warm_environment_lost(
            f"warm environment lost its VMs ({', '.join(missing)})"
        )
    for name in sorted(expected):
        vmi = vmis[name]
        reason = failure_of(vmi)
        if reason is not None:
            return Failure.warm_environment_lost(f"warm environment failed: {reason}")
        holder = ((vmi.get("metadata") or {}).get("labels") or {}).get(SESSION_LABEL)
        if holder not in (None, session_id):
            # Claims are exactly-once in Redis; this would mean the cluster disagrees.
            return Failure.warm_environment_lost(f"VM {name} already belongs to session {holder}")
    return None
