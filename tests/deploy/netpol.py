"""A small evaluator of Kubernetes NetworkPolicy semantics, for checking the network fence.

It answers one question: may a connection from one endpoint to another, on one port and
protocol, pass the NetworkPolicies of ``networking.k8s.io/v1``? It follows the API's
documented rules:

- A pod is isolated for a direction when at least one policy of its namespace selects it
  (``podSelector``) and has that direction in its ``policyTypes`` (absent: ``Ingress``, plus
  ``Egress`` when the policy has egress rules). An isolated pod allows what the union of those
  policies' rules allows; a pod no policy isolates allows everything in that direction.
- A connection passes when the source's egress and the destination's ingress both allow it.
  Endpoints outside the cluster (addresses) have no policies of their own.
- A peer is either an ``ipBlock`` (``cidr`` minus ``except``) or a ``podSelector`` and/or a
  ``namespaceSelector``: a pod selector alone means pods of the policy's namespace, a namespace
  selector alone means every pod of the selected namespaces. Empty selectors select everything.
  A rule with no peers (or no ``ports``) matches every peer (or port).
- Ports: number or name (resolved against the destination pod's named container ports),
  ``endPort`` ranges, protocol ``TCP`` when omitted; a port entry without ``port`` is every port
  of its protocol.
- Label selectors: ``matchLabels`` and ``matchExpressions`` (``In``, ``NotIn``, ``Exists``,
  ``DoesNotExist``).

Whether an ``ipBlock`` also matches pod IPs is left to each network plugin by the API; the
evaluator takes it as a switch, so that the fence can be checked under both readings. What it
does not model: traffic from or to a pod's own node (the API lets plugins always allow it),
host-network pods, and Services (policies apply after a Service's address is translated to a
pod's, so a connection is modelled to the pod behind it).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

POLICY_KINDS = {("networking.k8s.io/v1", "NetworkPolicy")}
_PROTOCOLS = {"TCP", "UDP", "SCTP"}


class PolicyError(ValueError):
    """A policy the API server would reject, or one this evaluator cannot read."""


@dataclass(frozen=True)
class Namespace:
    name: str
    labels: Mapping[str, str] = field(default_factory=dict)

    @property
    def all_labels(self) -> dict[str, str]:
        # The API server sets this label on every namespace (since Kubernetes 1.21).
        return {**self.labels, "kubernetes.io/metadata.name": self.name}


@dataclass(frozen=True)
class Pod:
    name: str
    namespace: str
    labels: Mapping[str, str]
    ip: str
    # Named container ports: name -> (protocol, number).
    named_ports: Mapping[str, tuple[str, int]] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"pod {self.namespace}/{self.name} ({self.ip})"


@dataclass(frozen=True)
class Address:
    """An endpoint outside the cluster's pods: the internet, a node, a metadata service."""

    name: str
    ip: str

    def __str__(self) -> str:
        return f"{self.name} ({self.ip})"


Endpoint = Pod | Address


@dataclass(frozen=True)
class Policy:
    name: str
    namespace: str
    spec: Mapping[str, Any]

    @classmethod
    def from_manifest(cls, manifest: Mapping[str, Any]) -> Policy:
        key = (manifest.get("apiVersion"), manifest.get("kind"))
        if key not in POLICY_KINDS:
            raise PolicyError(f"not a NetworkPolicy: {key}")
        metadata = manifest["metadata"]
        if "namespace" not in metadata:
            raise PolicyError(f"NetworkPolicy {metadata['name']} has no namespace")
        policy = cls(name=metadata["name"], namespace=metadata["namespace"], spec=manifest["spec"])
        policy.check()
        return policy

    @property
    def types(self) -> frozenset[str]:
        declared = self.spec.get("policyTypes")
        if declared is not None:
            return frozenset(declared)
        return frozenset({"Ingress", "Egress"} if self.spec.get("egress") else {"Ingress"})

    def selects(self, pod: Pod) -> bool:
        return pod.namespace == self.namespace and selector_matches(
            self.spec["podSelector"], pod.labels
        )

    def check(self) -> None:
        """Reject what the API server would reject, so a passing check means something."""
        if "podSelector" not in self.spec:
            raise PolicyError(f"{self.name}: spec.podSelector is required")
        _check_selector(self.spec["podSelector"], where=f"{self.name}.podSelector")
        if not self.types <= {"Ingress", "Egress"}:
            raise PolicyError(f"{self.name}: unknown policyTypes {sorted(self.types)}")
        for direction, peers_key in (("ingress", "from"), ("egress", "to")):
            for index, rule in enumerate(self.spec.get(direction) or []):
                where = f"{self.name}.{direction}[{index}]"
                unknown = set(rule) - {peers_key, "ports"}
                if unknown:
                    raise PolicyError(f"{where}: unknown fields {sorted(unknown)}")
                for peer in rule.get(peers_key) or []:
                    _check_peer(peer, where=where)
                for port in rule.get("ports") or []:
                    _check_port(port, where=where)


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    egress: str
    ingress: str

    def __bool__(self) -> bool:
        return self.allowed


