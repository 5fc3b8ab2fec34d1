"""The VirtualMachineInstance type and the status vocabulary its admission and controllers share.

Admission writes a VMI's first status (Pending, not ready) and the controllers every later one;
both go through ``enter_phase`` and ``set_condition`` so that phase timestamps and condition
transition times follow one rule.
"""

from __future__ import annotations

from labvirt.sim.store import Obj, ResourceType, rfc3339

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
DEFAULT_GRACE_PERIOD_SECONDS = 30
READY_FALSE_REASONS = {
    "PodNotExists": "virt-launcher pod has not yet been scheduled",
    "PodTerminating": "virt-launcher pod is terminating",
    "GuestNotRunning": "Guest VM is not reported as running",
    "PodConditionMissing": "virt-launcher pod is missing the Ready condition",
}


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


def ready_false(status: Obj, reason: str, now: float) -> None:
    """Ready=False with KubeVirt's message for ``reason``."""
    set_condition(status, "Ready", "False", now, reason=reason, message=READY_FALSE_REASONS[reason])


def enter_phase(status: Obj, phase: str, now: float) -> None:
    """Move to ``phase``, recording when, as KubeVirt keeps every transition."""
    status["phase"] = phase
    status.setdefault("phaseTransitionTimestamps", []).append(
        {"phase": phase, "phaseTransitionTimestamp": rfc3339(now)}
    )


def child_object(parent: Obj, key: str) -> Obj:
    """``parent[key]`` as a dict, created when absent or null."""
    value = parent.get(key)
    if not isinstance(value, dict):
        value = parent[key] = {}
    return value
