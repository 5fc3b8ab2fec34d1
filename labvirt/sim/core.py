"""The built-in Kubernetes types the simulator serves beside VMIs, with their API strategies.

core/v1 namespaces, services and events, and networking.k8s.io/v1 network policies: enough for
labvirt to give each environment headless-service DNS and isolation. Each type gets the
defaults and validation of the API server that a client could observe; nothing here runs
networking, the objects are only stored.
"""

from __future__ import annotations

import ipaddress
import random
import re
from collections.abc import Mapping
from typing import Any

from labvirt.sim.errors import ApiError, invalid
from labvirt.sim.patch import MergeKeys
from labvirt.sim.selectors import SUPPORTED_FIELDS, FieldGetter
from labvirt.sim.store import Obj, ResourceType, Store

NAMESPACES = ResourceType(
    group="",
    version="v1",
    plural="namespaces",
    singular="namespace",
    kind="Namespace",
    namespaced=False,
    short_names=("ns",),
    verbs=("create", "delete", "get", "list", "patch", "update", "watch"),
)
SERVICES = ResourceType(
    group="",
    version="v1",
    plural="services",
    singular="service",
    kind="Service",
    namespaced=True,
    short_names=("svc",),
    categories=("all",),
    returns_deleted_object=True,
)
EVENTS = ResourceType(
    group="",
    version="v1",
    plural="events",
    singular="event",
    kind="Event",
    namespaced=True,
    short_names=("ev",),
)
NETWORK_POLICIES = ResourceType(
    group="networking.k8s.io",
    version="v1",
    plural="networkpolicies",
    singular="networkpolicy",
    kind="NetworkPolicy",
    namespaced=True,
    short_names=("netpol",),
)
CORE_TYPES = (NAMESPACES, SERVICES, EVENTS, NETWORK_POLICIES)

# Namespaces that exist from the start and that the API server refuses to delete.
INITIAL_NAMESPACES = ("default", "kube-system")
PROTECTED_NAMESPACES = ("default", "kube-system", "kube-public")

SERVICE_CIDR = ipaddress.IPv4Network("10.96.0.0/12")
NODE_PORTS = range(30000, 32768)
_RESERVED_IPS = frozenset({"10.96.0.0", "10.96.0.1", "10.96.0.10"})  # network, apiserver, DNS

_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_SERVICE_TYPES = ("ClusterIP", "NodePort", "LoadBalancer", "ExternalName")
_PROTOCOLS = ("SCTP", "TCP", "UDP")

# Strategic merge keys of the lists a client might patch on these types.
MERGE_KEYS: dict[ResourceType, MergeKeys] = {
    SERVICES: {("spec", "ports"): "port"},
}


def _getter(*path: str) -> FieldGetter:
    def get(obj: dict[str, Any]) -> str | None:
        node: Any = obj
        for part in path:
            if not isinstance(node, dict):
                return None
            node = node.get(part)
        return None if node is None else str(node)

    return get


# Field selectors each type supports beyond metadata.name / metadata.namespace.
FIELD_SELECTORS: dict[ResourceType, Mapping[str, FieldGetter]] = {
    NAMESPACES: {**SUPPORTED_FIELDS, "status.phase": _getter("status", "phase")},
    SERVICES: {
        **SUPPORTED_FIELDS,
        "spec.clusterIP": _getter("spec", "clusterIP"),
        "spec.type": _getter("spec", "type"),
    },
    EVENTS: {
        **SUPPORTED_FIELDS,
        **{
            f"involvedObject.{key}": _getter("involvedObject", key)
            for key in (
                "kind",
                "namespace",
                "name",
                "uid",
                "apiVersion",
                "resourceVersion",
                "fieldPath",
            )
        },
        "reason": _getter("reason"),
        "reportingComponent": _getter("reportingComponent"),
        "source": _getter("source", "component"),
        "type": _getter("type"),
    },
}


def _cause(field: str, message: str, kind: str = "FieldValueInvalid") -> dict[str, str]:
    return {"type": kind, "message": message, "field": field}


