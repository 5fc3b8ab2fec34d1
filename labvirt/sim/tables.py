"""Server-side printing: ``meta.k8s.io/v1`` Table responses, as ``kubectl get`` asks for them.

Custom resources print their ``additionalPrinterColumns`` (for VMIs, the KubeVirt v1.9.0 ones:
Age, Phase, IP, NodeName, Ready, and the wide-only Live-Migratable and Paused); built-in types
print the columns of the API server's printers that matter here; anything else prints Name and
Age. Cells are computed from the stored objects, which are never mutated.
"""

from __future__ import annotations

import calendar
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from labvirt.sim.errors import bad_request
from labvirt.sim.store import Obj, ResourceType

TABLE_API_VERSION = "meta.k8s.io/v1"
INCLUDE_OBJECT = ("None", "Metadata", "Object")

_NAME_DESCRIPTION = (
    "Name must be unique within a namespace. Is required when creating resources, although some "
    "resources may allow a client to request the generation of an appropriate name "
    "automatically. Name is primarily intended for creation idempotence and configuration "
    "definition. Cannot be updated. More info: "
    "https://kubernetes.io/docs/concepts/overview/working-with-objects/names#names"
)
_AGE_DESCRIPTION = (
    "CreationTimestamp is a timestamp representing the server time when this object was "
    "created. It is not guaranteed to be set in happens-before order across separate "
    "operations. Clients may not set this value. It is represented in RFC3339 form and is in "
    "UTC."
)

Cell = Callable[[Obj, float], Any]


@dataclass(frozen=True)
class Column:
    name: str
    cell: Cell
    type: str = "string"
    format: str = ""
    description: str = ""
    priority: int = 0

    def definition(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "type": self.type,
            "format": self.format,
            "description": self.description,
            "priority": self.priority,
        }


# -- JSONPath, the subset printer columns use ---------------------------------------------------

_STEP = re.compile(
    r"\.(?P<field>[A-Za-z0-9_\-]+)"
    r"|\[(?P<index>\d+)\]"
    r"|\[\?\(@\.(?P<filter>[A-Za-z0-9_.\-]+)\s*==\s*['\"](?P<value>[^'\"]*)['\"]\)\]"
    r"|\[\*\]"
)


def jsonpath(expression: str) -> Callable[[Any], list[Any]]:
    """Compile ``.a.b[0].c`` / ``.a[?(@.type=='Ready')].status`` / ``.a[*].b``."""
    steps: list[tuple[str, str, str]] = []
    pos = 0
    while pos < len(expression):
        match = _STEP.match(expression, pos)
        if not match:
            raise ValueError(f"unsupported JSONPath {expression!r} at {pos}")
        if match.group("field") is not None:
            steps.append(("field", match.group("field"), ""))
        elif match.group("index") is not None:
            steps.append(("index", match.group("index"), ""))
        elif match.group("filter") is not None:
            steps.append(("filter", match.group("filter"), match.group("value")))
        else:
            steps.append(("all", "", ""))
        pos = match.end()

    def evaluate(root: Any) -> list[Any]:
        values = [root]
        for kind, arg, value in steps:
            found: list[Any] = []
            for node in values:
                if kind == "field" and isinstance(node, dict) and arg in node:
                    found.append(node[arg])
                elif kind == "index" and isinstance(node, list) and int(arg) < len(node):
                    found.append(node[int(arg)])
                elif kind == "all" and isinstance(node, list):
                    found.extend(node)
                elif kind == "filter" and isinstance(node, list):
                    found.extend(item for item in node if str(_dig(item, arg)) == value)
            values = found
        return values

    return evaluate


