"""Every kustomization builds, and every object it renders is valid Kubernetes."""

from __future__ import annotations

import copy
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from shared.domain.manifests import build_network_policy
from tests.deploy.kustomize import (
    COMPONENTS,
    DEPLOY,
    ENV_POLICY_EXAMPLE,
    ENVIRONMENTS_NAMESPACE,
    KUSTOMIZATIONS,
    PARTS,
    PROMETHEUS_OPERATOR_GROUP,
    Manifest,
    build_overlay,
    find,
    of_kind,
)

# These tests build the manifests with kubectl kustomize.
pytestmark = pytest.mark.kubectl

# The oldest Kubernetes the manifests support, and the newest the validator knows.
KUBERNETES_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
# Kinds kubernetes-validate cannot know (custom resources), checked by hand below.
CUSTOM_KINDS = {("kubevirt.io/v1", "KubeVirt")}
# The fields of KubeVirt's v1 KubeVirtSpec (kubevirt v1.x), for a shape check by hand.
KUBEVIRT_SPEC_FIELDS = {
    "certificateRotateStrategy",
    "configuration",
    "customizeComponents",
    "imagePullPolicy",
    "imagePullSecrets",
    "imageRegistry",
    "imageTag",
    "infra",
    "monitorAccount",
    "monitorNamespace",
    "productComponent",
    "productName",
    "productVersion",
    "serviceMonitorNamespace",
    "uninstallStrategy",
    "workloadUpdateStrategy",
    "workloads",
}
LOCAL_CONFIG = "config.kubernetes.io/local-config"
# The Prometheus Operator's kinds components/monitoring adds, and no other of its group: they
# are skipped by the schema validation, and checked by hand (test_metrics.py, test_monitoring.py).
PROMETHEUS_OPERATOR_KINDS = {"PodMonitor", "PrometheusRule"}
# The fields of the Operator's v1 PodMonitorSpec and PodMetricsEndpoint labvirt may use.
POD_MONITOR_SPEC_FIELDS = {
    "selector",
    "namespaceSelector",
    "podMetricsEndpoints",
    "podTargetLabels",
}
POD_METRICS_ENDPOINT_FIELDS = {
    "port",
    "path",
    "scheme",
    "interval",
    "scrapeTimeout",
    "authorization",
}


def kustomization_files() -> list[Path]:
    return sorted(DEPLOY.rglob("kustomization.yaml"))


def test_every_kustomization_and_component_is_known_to_the_tests():
    seen_kustomizations, seen_components = set(), set()
    for path in kustomization_files():
        kind = yaml.safe_load(path.read_text()).get("kind", "Kustomization")
        (seen_components if kind == "Component" else seen_kustomizations).add(path.parent)
    assert seen_kustomizations == set(KUSTOMIZATIONS.values()) | set(PARTS.values())
    assert seen_components == set(COMPONENTS.values())


def test_both_overlays_take_the_cluster_address_ranges():
    for name in ("production", "emulation"):
        kustomization = yaml.safe_load((KUSTOMIZATIONS[name] / "kustomization.yaml").read_text())
        assert "../../components/cluster-network" in kustomization["components"], name
        assert "cluster-network.yaml" in kustomization["resources"], name


