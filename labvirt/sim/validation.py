"""Why the API server or KubeVirt refuses a VirtualMachineInstance, as field causes.

Three sources, each answering with the causes a real cluster would give: the strict JSON schema
(when one is loaded), hand-written structure checks of the fields the controllers read (when
none is), and the rules of KubeVirt's create validator (networks, storage, memory).
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import jsonschema

from labvirt.sim.quantity import QUANTITY_PATTERN, QuantityError, to_bytes
from labvirt.sim.store import Obj

NO_MEMORY_MESSAGE = (
    "no memory requested, at least one of 'spec.domain.memory.guest', "
    "'spec.domain.memory.hugepages.pageSize' or 'spec.domain.resources.requests.memory' "
    "must be set"
)

Cause = dict[str, str]

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
def schema_validator(path: str) -> jsonschema.Draft4Validator:
    """Loaded once per path: building the validator for 178 definitions is not free."""
    schema = json.loads(Path(path).read_text(encoding="utf-8"))
    return jsonschema.Draft4Validator(schema)


def _error_causes(error: jsonschema.ValidationError) -> list[Cause]:
    """API-server style causes for one JSON-schema error."""
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


def schema_causes(schema_path: Path, obj: Obj) -> list[Cause]:
    """Every schema violation of ``obj`` as causes, each once, sorted by field."""
    validator = schema_validator(str(schema_path))
    causes: list[Cause] = []
    for error in validator.iter_errors(obj):
        for cause in _error_causes(error):
            if cause not in causes:
                causes.append(cause)
    return sorted(causes, key=lambda c: c.get("field", ""))


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