class NamespaceStrategy:
    def on_create(self, obj: Obj) -> None:
        name = obj["metadata"]["name"]
        if len(name) > 63 or not _DNS1123_LABEL.match(name):
            raise invalid(
                "Namespace",
                "",
                name,
                [
                    _cause(
                        "metadata.name",
                        f'Invalid value: "{name}": a lowercase RFC 1123 label must consist of '
                        "lower case alphanumeric characters or '-', and must start and end with "
                        "an alphanumeric character",
                    )
                ],
            )
        obj["metadata"].setdefault("labels", {})["kubernetes.io/metadata.name"] = name
        obj["spec"] = {"finalizers": ["kubernetes"]}
        obj["status"] = {"phase": "Active"}

    def on_update(self, old: Obj, new: Obj) -> None:
        new["metadata"].setdefault("labels", {})["kubernetes.io/metadata.name"] = old["metadata"][
            "name"
        ]
        new["spec"] = old.get("spec", {})
        new["status"] = old.get("status", {})


class ServiceStrategy:
    """ClusterIP allocation (headless ``None`` kept as is), node ports, defaults, validation."""

    def __init__(self, seed: int | None) -> None:
        self._rng = random.Random(seed)
        self.allocated_ips: set[str] = set()
        self.allocated_node_ports: set[int] = set()

    def on_create(self, obj: Obj) -> None:
        spec = obj.setdefault("spec", {})
        name = obj["metadata"]["name"]
        if not isinstance(spec, dict):
            raise invalid("Service", "", name, [_cause("spec", "Invalid value: must be an object")])
        if len(name) > 63 or not _DNS1123_LABEL.match(name):
            raise invalid(
                "Service",
                "",
                name,
                [
                    _cause(
                        "metadata.name",
                        f'Invalid value: "{name}": a DNS-1035 label must consist of lower case '
                        "alphanumeric characters or '-', start with an alphabetic character, "
                        "and end "
                        "with an alphanumeric character",
                    )
                ],
            )
        self._default(spec)
        self._validate(name, spec)
        cluster_ip = spec.get("clusterIP")
        if spec["type"] == "ExternalName":
            spec.pop("clusterIP", None)
        elif cluster_ip == "None":
            spec["clusterIPs"] = ["None"]
        else:
            if cluster_ip:
                self._check_requested_ip(name, str(cluster_ip))
            else:
                cluster_ip = self._free_ip()
            spec["clusterIP"] = cluster_ip
            spec["clusterIPs"] = [cluster_ip]
            spec.setdefault("ipFamilies", ["IPv4"])
            spec.setdefault("ipFamilyPolicy", "SingleStack")
        if spec["type"] in ("NodePort", "LoadBalancer"):
            for port in spec["ports"]:
                if not port.get("nodePort"):
                    port["nodePort"] = self._free_node_port()
        obj["status"] = {"loadBalancer": {}}

    def on_update(self, old: Obj, new: Obj) -> None:
        spec = new.setdefault("spec", {})
        old_spec = old.get("spec", {})
        name = old["metadata"]["name"]
        for key in ("clusterIP", "clusterIPs"):
            if key not in spec and key in old_spec:
                spec[key] = old_spec[key]
            elif spec.get(key) != old_spec.get(key) and spec.get("type") != "ExternalName":
                raise invalid(
                    "Service",
                    "",
                    name,
                    [
                        _cause(
                            f"spec.{key}",
                            f'Invalid value: "{spec.get(key)}": field is immutable',
                        )
                    ],
                )
        self._default(spec)
        self._validate(name, spec)
        new.setdefault("status", old.get("status", {"loadBalancer": {}}))

    def observe(self, event_type: str, obj: Obj) -> None:
        """Keep allocations in step with what is stored (dry runs allocate nothing)."""
        spec = obj.get("spec", {})
        ip = spec.get("clusterIP")
        ports = [p.get("nodePort") for p in spec.get("ports") or [] if p.get("nodePort")]
        if event_type == "DELETED":
            self.allocated_ips.discard(ip)
            self.allocated_node_ports.difference_update(ports)
        else:
            if ip and ip != "None":
                self.allocated_ips.add(ip)
            self.allocated_node_ports.update(ports)

    @staticmethod
    def _default(spec: dict[str, Any]) -> None:
        spec.setdefault("type", "ClusterIP")
        if spec["type"] != "ExternalName":
            spec.setdefault("sessionAffinity", "None")
            spec.setdefault("internalTrafficPolicy", "Cluster")
        for port in spec.get("ports") or []:
            if isinstance(port, dict):
                port.setdefault("protocol", "TCP")
                if "port" in port:
                    port.setdefault("targetPort", port["port"])

    @staticmethod
    def _validate(name: str, spec: dict[str, Any]) -> None:
        causes: list[dict[str, str]] = []
        if spec["type"] not in _SERVICE_TYPES:
            causes.append(
                _cause(
                    "spec.type",
                    f'Unsupported value: "{spec["type"]}": supported values: '
                    + ", ".join(f'"{t}"' for t in _SERVICE_TYPES),
                    "FieldValueNotSupported",
                )
            )
        ports = spec.get("ports") or []
        if not isinstance(ports, list):
            causes.append(_cause("spec.ports", "Invalid value: must be a list"))
            ports = []
        headless = spec.get("clusterIP") == "None"
        if not ports and not headless and spec["type"] != "ExternalName":
            causes.append(_cause("spec.ports", "Required value", "FieldValueRequired"))
        names: set[str] = set()
        for i, port in enumerate(ports):
            where = f"spec.ports[{i}]"
            if not isinstance(port, dict):
                causes.append(_cause(where, "Invalid value: must be an object"))
                continue
            number = port.get("port")
            if not isinstance(number, int) or isinstance(number, bool) or not 0 < number < 65536:
                causes.append(
                    _cause(
                        f"{where}.port",
                        f"Invalid value: {number}: must be between 1 and 65535, inclusive",
                    )
                )
            if port.get("protocol") not in _PROTOCOLS:
                causes.append(
                    _cause(
                        f"{where}.protocol",
                        f'Unsupported value: "{port.get("protocol")}": supported values: '
                        '"SCTP", "TCP", "UDP"',
                        "FieldValueNotSupported",
                    )
                )
            port_name = port.get("name")
            if len(ports) > 1 and not port_name:
                causes.append(_cause(f"{where}.name", "Required value", "FieldValueRequired"))
            elif port_name:
                if port_name in names:
                    causes.append(
                        _cause(
                            f"{where}.name",
                            f'Duplicate value: "{port_name}"',
                            "FieldValueDuplicate",
                        )
                    )
                names.add(port_name)
        selector = spec.get("selector")
        if selector is not None and not (
            isinstance(selector, dict) and all(isinstance(v, str) for v in selector.values())
        ):
            causes.append(_cause("spec.selector", "Invalid value: must be a map of strings"))
        if causes:
            raise invalid("Service", "", name, causes)

    def _check_requested_ip(self, name: str, ip: str) -> None:
        try:
            address = ipaddress.IPv4Address(ip)
        except ValueError:
            address = None
        if address is None or address not in SERVICE_CIDR:
            raise invalid(
                "Service",
                "",
                name,
                [
                    _cause(
                        "spec.clusterIPs",
                        f'Invalid value: ["{ip}"]: failed to allocate IP {ip}: '
                        f"the provided IP ({ip}) "
                        f"is not in the valid range. The range of valid IPs is {SERVICE_CIDR}",
                    )
                ],
            )
        if ip in self.allocated_ips or ip in _RESERVED_IPS:
            raise invalid(
                "Service",
                "",
                name,
                [
                    _cause(
                        "spec.clusterIPs",
                        f'Invalid value: ["{ip}"]: failed to allocate IP {ip}: '
                        "provided IP is already "
                        "allocated",
                    )
                ],
            )

    def _free_ip(self) -> str:
        size = SERVICE_CIDR.num_addresses
        base = int(SERVICE_CIDR.network_address)
        for _ in range(10_000):
            ip = str(ipaddress.IPv4Address(base + self._rng.randrange(1, size - 1)))
            if ip not in self.allocated_ips and ip not in _RESERVED_IPS:
                return ip
        raise ApiError(500, "InternalError", "failed to allocate a serviceIP: range is full")

    def _free_node_port(self) -> int:
        free = [p for p in NODE_PORTS if p not in self.allocated_node_ports]
        if not free:
            raise ApiError(500, "InternalError", "failed to allocate a nodePort: range is full")
        return self._rng.choice(free)


