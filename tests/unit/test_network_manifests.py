"""The per-environment NetworkPolicy: exact objects, and what they select."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from shared.adapters.template_files import load_templates
from shared.domain.manifests import (
    MANAGED_BY_SELECTOR,
    POOL_LABEL,
    build_environment,
    build_headless_service,
    build_network_policy,
    environment_selector,
)
from shared.domain.network_manifests import build_peer_network_policy

TOKEN = "abcdef.0123456789abcdef"
TEMPLATES = load_templates(None)


def matches(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A ``matchLabels``-only selector, as the API server applies it."""
    assert set(selector) == {"matchLabels"}
    return selector["matchLabels"].items() <= labels.items()


def selects(selector_text: str, labels: dict[str, str]) -> bool:
    """An equality-based label selector string (``a=b,c=d``), as labvirt writes them."""
    wanted = dict(part.split("=", 1) for part in selector_text.split(","))
    return wanted.items() <= labels.items()


def test_network_policy() -> None:
    policy = build_network_policy(
        environment_id="e2",
        namespace="labs",
        template_name="pair",
        created_at=datetime(2026, 3, 1, 12, 30, 5, tzinfo=UTC),
    )

    members = {"app.kubernetes.io/managed-by": "labvirt", "labvirt.io/environment": "e2"}
    assert policy == {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {
            "name": "lv-e2",
            "namespace": "labs",
            "labels": {
                "app.kubernetes.io/managed-by": "labvirt",
                "labvirt.io/environment": "e2",
                "labvirt.io/template": "pair",
            },
            "annotations": {"labvirt.io/created-at": "2026-03-01T12:30:05Z"},
        },
        "spec": {
            "podSelector": {"matchLabels": members},
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [{"from": [{"podSelector": {"matchLabels": members}}]}],
            "egress": [{"to": [{"podSelector": {"matchLabels": members}}]}],
        },
    }


def test_network_policy_without_a_creation_time_has_no_annotations() -> None:
    policy = build_network_policy(environment_id="e2", namespace="labs", template_name="pair")

    assert "annotations" not in policy["metadata"]


def test_policy_shares_the_services_name_and_labels() -> None:
    """Named like the Service and labelled like it: one selector finds (and deletes) both."""
    arguments: dict[str, Any] = {
        "environment_id": "e2",
        "namespace": "labs",
        "template_name": "pair",
        "created_at": datetime(2026, 3, 1, tzinfo=UTC),
    }

    policy = build_network_policy(**arguments)
    service = build_headless_service(**arguments)

    assert policy["metadata"] == service["metadata"]
    assert selects(environment_selector("e2"), policy["metadata"]["labels"])
    assert selects(MANAGED_BY_SELECTOR, policy["metadata"]["labels"])


def test_the_policy_joins_exactly_its_own_environments_vms() -> None:
    kubernetes = TEMPLATES["kubernetes"]

    def environment(environment_id: str, session_id: str | None) -> Any:
        return build_environment(
            template=kubernetes,
            environment_id=environment_id,
            namespace="labvirt-envs",
            session_id=session_id,
            environment_token=TOKEN,
            extra_labels=None if session_id else {POOL_LABEL: "kubernetes"},
        )

    own = environment("aaaaaaaaaa", "s-aaaaaaaaaaaaaaaaaaaaaaaa")
    warm = environment("bbbbbbbbbb", None)  # a warm pool's: the policy must hold once claimed
    other = environment("cccccccccc", "s-cccccccccccccccccccccccc")
    for manifests in (own, warm):
        policy = manifests.network_policy
        assert policy is not None
        spec = policy["spec"]
        peers = [spec["ingress"][0]["from"][0]["podSelector"], spec["egress"][0]["to"][0]]
        for vmi in manifests.vmis:
            # virt-launcher pods carry their VMI's labels.
            assert matches(spec["podSelector"], vmi["metadata"]["labels"])
            assert matches(peers[0], vmi["metadata"]["labels"])
            assert matches(peers[1]["podSelector"], vmi["metadata"]["labels"])
        for vmi in other.vmis:
            assert not matches(spec["podSelector"], vmi["metadata"]["labels"])
            assert not matches(peers[0], vmi["metadata"]["labels"])
        assert spec["policyTypes"] == ["Ingress", "Egress"]
        assert "ports" not in spec["ingress"][0]
        assert "ports" not in spec["egress"][0]


def test_a_claimed_environment_keeps_matching_its_policy() -> None:
    # Binding a warm environment adds the session label and drops the pool label.
    manifests = build_environment(
        template=TEMPLATES["kubernetes"],
        environment_id="bbbbbbbbbb",
        namespace="labvirt-envs",
        session_id=None,
        environment_token=TOKEN,
        extra_labels={POOL_LABEL: "kubernetes"},
    )
    assert manifests.network_policy is not None
    for vmi in manifests.vmis:
        labels = dict(vmi["metadata"]["labels"])
        del labels[POOL_LABEL]
        labels["labvirt.io/session"] = "s-bbbbbbbbbbbbbbbbbbbbbbbb"
        assert matches(manifests.network_policy["spec"]["podSelector"], labels)


def test_single_vm_templates_get_no_policy() -> None:
    manifests = build_environment(
        template=TEMPLATES["ubuntu"],
        environment_id="e1",
        namespace="labvirt-envs",
        session_id="s-1",
        environment_token=TOKEN,
    )

    assert manifests.network_policy is None


def test_peer_policy_refuses_an_empty_selector() -> None:
    # An empty selector would select every pod of the namespace: all VMs open to each other.
    with pytest.raises(ValueError, match="empty selector selects every pod"):
        build_peer_network_policy(metadata={"name": "x"}, members={})


@pytest.mark.parametrize(
    ("members", "message"),
    [
        ({"bad key!": "x"}, "is not a valid Kubernetes label key"),
        ({"team": "a/b"}, "value of member label 'team' is not a valid"),
    ],
)
def test_peer_policy_refuses_bad_labels(members: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_peer_network_policy(metadata={"name": "x"}, members=members)


def test_peer_policy_does_not_share_its_inputs() -> None:
    metadata = {"name": "x", "labels": {"a": "b"}}
    members = {"a": "b"}

    policy = build_peer_network_policy(metadata=metadata, members=members)
    policy["metadata"]["labels"]["a"] = "changed"
    policy["spec"]["podSelector"]["matchLabels"]["a"] = "changed"

    assert metadata == {"name": "x", "labels": {"a": "b"}}
    assert members == {"a": "b"}
    assert policy["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"] == {"a": "b"}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"environment_id": "A-1"}, "environment id"),
        ({"namespace": "Labs"}, "namespace must be a DNS-1123 label"),
        ({"template_name": "a b"}, "template name is not a valid Kubernetes label value"),
        ({"created_at": datetime(2026, 3, 1)}, "timestamp must be timezone-aware"),
    ],
)
def test_network_policy_rejects_bad_inputs(overrides: dict[str, Any], message: str) -> None:
    arguments: dict[str, Any] = {"environment_id": "e2", "namespace": "labs", "template_name": "p"}
    arguments.update(overrides)

    with pytest.raises(ValueError, match=message):
        build_network_policy(**arguments)
