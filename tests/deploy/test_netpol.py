"""The NetworkPolicy evaluator the fence tests rely on follows the API's semantics."""

from __future__ import annotations

import pytest

from tests.deploy.netpol import (
    Address,
    Fence,
    Namespace,
    Pod,
    Policy,
    PolicyError,
    selector_matches,
)

FRONT = Pod("front", "shop", {"app": "front", "tier": "web"}, "10.0.1.1", {"http": ("TCP", 8080)})
BACK = Pod("back", "shop", {"app": "back"}, "10.0.1.2", {"db": ("TCP", 5432)})
SPY = Pod("spy", "other", {"app": "front"}, "10.0.2.1")
TRUSTED = Pod("ops", "ops", {"app": "tool"}, "10.0.3.1")
OUTSIDE = Address("internet", "93.184.216.34")
NAMESPACES = [Namespace("shop"), Namespace("other"), Namespace("ops", {"trusted": "yes"})]


def policy(spec, namespace="shop", name="p"):
    return Policy.from_manifest(
        {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": {"name": name, "namespace": namespace},
            "spec": spec,
        }
    )


def fence(*specs, matches_pods=False):
    return Fence(namespaces=NAMESPACES, policies=list(specs), ipblock_matches_pods=matches_pods)


def test_no_policy_allows_everything():
    assert fence().allows(SPY, BACK, 1)
    assert fence().allows(OUTSIDE, BACK, 1, "UDP")


def test_a_selecting_policy_without_rules_denies_its_direction_only():
    deny_in = fence(policy({"podSelector": {}}))
    assert not deny_in.allows(FRONT, BACK, 80)
    assert deny_in.allows(BACK, OUTSIDE, 80)  # egress not isolated: policyTypes defaults to Ingress
    deny_both = fence(policy({"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}))
    assert not deny_both.allows(BACK, OUTSIDE, 80)
    assert deny_both.allows(SPY, OUTSIDE, 80)  # another namespace's pods are not selected


def test_egress_rules_without_policy_types_isolate_egress_too():
    only_dns = policy({"podSelector": {}, "egress": [{"ports": [{"port": 53, "protocol": "UDP"}]}]})
    assert only_dns.types == {"Ingress", "Egress"}
    assert fence(only_dns).allows(FRONT, OUTSIDE, 53, "UDP")
    assert not fence(only_dns).allows(FRONT, OUTSIDE, 53, "TCP")


def test_both_ends_must_allow():
    open_egress = policy(
        {"podSelector": {"matchLabels": {"app": "front"}}, "egress": [{}]}, name="out"
    )
    closed_ingress = policy({"podSelector": {"matchLabels": {"app": "back"}}}, name="in")
    assert fence(open_egress).allows(FRONT, BACK, 5432)
    assert not fence(open_egress, closed_ingress).allows(FRONT, BACK, 5432)


def test_policies_add_up():
    first = policy(
        {
            "podSelector": {},
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "front"}}}]}],
        },
        name="a",
    )
    second = policy(
        {
            "podSelector": {},
            "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"trusted": "yes"}}}]}],
        },
        name="b",
    )
    both = fence(first, second)
    assert both.allows(FRONT, BACK, 1)
    assert both.allows(TRUSTED, BACK, 1)
    assert not both.allows(SPY, BACK, 1)


def test_pod_selector_alone_means_the_policys_namespace():
    from_front = policy(
        {
            "podSelector": {},
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "front"}}}]}],
        }
    )
    assert fence(from_front).allows(FRONT, BACK, 1)
    assert not fence(from_front).allows(SPY, BACK, 1)  # same labels, other namespace


def test_namespace_and_pod_selector_together_mean_both():
    peer = {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "other"}},
        "podSelector": {"matchLabels": {"app": "front"}},
    }
    rule = policy({"podSelector": {}, "ingress": [{"from": [peer]}]})
    assert fence(rule).allows(SPY, BACK, 1)
    assert not fence(rule).allows(FRONT, BACK, 1)
    every_namespace = policy(
        {"podSelector": {}, "ingress": [{"from": [{"namespaceSelector": {}}]}]}
    )
    assert fence(every_namespace).allows(TRUSTED, BACK, 1)
    assert not fence(every_namespace).allows(OUTSIDE, BACK, 1)


