"""labvirt's metrics in a deployment: every process serves ``GET /metrics`` on a named port to
the scrape tokens of a Secret, keeps its shared metric files on an in-memory ``emptyDir``, and
components/monitoring scrapes those ports, past labvirt's network policies, from the namespace
``monitoring``.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator

import pytest

from shared.config import Settings
from tests.deploy.kustomize import (
    COMPONENTS,
    KUSTOMIZATIONS,
    LABVIRT_NAMESPACE,
    Manifest,
    build_overlay,
    find,
    memory,
    of_kind,
    pod_template,
    workloads,
)
from tests.deploy.netpol import Fence, Namespace, Pod, Policy, selector_matches

# These tests build the manifests with kubectl kustomize.
pytestmark = pytest.mark.kubectl

MONITORING_NAMESPACE = "monitoring"
METRICS_TOKENS = {"name": "labvirt-metrics-tokens", "key": "tokens"}
SCRAPE_CREDENTIALS = {"name": "labvirt-metrics-scrape", "key": "token"}
# Where each process serves /metrics: its HTTP port, or the metrics server of a Celery process.
SCRAPED_PORT = {
    "api": "http",
    "gateway": "http",
    "worker": "metrics",
    "prewarm-worker": "metrics",
    "beat": "metrics",
}
# The processes whose several processes share their series through LABVIRT_METRICS_DIR.
MULTIPROCESS = {"api", "worker", "prewarm-worker"}


@pytest.fixture(scope="module")
def monitored(tmp_path_factory: pytest.TempPathFactory) -> list[Manifest]:
    """The production overlay with components/monitoring."""
    return build_overlay(
        tmp_path_factory.mktemp("monitored"),
        resources=[KUSTOMIZATIONS["production"]],
        components=[COMPONENTS["monitoring"]],
    )


def component(workload: Manifest) -> str:
    return str(pod_template(workload)["metadata"]["labels"]["app.kubernetes.io/component"])


def labvirt_processes(objects: list[Manifest]) -> dict[str, Manifest]:
    """Each labvirt process's one container, by component."""
    found = {}
    for workload in workloads(objects):
        labels = pod_template(workload)["metadata"]["labels"]
        if labels.get("app.kubernetes.io/name") == "labvirt":
            (container,) = pod_template(workload)["spec"]["containers"]
            found[component(workload)] = container
    assert set(found) == set(SCRAPED_PORT)
    return found


def environment(objects: list[Manifest], container: Manifest) -> dict[str, str]:
    """The container's plain variables as the kubelet sets them: the ConfigMap's, then its own."""
    values: dict[str, str] = {}
    for source in container.get("envFrom") or []:
        if "configMapRef" in source:
            name = source["configMapRef"]["name"]
            values.update(find(objects, "ConfigMap", name).get("data") or {})
    for variable in container.get("env") or []:
        if "value" in variable:
            values[variable["name"]] = variable["value"]
    return values


def named_ports(container: Manifest) -> dict[str, tuple[str, int]]:
    return {
        port["name"]: (port.get("protocol", "TCP"), port["containerPort"])
        for port in container.get("ports") or []
        if "name" in port
    }


def test_every_process_takes_its_scrape_tokens_from_the_secret(built):
    for name, container in labvirt_processes(built).items():
        (variable,) = [v for v in container["env"] if v["name"] == "LABVIRT_METRICS_TOKENS"]
        # Like the other tokens: one key, never optional (a missing Secret stops the pod).
        assert variable["valueFrom"] == {"secretKeyRef": METRICS_TOKENS}, name


def test_celery_processes_expose_the_port_their_metrics_server_listens_on(built):
    for name, container in labvirt_processes(built).items():
        if SCRAPED_PORT[name] != "metrics":
            assert "metrics" not in named_ports(container), name
            continue
        configured = environment(built, container).get("LABVIRT_METRICS_PORT")
        port = Settings.metrics_port if configured is None else int(configured)
        assert port != 0, f"{name}: LABVIRT_METRICS_PORT=0 serves no metrics"
        assert named_ports(container)["metrics"] == ("TCP", port), name


def test_shared_metric_files_live_on_an_in_memory_empty_dir(built):
    processes = labvirt_processes(built)
    pods = {component(w): pod_template(w)["spec"] for w in workloads(built)}
    for name in MULTIPROCESS:
        container = processes[name]
        directory = environment(built, container).get("LABVIRT_METRICS_DIR")
        assert directory, f"{name}: LABVIRT_METRICS_DIR unset, the files would go to /tmp"
        (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == directory]
        assert not mount.get("readOnly"), name
        assert "subPath" not in mount, name
        volumes = {volume["name"]: volume for volume in pods[name]["volumes"]}
        empty_dir = volumes[mount["name"]]["emptyDir"]
        assert empty_dir["medium"] == "Memory", name
        # Memory volumes count against the container's memory: small, and well under its limit.
        in_memory = sum(
            memory(volume["emptyDir"]["sizeLimit"])
            for volume in volumes.values()
            if (volume.get("emptyDir") or {}).get("medium") == "Memory"
        )
        assert memory(empty_dir["sizeLimit"]) <= memory("64Mi"), name
        assert in_memory <= memory(container["resources"]["limits"]["memory"]) // 4, name


