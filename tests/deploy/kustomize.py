"""Building labvirt's kustomizations with ``kubectl kustomize``, and reading what comes out."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
DEPLOY_DOC = REPO / "docs" / "DEPLOY.md"
ENV_POLICY_EXAMPLE = DEPLOY / "examples" / "environment-network-policy.yaml"
# Every kustomization a user applies, by the name the tests use for its build.
KUSTOMIZATIONS = {
    "base": DEPLOY / "base",
    "production": DEPLOY / "overlays" / "production",
    "emulation": DEPLOY / "overlays" / "emulation",
}
COMPONENTS = {
    "cluster-network": DEPLOY / "components" / "cluster-network",
    "redis-tls": DEPLOY / "components" / "redis-tls",
    "monitoring": DEPLOY / "components" / "monitoring",
}
# Kustomizations that are parts of a component, not a deployment: the alert rules, which
# components/monitoring includes (kustomize reads no file outside a kustomization's folder).
PARTS = {"monitoring": DEPLOY / "monitoring"}
# The Prometheus Operator's kinds, which kubernetes-validate has no schema for.
PROMETHEUS_OPERATOR_GROUP = "monitoring.coreos.com"
LABVIRT_NAMESPACE = "labvirt"
ENVIRONMENTS_NAMESPACE = "labvirt-envs"
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}

Manifest = dict[str, Any]


def kubectl() -> str:
    """kubectl's path; without it, skip, except in CI where a skip would hide a broken build."""
    path = shutil.which("kubectl")
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail("kubectl is not installed: CI must build the deploy manifests")
        pytest.skip("kubectl is not installed: the deploy manifests cannot be built here")
    return path


def build(directory: Path) -> list[Manifest]:
    """The objects ``kubectl kustomize <directory>`` renders; fails the test if it cannot."""
    result = subprocess.run(
        [kubectl(), "kustomize", str(directory)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if result.returncode != 0:
        pytest.fail(f"kubectl kustomize {directory} failed:\n{result.stderr}")
    return [document for document in yaml.safe_load_all(result.stdout) if document]


def build_overlay(
    workdir: Path,
    *,
    resources: Sequence[Path],
    components: Sequence[Path] = (),
    files: Mapping[str, str] | None = None,
) -> list[Manifest]:
    """Build a throw-away overlay in ``workdir`` over the repository's kustomizations.

    kustomize refuses absolute paths, so the repository's directories are named relative to
    ``workdir``; ``files`` are written beside the kustomization and listed as its resources.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    listed = [os.path.relpath(path, workdir) for path in resources]
    for name, text in (files or {}).items():
        (workdir / name).write_text(text)
        listed.append(name)
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": listed,
        "components": [os.path.relpath(path, workdir) for path in components],
    }
    (workdir / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    return build(workdir)


def find(objects: list[Manifest], kind: str, name: str) -> Manifest:
    matches = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind} {name}, found {len(matches)}"
    return matches[0]


def of_kind(objects: list[Manifest], kind: str) -> list[Manifest]:
    return [o for o in objects if o["kind"] == kind]


def pod_template(workload: Manifest) -> Manifest:
    return workload["spec"]["template"]


def workloads(objects: list[Manifest]) -> list[Manifest]:
    return [o for o in objects if o["kind"] in WORKLOAD_KINDS]


def containers(pod_spec: Manifest) -> Iterator[Manifest]:
    yield from pod_spec.get("initContainers") or []
    yield from pod_spec.get("containers") or []


def secret_references(objects: list[Manifest]) -> set[tuple[str, str, str | None]]:
    """Every (namespace, Secret name, key or None) the objects refer to."""
    found: set[tuple[str, str, str | None]] = set()
    for obj in objects:
        namespace = obj["metadata"].get("namespace", "default")
        if obj["kind"] in WORKLOAD_KINDS:
            spec = pod_template(obj)["spec"]
            for container in containers(spec):
                for source in container.get("envFrom") or []:
                    if "secretRef" in source:
                        found.add((namespace, source["secretRef"]["name"], None))
                for variable in container.get("env") or []:
                    reference = (variable.get("valueFrom") or {}).get("secretKeyRef")
                    if reference:
                        found.add((namespace, reference["name"], reference["key"]))
            for volume in spec.get("volumes") or []:
                if "secret" in volume:
                    items = volume["secret"].get("items") or [{"key": None}]
                    for item in items:
                        found.add((namespace, volume["secret"]["secretName"], item["key"]))
            for pull in spec.get("imagePullSecrets") or []:
                found.add((namespace, pull["name"], None))
        if obj["kind"] == "Ingress":
            for tls in obj["spec"].get("tls") or []:
                found.add((namespace, tls["secretName"], None))
        if obj["kind"] == "PodMonitor":
            for endpoint in obj["spec"].get("podMetricsEndpoints") or []:
                credentials = (endpoint.get("authorization") or {}).get("credentials")
                if credentials:
                    found.add((namespace, credentials["name"], credentials["key"]))
    return found


CPU_UNITS = {"": 1.0, "m": 0.001}
MEMORY_UNITS = {"": 1, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "k": 10**3, "M": 10**6, "G": 10**9}


def cpu(quantity: str | int) -> float:
    """A Kubernetes CPU quantity in cores."""
    match = re.fullmatch(r"([0-9.]+)(m?)", str(quantity))
    assert match, quantity
    return float(match[1]) * CPU_UNITS[match[2]]


def memory(quantity: str | int) -> int:
    """A Kubernetes memory quantity in bytes."""
    match = re.fullmatch(r"([0-9.]+)([KMG]i?|k)?", str(quantity))
    assert match, quantity
    return int(float(match[1]) * MEMORY_UNITS[match[2] or ""])