class NetworkPolicyStrategy:
    """Defaults and the checks of the API server a client meets first: an omitted
    ``podSelector`` is the empty one (every pod, as the server decodes it), ``policyTypes``
    follows the rules present, selectors are label maps, and every peer names something."""

    def on_create(self, obj: Obj) -> None:
        self._default_and_validate(obj)

    def on_update(self, old: Obj, new: Obj) -> None:  # noqa: ARG002 - the Admission protocol
        self._default_and_validate(new)

    @classmethod
    def _default_and_validate(cls, obj: Obj) -> None:
        spec = obj.setdefault("spec", {})
        name = obj["metadata"]["name"]
        if not isinstance(spec, dict):
            raise invalid(
                "NetworkPolicy",
                "networking.k8s.io",
                name,
                [_cause("spec", "Invalid value: must be an object")],
            )
        spec.setdefault("podSelector", {})
        if "policyTypes" not in spec:
            spec["policyTypes"] = ["Ingress"] + (["Egress"] if spec.get("egress") else [])
        causes = cls._selector_causes("spec.podSelector", spec["podSelector"])
        for i, policy_type in enumerate(spec["policyTypes"]):
            if policy_type not in ("Ingress", "Egress"):
                causes.append(
                    _cause(
                        f"spec.policyTypes[{i}]",
                        f'Unsupported value: "{policy_type}": supported values: '
                        '"Egress", "Ingress"',
                        "FieldValueNotSupported",
                    )
                )
        for direction, peers_key in (("ingress", "from"), ("egress", "to")):
            rules = spec.get(direction) or []
            for i, rule in enumerate(rules if isinstance(rules, list) else [None]):
                where = f"spec.{direction}[{i}]"
                if not isinstance(rule, dict):
                    causes.append(_cause(where, "Invalid value: must be an object"))
                    continue
                for j, peer in enumerate(rule.get(peers_key) or []):
                    causes.extend(cls._peer_causes(f"{where}.{peers_key}[{j}]", peer))
        if causes:
            raise invalid("NetworkPolicy", "networking.k8s.io", name, causes)

    @classmethod
    def _peer_causes(cls, where: str, peer: Any) -> list[dict[str, str]]:
        if not isinstance(peer, dict) or not any(
            peer.get(key) is not None for key in ("podSelector", "namespaceSelector", "ipBlock")
        ):
            return [_cause(where, "Required value: must specify a peer", "FieldValueRequired")]
        causes: list[dict[str, str]] = []
        for key in ("podSelector", "namespaceSelector"):
            if peer.get(key) is not None:
                causes.extend(cls._selector_causes(f"{where}.{key}", peer[key]))
        return causes

    @staticmethod
    def _selector_causes(where: str, selector: Any) -> list[dict[str, str]]:
        if not isinstance(selector, dict):
            return [_cause(where, "Invalid value: must be an object")]
        labels = selector.get("matchLabels") or {}
        if not isinstance(labels, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in labels.items()
        ):
            return [_cause(f"{where}.matchLabels", "Invalid value: must be a map of strings")]
        return []