def test_build_renders_each_object_once(built):
    identities = Counter(
        (o["apiVersion"], o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"])
        for o in built
    )
    assert built
    assert [identity for identity, count in identities.items() if count > 1] == []


def test_build_applies_nothing_local_to_the_build(built):
    for obj in built:
        assert LOCAL_CONFIG not in (obj["metadata"].get("annotations") or {}), obj["metadata"]
    assert not [o for o in of_kind(built, "ConfigMap") if o["metadata"]["name"].endswith("network")]


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_object_is_valid_for_kubernetes(built, version):
    for obj in built:
        if (obj["apiVersion"], obj["kind"]) in CUSTOM_KINDS:
            continue
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            where = ".".join(str(part) for part in error.path)
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']}: {where}: {error.message}")
        except kubernetes_validate.SchemaNotFoundError as error:
            pytest.fail(error.message)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_environment_policy_example_is_valid_for_kubernetes(version):
    example = yaml.safe_load(ENV_POLICY_EXAMPLE.read_text())
    kubernetes_validate.validate(example, version, strict=True)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_built_environment_policy_is_valid_for_kubernetes(version):
    policy = build_network_policy(
        environment_id="0f8fad5bd9cb469fa16570867728950e",
        namespace=ENVIRONMENTS_NAMESPACE,
        template_name="kubernetes",
        created_at=datetime(2026, 3, 1, tzinfo=UTC),
    )
    kubernetes_validate.validate(policy, version, strict=True)


def test_only_the_emulation_overlay_configures_kubevirt(builds):
    for name, objects in builds.items():
        custom = {(o["apiVersion"], o["kind"]) for o in objects} & CUSTOM_KINDS
        assert custom == ({("kubevirt.io/v1", "KubeVirt")} if name == "emulation" else set())


def test_emulation_kubevirt_resource_turns_on_software_emulation(builds):
    kubevirt = find(builds["emulation"], "KubeVirt", "kubevirt")
    assert kubevirt["apiVersion"] == "kubevirt.io/v1"
    assert set(kubevirt) == {"apiVersion", "kind", "metadata", "spec"}
    assert kubevirt["metadata"] == {"name": "kubevirt", "namespace": "kubevirt"}
    spec = kubevirt["spec"]
    assert set(spec) <= KUBEVIRT_SPEC_FIELDS
    developer = spec["configuration"]["developerConfiguration"]
    # A boolean, not the string "true", which KubeVirt's schema would reject.
    assert developer["useEmulation"] is True


def test_emulation_gives_environments_longer_to_start(builds):
    emulation = find(builds["emulation"], "ConfigMap", "labvirt")["data"]
    assert int(emulation["LABVIRT_STARTUP_TIMEOUT_SECONDS"]) >= 1800
    assert (
        "LABVIRT_STARTUP_TIMEOUT_SECONDS"
        not in find(builds["production"], "ConfigMap", "labvirt")["data"]
    )


def vm_egress_except(objects: list[Manifest]) -> list[str]:
    policy = find(objects, "NetworkPolicy", "labvirt-vm-egress")
    return policy["spec"]["egress"][1]["to"][0]["ipBlock"]["except"]


def test_cluster_network_component_writes_the_overlays_ranges_into_the_fence(tmp_path):
    values = {
        "pod-cidr": "198.18.0.0/16",
        "service-cidr": "198.19.0.0/16",
        "apiserver-cidr": "203.0.113.10/32",
    }
    config = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "labvirt-cluster-network", "annotations": {LOCAL_CONFIG: "true"}},
        "data": values,
    }
    objects = build_overlay(
        tmp_path,
        resources=[KUSTOMIZATIONS["base"]],
        components=[COMPONENTS["cluster-network"]],
        files={"cluster-network.yaml": yaml.safe_dump(config)},
    )
    assert vm_egress_except(objects)[5:] == list(values.values())
    assert not [
        o for o in objects if o["kind"] == "ConfigMap" and "cluster" in o["metadata"]["name"]
    ]


def test_overlays_state_the_ranges_the_base_assumes(builds):
    # The base's literal defaults and the overlays' cluster-network.yaml agree, so building
    # the base alone gives the same fence as an overlay left at its defaults.
    for name in ("production", "emulation"):
        config = yaml.safe_load((KUSTOMIZATIONS[name] / "cluster-network.yaml").read_text())
        assert config["metadata"]["annotations"][LOCAL_CONFIG] == "true"
        assert vm_egress_except(builds[name])[5:] == [
            config["data"][key] for key in ("pod-cidr", "service-cidr", "apiserver-cidr")
        ]
        assert vm_egress_except(builds[name]) == vm_egress_except(builds["base"])


