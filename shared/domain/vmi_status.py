"""Reading a VMI's status the way labvirt needs it: ready for a learner, failed, or booting.

Pure functions over the VMI as the API returns it (a dict), shared by the provisioner, which
waits for environments, and the reconciler, which checks them later.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Final

from shared.domain.manifests import VM_LABEL
from shared.domain.sessions import VmView
from shared.domain.templates import Template

FINAL_VMI_PHASES: Final = frozenset({"Succeeded", "Failed"})


def is_ready(vmi: Mapping[str, Any]) -> bool:
    """Running, Ready condition True, and not being deleted (KubeVirt's own rule)."""
    status = vmi.get("status") or {}
    if status.get("phase") != "Running" or vmi["metadata"].get("deletionTimestamp"):
        return False
    return any(
        c.get("type") == "Ready" and c.get("status") == "True"
        for c in status.get("conditions") or []
    )


def failure_of(vmi: Mapping[str, Any]) -> str | None:
    """Why this VMI can no longer serve, or None while it can (or still may)."""
    status = vmi.get("status") or {}
    phase = status.get("phase")
    if phase in FINAL_VMI_PHASES:
        return f"VM {vmi['metadata']['name']} reached phase {phase}"
    if vmi["metadata"].get("deletionTimestamp"):
        return f"VM {vmi['metadata']['name']} is being deleted"
    return None


def vm_views(template: Template, vmis: Iterable[Mapping[str, Any]]) -> list[VmView]:
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