def pod_monitors(objects: list[Manifest]) -> list[Manifest]:
    monitors = of_kind(objects, "PodMonitor")
    assert monitors
    return monitors


def selected(monitor: Manifest, objects: list[Manifest]) -> list[Manifest]:
    """The workloads whose pods the PodMonitor selects (its own namespace: no namespaceSelector)."""
    assert "namespaceSelector" not in monitor["spec"]
    return [
        workload
        for workload in workloads(objects)
        if workload["metadata"]["namespace"] == monitor["metadata"]["namespace"]
        and selector_matches(
            monitor["spec"]["selector"], pod_template(workload)["metadata"]["labels"]
        )
    ]


def endpoints(monitor: Manifest) -> Iterator[Manifest]:
    yield from monitor["spec"]["podMetricsEndpoints"]


def test_every_pod_monitor_endpoint_names_a_port_of_every_pod_it_selects(monitored):
    for monitor in pod_monitors(monitored):
        chosen = selected(monitor, monitored)
        assert chosen, monitor["metadata"]["name"]
        for endpoint in endpoints(monitor):
            assert endpoint["path"] == "/metrics"
            for workload in chosen:
                ports = {
                    name
                    for container in pod_template(workload)["spec"]["containers"]
                    for name in named_ports(container)
                }
                assert endpoint["port"] in ports, (monitor["metadata"]["name"], component(workload))


def test_every_process_is_scraped_once_on_its_port_with_the_scrape_token(monitored):
    scraped: list[tuple[str, str]] = []
    for monitor in pod_monitors(monitored):
        assert monitor["metadata"]["namespace"] == LABVIRT_NAMESPACE
        for endpoint in endpoints(monitor):
            assert endpoint["authorization"] == {
                "type": "Bearer",
                "credentials": SCRAPE_CREDENTIALS,
            }
            scraped += [(component(w), endpoint["port"]) for w in selected(monitor, monitored)]
    assert sorted(scraped) == sorted(SCRAPED_PORT.items())


def fence(objects: list[Manifest]) -> tuple[Fence, dict[str, Pod]]:
    """labvirt's pods, a scraper in the monitoring namespace and a pod of another namespace."""
    ips = (str(ip) for ip in ipaddress.ip_network("10.244.0.0/24").hosts())
    pods = {
        component(workload): Pod(
            name=component(workload),
            namespace=workload["metadata"]["namespace"],
            labels=pod_template(workload)["metadata"]["labels"],
            ip=next(ips),
            named_ports={
                name: port
                for container in pod_template(workload)["spec"]["containers"]
                for name, port in named_ports(container).items()
            },
        )
        for workload in workloads(objects)
    }
    pods["prometheus"] = Pod(
        "prometheus", MONITORING_NAMESPACE, {"app.kubernetes.io/name": "prometheus"}, next(ips)
    )
    pods["other app"] = Pod("other app", "default", {"app": "shop"}, next(ips))
    namespaces = [
        Namespace(o["metadata"]["name"], o["metadata"].get("labels") or {})
        for o in of_kind(objects, "Namespace")
    ]
    namespaces += [Namespace(MONITORING_NAMESPACE), Namespace("default")]
    policies = [Policy.from_manifest(p) for p in of_kind(objects, "NetworkPolicy")]
    return Fence(namespaces=namespaces, policies=policies, ipblock_matches_pods=False), pods


def scrape_targets(objects: list[Manifest], pods: dict[str, Pod]) -> Iterator[tuple[Pod, int]]:
    """Each scraped pod and the port number its PodMonitor endpoint names."""
    for monitor in pod_monitors(objects):
        for endpoint in endpoints(monitor):
            for workload in selected(monitor, objects):
                pod = pods[component(workload)]
                protocol, number = pod.named_ports[endpoint["port"]]
                assert protocol == "TCP"
                yield pod, number


def test_the_monitoring_namespace_reaches_every_scraped_port(monitored):
    cluster, pods = fence(monitored)
    targets = list(scrape_targets(monitored, pods))
    assert len(targets) == len(SCRAPED_PORT)
    for pod, port in targets:
        verdict = cluster.connection(pods["prometheus"], pod, port)
        assert verdict, f"prometheus -> {pod} {port} denied: {verdict}"
        if port == Settings.metrics_port:
            # Only the monitoring namespace: the metrics servers are not the api's open port.
            assert not cluster.allows(pods["other app"], pod, port), pod
        # Nothing else of the pod opens with it.
        assert not cluster.allows(pods["prometheus"], pod, 9999), pod


def test_without_the_component_the_metrics_servers_stay_closed(builds, monitored):
    cluster, pods = fence(builds["production"])
    _, monitored_pods = fence(monitored)
    for pod, port in scrape_targets(monitored, monitored_pods):
        if SCRAPED_PORT[pod.name] == "metrics":
            assert not cluster.allows(pods["prometheus"], pods[pod.name], port), pod