def test_ip_blocks_with_exceptions():
    block = {"ipBlock": {"cidr": "0.0.0.0/0", "except": ["10.0.0.0/8"]}}
    out = policy({"podSelector": {}, "policyTypes": ["Egress"], "egress": [{"to": [block]}]})
    assert fence(out).allows(FRONT, OUTSIDE, 443)
    assert not fence(out).allows(FRONT, Address("private", "10.1.2.3"), 443)
    # Pods are matched by address only when the plugin does so.
    everywhere = policy(
        {
            "podSelector": {},
            "policyTypes": ["Egress"],
            "egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/8"}}]}],
        }
    )
    assert fence(everywhere, matches_pods=True).allows(FRONT, SPY, 1)
    assert not fence(everywhere, matches_pods=False).allows(FRONT, SPY, 1)
    assert not fence(out, matches_pods=True).allows(FRONT, SPY, 1)


def test_ports_by_number_range_name_and_protocol():
    def only(ports):
        return fence(
            policy(
                {"podSelector": {"matchLabels": {"app": "front"}}, "ingress": [{"ports": ports}]}
            )
        )

    assert only([{"port": 8080}]).allows(BACK, FRONT, 8080)
    assert not only([{"port": 8080}]).allows(BACK, FRONT, 8080, "UDP")
    assert only([{"port": 8000, "endPort": 8100}]).allows(BACK, FRONT, 8080)
    assert not only([{"port": 8000, "endPort": 8079}]).allows(BACK, FRONT, 8080)
    assert only([{"port": "http"}]).allows(BACK, FRONT, 8080)
    assert not only([{"port": "http"}]).allows(BACK, FRONT, 8081)
    assert only([{"protocol": "UDP"}]).allows(BACK, FRONT, 9999, "UDP")
    assert not only([{"protocol": "UDP"}]).allows(BACK, FRONT, 9999)


def test_named_ports_are_the_destinations():
    out = policy(
        {"podSelector": {}, "policyTypes": ["Egress"], "egress": [{"ports": [{"port": "db"}]}]}
    )
    assert fence(out).allows(FRONT, BACK, 5432)
    assert not fence(out).allows(FRONT, OUTSIDE, 5432)


@pytest.mark.parametrize(
    ("expression", "labels", "expected"),
    [
        ({"key": "app", "operator": "In", "values": ["a", "b"]}, {"app": "b"}, True),
        ({"key": "app", "operator": "In", "values": ["a"]}, {}, False),
        ({"key": "app", "operator": "NotIn", "values": ["a"]}, {}, True),
        ({"key": "app", "operator": "NotIn", "values": ["a"]}, {"app": "a"}, False),
        ({"key": "app", "operator": "Exists"}, {"app": ""}, True),
        ({"key": "app", "operator": "DoesNotExist"}, {"app": "a"}, False),
    ],
)
def test_match_expressions(expression, labels, expected):
    assert selector_matches({"matchExpressions": [expression]}, labels) is expected


@pytest.mark.parametrize(
    "spec",
    [
        {},
        {
            "podSelector": {},
            "egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["11.0.0.0/8"]}}]}],
        },
        {
            "podSelector": {},
            "egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/8"}, "podSelector": {}}]}],
        },
        {"podSelector": {}, "ingress": [{"from": [{}]}]},
        {"podSelector": {"matchExpressions": [{"key": "a", "operator": "Like"}]}},
        {"podSelector": {}, "ingress": [{"ports": [{"port": 80, "endPort": 70}]}]},
        {"podSelector": {}, "ingress": [{"sources": []}]},
        {"podSelector": {}, "policyTypes": ["Inbound"]},
    ],
)
def test_rejects_policies_the_api_server_would(spec):
    with pytest.raises(PolicyError):
        policy(spec)
