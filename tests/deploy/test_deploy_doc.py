"""docs/DEPLOY.md says what the manifests do: the same names, ports, paths and numbers."""

from __future__ import annotations

import copy
import json
import re

import pytest
import yaml

from tests.deploy.kustomize import (
    COMPONENTS,
    DEPLOY,
    DEPLOY_DOC,
    KUSTOMIZATIONS,
    REPO,
    build_overlay,
    find,
    of_kind,
    secret_references,
    workloads,
)

# These tests build the manifests with kubectl kustomize.
pytestmark = pytest.mark.kubectl


@pytest.fixture(scope="module")
def doc() -> str:
    return DEPLOY_DOC.read_text()


def quoted(doc: str) -> set[str]:
    """Everything the page writes as code: `name`."""
    return set(re.findall(r"`([^`\n]+)`", doc))


def table_rows(doc: str, first_cell: str) -> list[str]:
    return [line for line in doc.splitlines() if line.startswith(f"| `{first_cell}`")]


def test_every_object_the_manifests_make_is_named_in_the_doc(doc, builds, tmp_path):
    named = quoted(doc)
    monitored = build_overlay(
        tmp_path, resources=[KUSTOMIZATIONS["production"]], components=[COMPONENTS["monitoring"]]
    )
    for objects in [*builds.values(), monitored]:
        for obj in objects:
            assert obj["metadata"]["name"] in named, (obj["kind"], obj["metadata"]["name"])


def test_every_secret_the_manifests_read_is_documented_with_its_keys(doc, builds, tmp_path):
    references = set()
    for objects in builds.values():
        references |= secret_references(objects)
    for component in ("redis-tls", "monitoring"):
        with_component = build_overlay(
            tmp_path / component,
            resources=[KUSTOMIZATIONS["production"]],
            components=[COMPONENTS[component]],
        )
        references |= secret_references(with_component)
    assert {name for _, name, _ in references} == {
        "labvirt-redis",
        "labvirt-frontend-tokens",
        "labvirt-admin-tokens",
        "labvirt-metrics-tokens",
        "labvirt-ingress-tls",
        "labvirt-redis-tls",
        "labvirt-metrics-scrape",
    }
    for namespace, name, key in references:
        assert namespace == "labvirt"
        rows = table_rows(doc, name)
        assert len(rows) == 1, f"Secret {name} needs one row in the Secrets table"
        if key is not None:
            assert f"`{key}`" in rows[0], (name, key)


def test_every_secret_row_names_the_variables_it_feeds(doc, builds):
    for workload in workloads(builds["production"]):
        for container in workload["spec"]["template"]["spec"]["containers"]:
            for variable in container.get("env") or []:
                reference = (variable.get("valueFrom") or {}).get("secretKeyRef")
                if reference:
                    (row,) = table_rows(doc, reference["name"])
                    assert f"`{variable['name']}`" in row, (reference["name"], variable["name"])


def test_every_deploy_path_in_the_doc_exists(doc):
    paths = set(re.findall(r"(?<![\w./-])((?:deploy|docs|tests|shared)/[\w./-]*\w)", doc))
    assert "deploy/overlays/production" in paths
    for path in paths:
        assert (REPO / path).exists(), path
    # The tree and the prose also name files relative to deploy/.
    in_deploy = r"(?<![\w./-])((?:base|components|overlays|examples)/[\w./-]*\w)"
    relative = set(re.findall(in_deploy, doc))
    assert "base/network-policies-envs.yaml" in relative
    for path in relative:
        assert (DEPLOY / path).exists(), path


def test_ports_and_ingress_paths_match(doc, builds):
    objects = builds["production"]
    assert "| `labvirt-api` | Deployment, Service (port 80 → 8080), Ingress |" in doc
    assert "| `labvirt-gateway` | Deployment, Service (port 80 → 8081), Ingress |" in doc
    for name, port in (("labvirt-api", 8080), ("labvirt-gateway", 8081)):
        service = find(objects, "Service", name)["spec"]["ports"][0]
        container = find(objects, "Deployment", name)["spec"]["template"]["spec"]["containers"][0]
        assert service["port"] == 80
        assert container["ports"][0]["containerPort"] == port
    assert find(objects, "Service", "redis")["spec"]["ports"][0]["port"] == 6379
    for ingress in of_kind(objects, "Ingress"):
        for rule in ingress["spec"]["rules"]:
            for path in rule["http"]["paths"]:
                assert f"`{path['path']}`" in doc, path["path"]
    assert "kubectl apply -k deploy/overlays/production" in doc


def test_quota_and_limits_in_the_doc_are_the_manifests(doc, builds):
    hard = find(builds["base"], "ResourceQuota", "labvirt-environments")["spec"]["hard"]
    for key, value in hard.items():
        assert f"`{key}: {value}`" in doc, key
    (limits,) = find(builds["base"], "LimitRange", "labvirt-environments")["spec"]["limits"]
    assert (
        f"caps every container at {limits['max']['cpu']} CPU and {limits['max']['memory']}" in doc
    )
    request = limits["defaultRequest"]
    assert f"a request of {request['cpu']} / {request['memory']}" in doc


def test_cluster_range_defaults_in_the_doc_are_the_overlays(doc):
    for name in ("production", "emulation"):
        config = yaml.safe_load((KUSTOMIZATIONS[name] / "cluster-network.yaml").read_text())
        for key, value in config["data"].items():
            (row,) = table_rows(doc, key)
            assert f"`{value}`" in row, (name, key)


def test_redis_restore_patch_in_the_doc_fits_the_statefulset(doc, builds):
    (patch,) = re.findall(r"kubectl -n labvirt patch statefulset redis --type json -p '(.+)'", doc)
    redis = copy.deepcopy(find(builds["production"], "StatefulSet", "redis"))
    for operation in json.loads(patch):
        parts = operation["path"].strip("/").split("/")
        parent = redis
        for part in parts[:-1]:
            parent = parent[int(part)] if isinstance(parent, list) else parent[part]
        last = int(parts[-1]) if isinstance(parent, list) else parts[-1]
        if operation["op"] == "test":
            assert parent[last] == operation["value"], operation
        else:
            assert operation["op"] == "replace"
            parent[last] = operation["value"]
    args = redis["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--appendonly") + 1] == "no"


def test_images_and_placeholder_digest_are_described(doc, builds):
    kustomization = yaml.safe_load(
        (KUSTOMIZATIONS["production"] / "kustomization.yaml").read_text()
    )
    for image in kustomization["images"]:
        assert f"`{image['name']}`" in doc or image["name"] in doc, image["name"]
        assert image["digest"] == "sha256:" + "0" * 64
    assert "`sha256:` followed by 64 zeros" in doc
    base = yaml.safe_load((KUSTOMIZATIONS["base"] / "kustomization.yaml").read_text())
    for image in base["images"]:
        assert f"`{image['newName']}:{image['newTag']}`" in doc, image


def test_roles_in_the_doc_are_the_manifests(doc, builds):
    text = " ".join(doc.split())
    for rule in find(builds["base"], "Role", "labvirt-environments")["rules"]:
        verbs = ", ".join(f"`{verb}`" for verb in rule["verbs"])
        assert f"`{rule['resources'][0]}` ({verbs})" in text, rule
    (console,) = find(builds["base"], "Role", "labvirt-console")["rules"]
    assert f"`get` on `{console['resources'][0]}` in group `{console['apiGroups'][0]}`" in text