class Fence:
    """Namespaces, pods and policies, and the connections the policies allow among them."""

    def __init__(
        self,
        *,
        namespaces: Iterable[Namespace],
        policies: Iterable[Policy],
        ipblock_matches_pods: bool,
    ) -> None:
        self.namespaces = {namespace.name: namespace for namespace in namespaces}
        self.policies = tuple(policies)
        self.ipblock_matches_pods = ipblock_matches_pods
        for policy in self.policies:
            if policy.namespace not in self.namespaces:
                raise PolicyError(f"{policy.name}: namespace {policy.namespace} is not modelled")

    def connection(
        self, source: Endpoint, destination: Endpoint, port: int, protocol: str = "TCP"
    ) -> Verdict:
        if protocol not in _PROTOCOLS:
            raise PolicyError(f"unknown protocol {protocol}")
        egress = self._egress(source, destination, port, protocol)
        ingress = self._ingress(source, destination, port, protocol)
        return Verdict(allowed=egress[0] and ingress[0], egress=egress[1], ingress=ingress[1])

    def allows(
        self, source: Endpoint, destination: Endpoint, port: int, protocol: str = "TCP"
    ) -> bool:
        return self.connection(source, destination, port, protocol).allowed

    def _egress(
        self, source: Endpoint, destination: Endpoint, port: int, protocol: str
    ) -> tuple[bool, str]:
        if not isinstance(source, Pod):
            return True, "source outside the cluster's pods"
        isolating = [p for p in self.policies if "Egress" in p.types and p.selects(source)]
        if not isolating:
            return True, "no policy isolates the source's egress"
        for policy in isolating:
            for index, rule in enumerate(policy.spec.get("egress") or []):
                if self._rule_matches(rule, "to", policy, destination, destination, port, protocol):
                    return True, f"{policy.name}.egress[{index}]"
        return False, "no egress rule of " + ", ".join(p.name for p in isolating)

    def _ingress(
        self, source: Endpoint, destination: Endpoint, port: int, protocol: str
    ) -> tuple[bool, str]:
        if not isinstance(destination, Pod):
            return True, "destination outside the cluster's pods"
        isolating = [p for p in self.policies if "Ingress" in p.types and p.selects(destination)]
        if not isolating:
            return True, "no policy isolates the destination's ingress"
        for policy in isolating:
            for index, rule in enumerate(policy.spec.get("ingress") or []):
                if self._rule_matches(rule, "from", policy, source, destination, port, protocol):
                    return True, f"{policy.name}.ingress[{index}]"
        return False, "no ingress rule of " + ", ".join(p.name for p in isolating)

    def _rule_matches(
        self,
        rule: Mapping[str, Any],
        peers_key: str,
        policy: Policy,
        remote: Endpoint,
        destination: Endpoint,
        port: int,
        protocol: str,
    ) -> bool:
        peers = rule.get(peers_key) or []
        if peers and not any(self._peer_matches(peer, policy, remote) for peer in peers):
            return False
        ports = rule.get("ports") or []
        return not ports or any(
            _port_matches(entry, destination, port, protocol) for entry in ports
        )

    def _peer_matches(self, peer: Mapping[str, Any], policy: Policy, remote: Endpoint) -> bool:
        if "ipBlock" in peer:
            if isinstance(remote, Pod) and not self.ipblock_matches_pods:
                return False
            return ip_in_block(remote.ip, peer["ipBlock"])
        if not isinstance(remote, Pod):
            return False
        namespace_selector = peer.get("namespaceSelector")
        if namespace_selector is None:
            if remote.namespace != policy.namespace:
                return False
        else:
            namespace = self.namespaces.get(remote.namespace)
            if namespace is None:
                raise PolicyError(f"namespace {remote.namespace} of {remote} is not modelled")
            if not selector_matches(namespace_selector, namespace.all_labels):
                return False
        pod_selector = peer.get("podSelector")
        return pod_selector is None or selector_matches(pod_selector, remote.labels)


