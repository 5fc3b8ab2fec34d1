"""The parts of a KubeVirt VirtualMachineInstance that labvirt reads, as typed shapes.

The API returns VMIs as JSON objects; these ``TypedDict``s name the fields labvirt relies on
(KubeVirt v1: metadata, ``status.phase``, ``status.conditions``, ``status.interfaces``,
``spec.hostname``), so a typo in a key is a type error, not a silent ``None``. Everything else a
VMI carries is there at run time and simply not described.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypedDict


class VmiMetadata(TypedDict, total=False):
    name: str
    namespace: str
    uid: str
    resourceVersion: str
    creationTimestamp: str
    deletionTimestamp: str
    labels: dict[str, str]
    annotations: dict[str, str]


class VmiCondition(TypedDict, total=False):
    type: str  # Ready, PodScheduled, ...
    status: str  # "True", "False", "Unknown"
    reason: str
    message: str
    lastTransitionTime: str


class VmiInterface(TypedDict, total=False):
    name: str
    ipAddress: str
    ipAddresses: list[str]
    mac: str


class VmiStatus(TypedDict, total=False):
    phase: str  # Pending, Scheduling, Scheduled, Running, Succeeded, Failed
    nodeName: str
    conditions: list[VmiCondition]
    interfaces: list[VmiInterface]


class VmiSpec(TypedDict, total=False):
    hostname: str
    subdomain: str


class Vmi(TypedDict, total=False):
    apiVersion: str
    kind: str
    metadata: VmiMetadata
    spec: VmiSpec
    status: VmiStatus


def as_vmi(obj: Mapping[str, Any]) -> Vmi:
    """A VMI as the API returned it (a JSON object), seen through labvirt's typed shape."""
    return obj  # type: ignore[return-value]


def vmi_name(vmi: Vmi | Mapping[str, Any]) -> str:
    return str((vmi.get("metadata") or {}).get("name", ""))


def vmi_labels(vmi: Vmi | Mapping[str, Any]) -> dict[str, str]:
    return dict((vmi.get("metadata") or {}).get("labels") or {})


def vmi_annotations(vmi: Vmi | Mapping[str, Any]) -> dict[str, str]:
    return dict((vmi.get("metadata") or {}).get("annotations") or {})


def condition(vmi: Vmi | Mapping[str, Any], kind: str) -> VmiCondition | None:
    """The VMI's condition of type ``kind``, if it has one."""
    for cond in (vmi.get("status") or {}).get("conditions") or []:
        if cond.get("type") == kind:
            found: VmiCondition = cond
            return found
    return None
