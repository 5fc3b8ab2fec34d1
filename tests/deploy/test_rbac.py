"""Least privilege: who may do what on Kubernetes, and which pods hold a token at all."""

from __future__ import annotations

import pytest

from tests.deploy.kustomize import (
    ENVIRONMENTS_NAMESPACE,
    LABVIRT_NAMESPACE,
    find,
    of_kind,
    pod_template,
    workloads,
)

# These tests build the manifests with kubectl kustomize.
pytestmark = pytest.mark.kubectl

ROLE_KINDS = ("Role", "ClusterRole")
# Resources no labvirt process needs, each a path to the cluster's secrets or to code
# execution in someone else's container.
FORBIDDEN_RESOURCES = {
    "pods",
    "pods/exec",
    "pods/attach",
    "pods/portforward",
    "pods/proxy",
    "pods/ephemeralcontainers",
    "secrets",
    "serviceaccounts",
    "serviceaccounts/token",
    "nodes",
    "nodes/proxy",
    "roles",
    "rolebindings",
    "clusterroles",
    "clusterrolebindings",
}
WORKER_RULES = [
    {
        "apiGroups": ["kubevirt.io"],
        "resources": ["virtualmachineinstances"],
        "verbs": ["create", "get", "list", "watch", "patch", "delete", "deletecollection"],
    },
    {"apiGroups": [""], "resources": ["services"], "verbs": ["create", "get", "list", "delete"]},
    {
        "apiGroups": ["networking.k8s.io"],
        "resources": ["networkpolicies"],
        "verbs": ["create", "list", "delete"],
    },
]
CONSOLE_RULES = [
    {
        "apiGroups": ["subresources.kubevirt.io"],
        "resources": ["virtualmachineinstances/console"],
        "verbs": ["get"],
    }
]
TOKEN_HOLDERS = {"worker", "prewarm-worker", "gateway"}


def rules(objects):
    for role in (o for o in objects if o["kind"] in ROLE_KINDS):
        for rule in role.get("rules") or []:
            yield role["metadata"]["name"], rule


def test_no_cluster_wide_grants(built):
    assert of_kind(built, "ClusterRole") == []
    assert of_kind(built, "ClusterRoleBinding") == []


def test_no_wildcards_in_any_role(built):
    for name, rule in rules(built):
        for field in ("apiGroups", "resources", "verbs", "resourceNames"):
            assert not any("*" in value for value in rule.get(field) or []), (name, field, rule)
        assert "nonResourceURLs" not in rule, name


def test_no_role_reaches_pods_secrets_or_exec(built):
    for name, rule in rules(built):
        for resource in rule["resources"]:
            assert resource not in FORBIDDEN_RESOURCES, (name, resource)
            assert not resource.endswith(("/exec", "/attach", "/portforward", "/proxy")), name
        assert not {"escalate", "bind", "impersonate"} & set(rule["verbs"]), name


def test_roles_grant_exactly_what_each_process_uses(built):
    worker = find(built, "Role", "labvirt-environments")
    console = find(built, "Role", "labvirt-console")
    assert worker["metadata"]["namespace"] == ENVIRONMENTS_NAMESPACE
    assert console["metadata"]["namespace"] == ENVIRONMENTS_NAMESPACE
    assert worker["rules"] == WORKER_RULES
    assert console["rules"] == CONSOLE_RULES
    assert len(of_kind(built, "Role")) == 2


def test_each_role_is_bound_to_one_service_account(built):
    subjects = {
        binding["roleRef"]["name"]: binding["subjects"] for binding in of_kind(built, "RoleBinding")
    }
    assert subjects == {
        "labvirt-environments": [
            {"kind": "ServiceAccount", "name": "labvirt-worker", "namespace": LABVIRT_NAMESPACE}
        ],
        "labvirt-console": [
            {"kind": "ServiceAccount", "name": "labvirt-gateway", "namespace": LABVIRT_NAMESPACE}
        ],
    }
    for binding in of_kind(built, "RoleBinding"):
        assert binding["roleRef"]["kind"] == "Role"
        assert binding["metadata"]["namespace"] == ENVIRONMENTS_NAMESPACE


def mounts_token(pod_spec, accounts) -> bool:
    """What the kubelet does: the pod's setting wins, else the ServiceAccount's, else true."""
    if "automountServiceAccountToken" in pod_spec:
        return pod_spec["automountServiceAccountToken"]
    account = accounts.get(pod_spec.get("serviceAccountName", "default"), {})
    return account.get("automountServiceAccountToken", True)


def component(workload) -> str:
    return pod_template(workload)["metadata"]["labels"]["app.kubernetes.io/component"]


def test_only_workers_and_the_gateway_mount_a_token(built):
    accounts = {sa["metadata"]["name"]: sa for sa in of_kind(built, "ServiceAccount")}
    holders = {
        component(w) for w in workloads(built) if mounts_token(pod_template(w)["spec"], accounts)
    }
    assert holders == TOKEN_HOLDERS


def test_every_pod_names_its_own_service_account(built):
    expected = {
        "api": "labvirt-api",
        "gateway": "labvirt-gateway",
        "worker": "labvirt-worker",
        "prewarm-worker": "labvirt-worker",
        "beat": "labvirt-beat",
        "redis": "labvirt-redis",
    }
    assert {
        component(w): pod_template(w)["spec"]["serviceAccountName"] for w in workloads(built)
    } == (expected)
    accounts = {sa["metadata"]["name"]: sa for sa in of_kind(built, "ServiceAccount")}
    # The accounts of processes that never call Kubernetes refuse tokens themselves too.
    for name in ("labvirt-api", "labvirt-beat", "labvirt-redis"):
        assert accounts[name]["automountServiceAccountToken"] is False, name