def test_redis_tls_component_switches_every_process_to_verified_tls(tmp_path):
    objects = build_overlay(
        tmp_path,
        resources=[KUSTOMIZATIONS["production"]],
        components=[COMPONENTS["redis-tls"]],
    )
    for version in KUBERNETES_VERSIONS:
        for obj in objects:
            kubernetes_validate.validate(obj, version, strict=True)
    deployments = of_kind(objects, "Deployment")
    assert len(deployments) == 5
    for deployment in deployments:
        spec = deployment["spec"]["template"]["spec"]
        (container,) = spec["containers"]
        env = {variable["name"]: variable for variable in container["env"]}
        url = env["REDIS_URL"]["value"]
        assert url.startswith("rediss://:$(REDIS_PASSWORD)@redis:6379/0?"), url
        assert "ssl_cert_reqs=required" in url
        assert "ssl_ca_certs=/etc/labvirt/redis-tls/ca.crt" in url
        mounts = {mount["mountPath"]: mount["name"] for mount in container["volumeMounts"]}
        volumes = {volume["name"]: volume for volume in spec["volumes"]}
        ca = volumes[mounts["/etc/labvirt/redis-tls"]]["secret"]
        assert ca == {
            "secretName": "labvirt-redis-tls",
            "items": [{"key": "ca.crt", "path": "ca.crt"}],
        }
    redis = find(objects, "StatefulSet", "redis")["spec"]["template"]["spec"]["containers"][0]
    args = redis["args"]
    # redis-server takes the last value of an option: plain text off, TLS on the same port.
    last_port = max(index for index, arg in enumerate(args) if arg == "--port")
    assert args[last_port + 1] == "0"
    assert args[args.index("--tls-port") + 1] == "6379"
    assert "--requirepass" in args
    assert args[args.index("--appendonly") + 1] == "yes"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert "--tls" in redis[probe]["exec"]["command"][-1]


def without_expression_spacing(rule: Manifest) -> Manifest:
    """A PrometheusRule whose expressions have their runs of white space made one space."""
    copied = copy.deepcopy(rule)
    for group in copied["spec"]["groups"]:
        for entry in group["rules"]:
            entry["expr"] = " ".join(entry["expr"].split())
    return copied


def identity(obj: Manifest) -> tuple[str, str | None, str]:
    return obj["kind"], obj["metadata"].get("namespace"), obj["metadata"]["name"]


def test_monitoring_component_adds_valid_objects_and_the_operators_kinds(builds, tmp_path):
    objects = build_overlay(
        tmp_path,
        resources=[KUSTOMIZATIONS["production"]],
        components=[COMPONENTS["monitoring"]],
    )
    operator_kinds = []
    for obj in objects:
        if obj["apiVersion"].split("/")[0] == PROMETHEUS_OPERATOR_GROUP:
            # No schema for these: skipped here by name, checked by hand below.
            assert obj["apiVersion"] == f"{PROMETHEUS_OPERATOR_GROUP}/v1", obj["metadata"]
            assert obj["kind"] in PROMETHEUS_OPERATOR_KINDS, obj["kind"]
            operator_kinds.append(obj["kind"])
            continue
        for version in KUBERNETES_VERSIONS:
            kubernetes_validate.validate(obj, version, strict=True)
    assert sorted(operator_kinds) == ["PodMonitor", "PodMonitor", "PrometheusRule"]
    for monitor in of_kind(objects, "PodMonitor"):
        spec = monitor["spec"]
        assert set(spec) <= POD_MONITOR_SPEC_FIELDS, monitor["metadata"]["name"]
        assert spec["podMetricsEndpoints"], monitor["metadata"]["name"]
        for endpoint in spec["podMetricsEndpoints"]:
            assert set(endpoint) <= POD_METRICS_ENDPOINT_FIELDS, endpoint
            assert isinstance(endpoint["port"], str), endpoint
            assert endpoint["scheme"] in {"http", "https"}, endpoint
    # The component's rules are deploy/monitoring/alerts.yaml, unchanged but for blank lines
    # kustomize writes into folded expressions with indented lines (PromQL ignores them).
    alerts = yaml.safe_load((PARTS["monitoring"] / "alerts.yaml").read_text())
    assert without_expression_spacing(find(objects, "PrometheusRule", "labvirt")) == (
        without_expression_spacing(alerts)
    )
    # It adds its objects and changes none of the overlay's.
    production = {identity(obj): obj for obj in builds["production"]}
    added = sorted(identity(obj) for obj in objects if identity(obj) not in production)
    assert added == [
        ("NetworkPolicy", "labvirt", "labvirt-metrics-ingress"),
        ("PodMonitor", "labvirt", "labvirt-http"),
        ("PodMonitor", "labvirt", "labvirt-metrics"),
        ("PrometheusRule", "labvirt", "labvirt"),
    ]
    assert [obj for obj in objects if identity(obj) in production] == builds["production"]