def selector_matches(selector: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    """A metav1.LabelSelector against a set of labels; the empty selector matches all."""
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expression in selector.get("matchExpressions") or []:
        key, operator = expression["key"], expression["operator"]
        values = expression.get("values") or []
        present = key in labels
        if operator == "In":
            matched = present and labels[key] in values
        elif operator == "NotIn":
            matched = not present or labels[key] not in values
        elif operator == "Exists":
            matched = present
        elif operator == "DoesNotExist":
            matched = not present
        else:
            raise PolicyError(f"unknown selector operator {operator}")
        if not matched:
            return False
    return True


def ip_in_block(ip: str, block: Mapping[str, Any]) -> bool:
    address = ipaddress.ip_address(ip)
    network = ipaddress.ip_network(block["cidr"])
    if address.version != network.version or address not in network:
        return False
    return not any(
        address.version == excluded.version and address in excluded
        for excluded in (ipaddress.ip_network(text) for text in block.get("except") or [])
    )


def _port_matches(
    entry: Mapping[str, Any], destination: Endpoint, port: int, protocol: str
) -> bool:
    if entry.get("protocol", "TCP") != protocol:
        return False
    wanted = entry.get("port")
    if wanted is None:
        return True
    if isinstance(wanted, str):
        # A named port is the destination pod's; an address has none.
        if not isinstance(destination, Pod) or wanted not in destination.named_ports:
            return False
        named_protocol, number = destination.named_ports[wanted]
        return named_protocol == protocol and number == port
    end = entry.get("endPort", wanted)
    return wanted <= port <= end


def _check_selector(selector: Any, *, where: str) -> None:
    if not isinstance(selector, Mapping):
        raise PolicyError(f"{where}: a selector must be a mapping")
    unknown = set(selector) - {"matchLabels", "matchExpressions"}
    if unknown:
        raise PolicyError(f"{where}: unknown selector fields {sorted(unknown)}")
    for expression in selector.get("matchExpressions") or []:
        operator = expression.get("operator")
        values = expression.get("values") or []
        if operator in {"In", "NotIn"} and not values:
            raise PolicyError(f"{where}: {operator} needs values")
        if operator in {"Exists", "DoesNotExist"} and values:
            raise PolicyError(f"{where}: {operator} takes no values")
        if operator not in {"In", "NotIn", "Exists", "DoesNotExist"}:
            raise PolicyError(f"{where}: unknown operator {operator}")


def _check_peer(peer: Mapping[str, Any], *, where: str) -> None:
    kinds = set(peer)
    if not kinds or not kinds <= {"ipBlock", "podSelector", "namespaceSelector"}:
        raise PolicyError(f"{where}: a peer needs ipBlock or selectors, got {sorted(kinds)}")
    if "ipBlock" in kinds:
        if len(kinds) > 1:
            raise PolicyError(f"{where}: ipBlock cannot be combined with selectors")
        block = peer["ipBlock"]
        network = ipaddress.ip_network(block["cidr"])
        for text in block.get("except") or []:
            excluded = ipaddress.ip_network(text)
            if excluded.version != network.version or not excluded.subnet_of(network):
                raise PolicyError(f"{where}: except {text} is outside cidr {network}")
        return
    for key in ("podSelector", "namespaceSelector"):
        if key in peer:
            _check_selector(peer[key], where=f"{where}.{key}")


def _check_port(entry: Mapping[str, Any], *, where: str) -> None:
    if entry.get("protocol", "TCP") not in _PROTOCOLS:
        raise PolicyError(f"{where}: unknown protocol {entry.get('protocol')}")
    port = entry.get("port")
    if "endPort" in entry and (not isinstance(port, int) or entry["endPort"] < port):
        raise PolicyError(f"{where}: endPort needs a numeric port not above it")
    if isinstance(port, int) and not 1 <= port <= 65535:
        raise PolicyError(f"{where}: port {port} out of range")