def _dig(node: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(node, dict):
            return None
        node = node.get(part)
    return node


# -- cells --------------------------------------------------------------------------------------


def human_duration(seconds: float) -> str:
    """``k8s.io/apimachinery/pkg/util/duration.HumanDuration``: 45s, 3m20s, 2h5m, 3d4h."""
    whole = int(seconds)
    if whole < -1:
        return "<invalid>"
    if whole < 0:
        return "0s"
    if whole < 120:
        return f"{whole}s"
    minutes = whole // 60
    if minutes < 10:
        rest = whole % 60
        return f"{minutes}m{rest}s" if rest else f"{minutes}m"
    if minutes < 180:
        return f"{minutes}m"
    hours = whole // 3600
    if hours < 8:
        rest = minutes % 60
        return f"{hours}h{rest}m" if rest else f"{hours}h"
    if hours < 48:
        return f"{hours}h"
    if hours < 24 * 8:
        rest = hours % 24
        return f"{hours // 24}d{rest}h" if rest else f"{hours // 24}d"
    if hours < 24 * 365 * 2:
        return f"{hours // 24}d"
    if hours < 24 * 365 * 8:
        rest = (hours // 24) % 365
        return f"{hours // 24 // 365}y{rest}d" if rest else f"{hours // 24 // 365}y"
    return f"{hours // 24 // 365}y"


def parse_timestamp(value: Any) -> float | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        stamp = value.replace("Z", "").split(".")[0]
        return float(calendar.timegm(time.strptime(stamp, "%Y-%m-%dT%H:%M:%S")))
    except ValueError:
        return None


def _age_since(value: Any, now: float) -> str | None:
    stamp = parse_timestamp(value)
    return None if stamp is None else human_duration(now - stamp)


def _name(obj: Obj, _now: float) -> Any:
    return obj.get("metadata", {}).get("name", "")


def _age(obj: Obj, now: float) -> str:
    return _age_since(obj.get("metadata", {}).get("creationTimestamp"), now) or "<unknown>"


NAME = Column("Name", _name, format="name", description=_NAME_DESCRIPTION)
AGE = Column("Age", _age, type="date", description=_AGE_DESCRIPTION)


def printer_column(name: str, path: str, *, type_: str = "string", priority: int = 0) -> Column:
    """A CRD ``additionalPrinterColumns`` entry: first JSONPath result, or no value."""
    evaluate = jsonpath(path)

    def cell(obj: Obj, now: float) -> Any:
        found = evaluate(obj)
        if not found or found[0] is None:
            return None
        if type_ == "date":
            return _age_since(found[0], now)
        return found[0]

    return Column(name, cell, type=type_, priority=priority)


# kubevirt-constants.json "printerColumns" (KubeVirt v1.9.0).
VMI_COLUMNS = (
    NAME,
    printer_column("Age", ".metadata.creationTimestamp", type_="date"),
    printer_column("Phase", ".status.phase"),
    printer_column("IP", ".status.interfaces[0].ipAddress"),
    printer_column("NodeName", ".status.nodeName"),
    printer_column("Ready", ".status.conditions[?(@.type=='Ready')].status"),
    printer_column(
        "Live-Migratable", ".status.conditions[?(@.type=='LiveMigratable')].status", priority=1
    ),
    printer_column("Paused", ".status.conditions[?(@.type=='Paused')].status", priority=1),
)


def _service_ports(obj: Obj, _now: float) -> str:
    ports = obj.get("spec", {}).get("ports") or []
    rendered = []
    for port in ports:
        text = f"{port.get('port')}"
        if port.get("nodePort"):
            text += f":{port['nodePort']}"
        rendered.append(f"{text}/{port.get('protocol', 'TCP')}")
    return ",".join(rendered) or "<none>"


def _external_ips(obj: Obj, _now: float) -> str:
    spec = obj.get("spec", {})
    ips = list(spec.get("externalIPs") or [])
    for ingress in obj.get("status", {}).get("loadBalancer", {}).get("ingress") or []:
        ips.append(ingress.get("ip") or ingress.get("hostname") or "")
    if ips:
        return ",".join(ips)
    return "<pending>" if spec.get("type") == "LoadBalancer" else "<none>"


def format_label_selector(selector: dict[str, Any] | None) -> str:
    """``metav1.FormatLabelSelector``: ``a=b,c in (d)``; empty selects everything."""
    if not selector:
        return "<none>"
    parts = [f"{k}={v}" for k, v in sorted((selector.get("matchLabels") or {}).items())]
    for expr in selector.get("matchExpressions") or []:
        operator = str(expr.get("operator", "")).lower()
        values = ",".join(expr.get("values") or [])
        if operator in ("in", "notin"):
            parts.append(f"{expr.get('key')} {operator} ({values})")
        elif operator == "exists":
            parts.append(str(expr.get("key")))
        else:
            parts.append(f"!{expr.get('key')}")
    return ",".join(parts) or "<none>"


def _selector_map(selector: dict[str, Any] | None) -> str:
    if not selector:
        return "<none>"
    return ",".join(f"{k}={v}" for k, v in sorted(selector.items()))


def _event_last_seen(obj: Obj, now: float) -> str:
    for key in ("lastTimestamp", "eventTime", "firstTimestamp"):
        seen = _age_since(obj.get(key), now)
        if seen is not None:
            return seen
    return _age(obj, now)


def _event_object(obj: Obj, _now: float) -> str:
    involved = obj.get("involvedObject") or {}
    return f"{str(involved.get('kind', '')).lower()}/{involved.get('name', '')}"


def _node_status(obj: Obj, _now: float) -> str:
    for condition in obj.get("status", {}).get("conditions") or []:
        if condition.get("type") == "Ready":
            return "Ready" if condition.get("status") == "True" else "NotReady"
    return "Unknown"


def _node_roles(obj: Obj, _now: float) -> str:
    prefix = "node-role.kubernetes.io/"
    labels = obj.get("metadata", {}).get("labels") or {}
    roles = sorted(k[len(prefix) :] for k in labels if k.startswith(prefix))
    return ",".join(roles) or "<none>"


def _field(path: str) -> Cell:
    def cell(obj: Obj, _now: float) -> Any:
        value = _dig(obj, path)
        return "" if value is None else value

    return cell


_COLUMNS: dict[tuple[str, str], tuple[Column, ...]] = {
    ("kubevirt.io", "virtualmachineinstances"): VMI_COLUMNS,
    ("", "namespaces"): (NAME, Column("Status", _field("status.phase")), AGE),
    ("", "services"): (
        NAME,
        Column("Type", _field("spec.type")),
        Column("Cluster-IP", _field("spec.clusterIP")),
        Column("External-IP", _external_ips),
        Column("Port(s)", _service_ports),
        AGE,
        Column(
            "Selector", lambda o, _n: _selector_map(o.get("spec", {}).get("selector")), priority=1
        ),
    ),
    ("", "events"): (
        Column("Last Seen", _event_last_seen),
        Column("Type", _field("type")),
        Column("Reason", _field("reason")),
        Column("Object", _event_object),
        Column("Message", _field("message")),
        Column("Name", _name, format="name", priority=1),
    ),
    ("networking.k8s.io", "networkpolicies"): (
        NAME,
        Column(
            "Pod-Selector",
            lambda o, _n: format_label_selector(o.get("spec", {}).get("podSelector")),
        ),
        AGE,
    ),
    ("", "nodes"): (
        NAME,
        Column("Status", _node_status),
        Column("Roles", _node_roles),
        AGE,
        Column("Version", _field("status.nodeInfo.kubeletVersion")),
    ),
}


def register_columns(group: str, plural: str, columns: Sequence[Column]) -> None:
    """Give a resource type its own printer columns (include a ``format="name"`` column)."""
    _COLUMNS[(group, plural)] = tuple(columns)


def columns_for(resource: ResourceType) -> tuple[Column, ...]:
    return _COLUMNS.get((resource.group, resource.plural), (NAME, AGE))


def parse_include_object(value: str | None) -> str:
    if not value:
        return "Metadata"
    if value not in INCLUDE_OBJECT:
        raise bad_request(f'Invalid value: "{value}": must be one of "Metadata", "None", "Object"')
    return value


def partial_metadata(obj: Obj, api_version: str = TABLE_API_VERSION) -> Obj:
    return {
        "kind": "PartialObjectMetadata",
        "apiVersion": api_version,
        "metadata": obj.get("metadata", {}),
    }


def row(resource: ResourceType, obj: Obj, *, now: float, include: str = "Metadata") -> Obj:
    cells = [column.cell(obj, now) for column in columns_for(resource)]
    result: Obj = {"cells": cells}
    if include == "Object":
        result["object"] = obj
    elif include == "Metadata":
        result["object"] = partial_metadata(obj)
    return result


def table(
    resource: ResourceType,
    objs: Iterable[Obj],
    *,
    now: float,
    include: str = "Metadata",
    headers: bool = True,
    metadata: Obj | None = None,
    api_version: str = TABLE_API_VERSION,
) -> Obj:
    """A Table of ``objs``; watch events after the first leave the headers out, as upstream."""
    return {
        "kind": "Table",
        "apiVersion": api_version,
        "metadata": metadata or {},
        "columnDefinitions": [c.definition() for c in columns_for(resource)] if headers else [],
        "rows": [row(resource, obj, now=now, include=include) for obj in objs],
    }