class Core:
    """Registers the built-in types on a store and keeps their cross-object rules."""

    def __init__(self, store: Store, *, seed: int | None = None) -> None:
        self.store = store
        self.services = ServiceStrategy(seed)
        store.register(NAMESPACES, NamespaceStrategy())
        store.register(SERVICES, self.services)
        store.register(EVENTS)
        store.register(NETWORK_POLICIES, NetworkPolicyStrategy())
        store.add_listener(self._on_change)
        for name in INITIAL_NAMESPACES:
            store.create(NAMESPACES, None, {"metadata": {"name": name}})

    def check_delete(
        self,
        resource: ResourceType,
        namespace: str | None,  # noqa: ARG002 - no namespaced type is protected yet
        name: str,
    ) -> None:
        """Refuse what the API server refuses to delete."""
        if resource == NAMESPACES and name in PROTECTED_NAMESPACES:
            raise ApiError(
                403,
                "Forbidden",
                f'namespaces "{name}" is forbidden: this namespace may not be deleted',
                details={"name": name, "kind": "namespaces"},
            )

    def _on_change(
        self, event_type: str, resource: ResourceType, obj: Obj, previous: Obj | None
    ) -> None:
        if resource == SERVICES:
            self.services.observe(event_type, obj)
            if event_type == "MODIFIED" and previous is not None:
                # Node ports dropped by an update are free again.
                self.services.observe(
                    "DELETED",
                    {
                        "spec": {
                            "ports": [
                                p
                                for p in previous.get("spec", {}).get("ports") or []
                                if p.get("nodePort")
                                not in {
                                    q.get("nodePort")
                                    for q in obj.get("spec", {}).get("ports") or []
                                }
                            ]
                        }
                    },
                )
        elif resource == NAMESPACES and event_type == "DELETED":
            self._delete_contents(obj["metadata"]["name"])

    def _delete_contents(self, namespace: str) -> None:
        """A deleted namespace takes its objects with it (finalizers still run)."""
        for resource in self.store.resources():
            if not resource.namespaced:
                continue
            names = [
                o["metadata"]["name"]
                for o in self.store.items(resource)
                if o["metadata"].get("namespace") == namespace
            ]
            for name in names:
                try:
                    self.store.delete(resource, namespace, name)
                except ApiError:
                    continue
