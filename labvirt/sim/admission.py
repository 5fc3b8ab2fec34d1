"""Admission of VirtualMachineInstances: the API server's schema check and KubeVirt's webhooks.

On create, the mutating webhook fills in KubeVirt's defaults before the validating one judges
the result, as in a real API server; on update, the spec is frozen and the status stays the
controllers'. Why an object is refused is ``validation``'s business.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from labvirt.sim.errors import invalid
from labvirt.sim.quantity import to_bytes
from labvirt.sim.store import Obj, clone
from labvirt.sim.validation import (
    Cause,
    denied,
    schema_causes,
    schema_validator,
    structure_causes,
    webhook_causes,
)
from labvirt.sim.vmi import (
    DEFAULT_GRACE_PERIOD_SECONDS,
    FINALIZER,
    VMI,
    child_object,
    enter_phase,
    ready_false,
)

RUNTIME_USER_NONROOT = 107
CREATE_VALIDATOR = "virtualmachineinstances-create-validator.kubevirt.io"
UPDATE_VALIDATOR = "virtualmachineinstances-update-validator.kubevirt.io"
UPDATE_RESTRICTED_MESSAGE = "update of VMI object is restricted"


class VmiAdmission:
    """The schema check and KubeVirt's webhooks for VirtualMachineInstances."""

    def __init__(self, clock: Callable[[], float], schema_path: Path | None = None) -> None:
        self._clock = clock
        self._schema_path = schema_path
        if schema_path is not None:
            schema_validator(str(schema_path))  # fail at start-up, not on the first create

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
        annotations = child_object(meta, "annotations")
        annotations.setdefault("kubevirt.io/latest-observed-api-version", VMI.version)
        annotations.setdefault("kubevirt.io/storage-observed-api-version", VMI.version)
        now = self._clock()
        status: Obj = {"guestOSInfo": {}, "runtimeUser": RUNTIME_USER_NONROOT}
        enter_phase(status, "Pending", now)
        ready_false(status, "PodNotExists", now)
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
        return schema_causes(self._schema_path, obj)


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


def _default_resources(spec: Obj) -> None:
    """The rest of the mutating webhook: machine, CPU, memory requests, pull policies."""
    domain = spec["domain"]
    spec.setdefault("architecture", "amd64")
    child_object(domain, "machine").setdefault("type", "q35")
    cpu = child_object(domain, "cpu")
    for key in ("cores", "sockets", "threads"):
        cpu.setdefault(key, 1)
    cpu.setdefault("model", "host-model")
    resources = child_object(domain, "resources")
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
        child_object(domain, "memory")["guest"] = requested_memory
    for volume in spec.get("volumes") or []:
        disk = volume.get("containerDisk")
        if isinstance(disk, dict) and "imagePullPolicy" not in disk:
            image = str(disk.get("image", ""))
            latest = image.endswith(":latest") or not any(c in image for c in ":@")
            disk["imagePullPolicy"] = "Always" if latest else "IfNotPresent"
