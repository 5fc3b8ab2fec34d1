"""Every pod is hardened, sized and probed; secrets reach only the processes that use them."""

from __future__ import annotations

import re

import pytest

from tests.deploy.kustomize import (
    ENVIRONMENTS_NAMESPACE,
    LABVIRT_NAMESPACE,
    containers,
    cpu,
    find,
    memory,
    of_kind,
    pod_template,
    secret_references,
    workloads,
)
from tests.deploy.netpol import selector_matches

# These tests build the manifests with kubectl kustomize.
pytestmark = pytest.mark.kubectl

DIGEST = re.compile(r"@sha256:[0-9a-f]{64}$")
METRICS_TOKENS = ("labvirt-metrics-tokens", "tokens")
# Which Secret (name, key) each process gets, and no other.
SECRETS_BY_COMPONENT = {
    "api": {
        ("labvirt-redis", "password"),
        ("labvirt-frontend-tokens", "tokens"),
        ("labvirt-admin-tokens", "tokens"),
        METRICS_TOKENS,
    },
    "gateway": {
        ("labvirt-redis", "password"),
        ("labvirt-frontend-tokens", "tokens"),
        METRICS_TOKENS,
    },
    "worker": {("labvirt-redis", "password"), METRICS_TOKENS},
    "prewarm-worker": {("labvirt-redis", "password"), METRICS_TOKENS},
    "beat": {("labvirt-redis", "password"), METRICS_TOKENS},
    "redis": {("labvirt-redis", "password")},
}
LABVIRT_COMPONENTS = {"api", "gateway", "worker", "prewarm-worker", "beat"}


def component(workload) -> str:
    return pod_template(workload)["metadata"]["labels"]["app.kubernetes.io/component"]


def by_component(objects):
    return {component(w): w for w in workloads(objects)}


def setting(pod_spec, container, key):
    """A security setting as the kubelet resolves it: the container's, else the pod's."""
    value = (container.get("securityContext") or {}).get(key)
    if value is None:
        value = (pod_spec.get("securityContext") or {}).get(key)
    return value


def test_every_workload_lives_in_labvirts_namespace(built):
    assert {w["metadata"]["namespace"] for w in workloads(built)} == {LABVIRT_NAMESPACE}
    assert set(by_component(built)) == LABVIRT_COMPONENTS | {"redis"}


def test_every_container_is_hardened(built):
    for workload in workloads(built):
        spec = pod_template(workload)["spec"]
        for flag in ("hostNetwork", "hostPID", "hostIPC"):
            assert not spec.get(flag), (workload["metadata"]["name"], flag)
        assert not [v for v in spec.get("volumes") or [] if "hostPath" in v]
        for container in containers(spec):
            where = (workload["metadata"]["name"], container["name"])
            context = container.get("securityContext") or {}
            assert setting(spec, container, "runAsNonRoot") is True, where
            user = setting(spec, container, "runAsUser")
            assert isinstance(user, int), where
            assert user > 0, where
            assert context.get("readOnlyRootFilesystem") is True, where
            assert context.get("allowPrivilegeEscalation") is False, where
            assert context.get("privileged") is not True, where
            assert context.get("capabilities") == {"drop": ["ALL"]}, where
            assert setting(spec, container, "seccompProfile") == {"type": "RuntimeDefault"}, where


def test_every_container_has_requests_and_limits(built):
    for workload in workloads(built):
        for container in containers(pod_template(workload)["spec"]):
            where = (workload["metadata"]["name"], container["name"])
            resources = container.get("resources") or {}
            for resource, parse in (("cpu", cpu), ("memory", memory)):
                request = resources.get("requests", {}).get(resource)
                limit = resources.get("limits", {}).get(resource)
                assert request is not None, (*where, "request", resource)
                assert limit is not None, (*where, "limit", resource)
                assert parse(request) <= parse(limit), (*where, resource)


def test_every_container_has_liveness_and_readiness_probes(built):
    for workload in workloads(built):
        for container in pod_template(workload)["spec"]["containers"]:
            where = (workload["metadata"]["name"], container["name"])
            assert container.get("livenessProbe"), where
            assert container.get("readinessProbe"), where


def http_probe(container, probe):
    handler = container[probe]["httpGet"]
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    port = handler["port"]
    return handler["path"], ports.get(port, port)


def test_http_processes_are_probed_where_they_listen(built):
    workloads_ = by_component(built)
    (api,) = pod_template(workloads_["api"])["spec"]["containers"]
    (gateway,) = pod_template(workloads_["gateway"])["spec"]["containers"]
    assert http_probe(api, "readinessProbe") == ("/readyz", 8080)
    assert http_probe(api, "livenessProbe") == ("/healthz", 8080)
    assert http_probe(gateway, "readinessProbe") == ("/healthz", 8081)
    assert http_probe(gateway, "livenessProbe") == ("/healthz", 8081)
    env = {variable["name"]: variable.get("value") for variable in gateway["env"]}
    assert env["LABVIRT_GATEWAY_PORT"] == "8081"
    assert gateway["args"] == ["gateway"]


def test_celery_processes_probe_redis_cheaply(built):
    for name in ("worker", "prewarm-worker", "beat"):
        (container,) = pod_template(by_component(built)[name])["spec"]["containers"]
        for probe in ("livenessProbe", "readinessProbe"):
            command = container[probe]["exec"]["command"]
            assert command[:2] == ["python", "-c"], (name, probe)
            assert "REDIS_URL" in command[2]
            assert ".ping()" in command[2]
            assert "inspect" not in " ".join(command)
        # Liveness is far more patient than readiness: never restart a merely busy worker.
        live, ready = container["livenessProbe"], container["readinessProbe"]
        assert live["periodSeconds"] * live["failureThreshold"] >= 300
        assert live["periodSeconds"] * live["failureThreshold"] > (
            ready["periodSeconds"] * ready["failureThreshold"]
        )


def test_labvirt_processes_write_only_to_an_empty_dir_at_tmp(built):
    for name in LABVIRT_COMPONENTS:
        spec = pod_template(by_component(built)[name])["spec"]
        volumes = {volume["name"]: volume for volume in spec["volumes"]}
        (container,) = spec["containers"]
        mounts = {mount["mountPath"]: mount["name"] for mount in container["volumeMounts"]}
        assert "emptyDir" in volumes[mounts["/tmp"]], name


def test_redis_keeps_an_append_only_file_on_its_own_volume(built):
    redis = find(built, "StatefulSet", "redis")
    (container,) = pod_template(redis)["spec"]["containers"]
    args = container["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    assert args[args.index("--requirepass") + 1] == "$(REDIS_PASSWORD)"
    assert args[args.index("--maxmemory-policy") + 1] == "noeviction"
    assert args[args.index("--dir") + 1] == "/data"
    mounts = {mount["mountPath"]: mount["name"] for mount in container["volumeMounts"]}
    claims = {claim["metadata"]["name"] for claim in redis["spec"]["volumeClaimTemplates"]}
    assert mounts["/data"] in claims
    assert redis["spec"]["replicas"] == 1


def test_secrets_reach_only_the_processes_that_use_them(built):
    assert of_kind(built, "Secret") == [], "the operator creates the Secrets, never the manifests"
    for workload in workloads(built):
        name = component(workload)
        references = {(secret, key) for _, secret, key in secret_references([workload])}
        assert references == SECRETS_BY_COMPONENT[name], name
        for container in containers(pod_template(workload)["spec"]):
            assert not [s for s in container.get("envFrom") or [] if "secretRef" in s], name
            for variable in container.get("env") or []:
                reference = (variable.get("valueFrom") or {}).get("secretKeyRef")
                if reference:
                    # A missing Secret must stop the pod, never start it without a token.
                    assert reference.get("optional") is not True, (name, variable["name"])


def test_redis_url_carries_the_password_from_the_secret(built):
    config = find(built, "ConfigMap", "labvirt")["data"]
    assert "REDIS_URL" not in config
    for name in LABVIRT_COMPONENTS:
        (container,) = pod_template(by_component(built)[name])["spec"]["containers"]
        names = [variable["name"] for variable in container["env"]]
        # $(VAR) expands only variables defined before it.
        assert names.index("REDIS_PASSWORD") < names.index("REDIS_URL"), name
        url = container["env"][names.index("REDIS_URL")]["value"]
        assert url == "redis://:$(REDIS_PASSWORD)@redis:6379/0", name


def test_production_images_are_pinned_by_digest(builds):
    for workload in workloads(builds["production"]):
        for container in containers(pod_template(workload)["spec"]):
            assert DIGEST.search(container["image"]), container["image"]


def test_no_build_runs_an_untagged_or_latest_image(built):
    for workload in workloads(built):
        for container in containers(pod_template(workload)["spec"]):
            image = container["image"]
            assert "@sha256:" in image or re.search(r":[\w.-]+$", image), image
            assert not image.endswith(":latest"), image


def test_disruption_budgets_cover_the_serving_processes(built):
    budgets = of_kind(built, "PodDisruptionBudget")
    covered = set()
    for budget in budgets:
        assert budget["spec"].get("maxUnavailable") == 1, budget["metadata"]["name"]
        for workload in workloads(built):
            if selector_matches(
                budget["spec"]["selector"], pod_template(workload)["metadata"]["labels"]
            ):
                covered.add(component(workload))
    assert covered == {"api", "gateway", "worker", "prewarm-worker"}


def test_workers_scale_with_an_autoscaler_that_owns_their_replicas(built):
    (autoscaler,) = of_kind(built, "HorizontalPodAutoscaler")
    target = autoscaler["spec"]["scaleTargetRef"]
    assert target == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "labvirt-worker"}
    assert "replicas" not in find(built, "Deployment", "labvirt-worker")["spec"]
    assert 1 <= autoscaler["spec"]["minReplicas"] <= autoscaler["spec"]["maxReplicas"]


def test_production_runs_more_of_everything(builds):
    production = builds["production"]
    assert find(production, "Deployment", "labvirt-api")["spec"]["replicas"] >= 3
    assert find(production, "Deployment", "labvirt-gateway")["spec"]["replicas"] >= 3
    autoscaler = find(production, "HorizontalPodAutoscaler", "labvirt-worker")["spec"]
    assert autoscaler["minReplicas"] >= 3
    assert autoscaler["maxReplicas"] > autoscaler["minReplicas"]


def test_beat_is_a_single_scheduler(built):
    beat = find(built, "Deployment", "labvirt-beat")["spec"]
    assert beat["replicas"] == 1
    assert beat["strategy"] == {"type": "Recreate"}
    assert not [
        a
        for a in of_kind(built, "HorizontalPodAutoscaler")
        if a["spec"]["scaleTargetRef"]["name"] == "labvirt-beat"
    ]


def test_services_reach_named_ports_of_their_pods(built):
    for service in of_kind(built, "Service"):
        selected = [
            w
            for w in workloads(built)
            if selector_matches(
                {"matchLabels": service["spec"]["selector"]}, pod_template(w)["metadata"]["labels"]
            )
        ]
        assert len(selected) == 1, service["metadata"]["name"]
        ports = {
            port["name"]: port["containerPort"]
            for container in pod_template(selected[0])["spec"]["containers"]
            for port in container.get("ports") or []
        }
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in ports, service["metadata"]["name"]


def ingress_routes(objects):
    """(regex, service) in ingress-nginx's order: with use-regex on the host, every path is a
    case-insensitive regex anchored at the start, and longer paths are tried first."""
    routes = []
    for ingress in of_kind(objects, "Ingress"):
        for rule in ingress["spec"]["rules"]:
            for path in rule["http"]["paths"]:
                routes.append((path["path"], path["backend"]["service"]["name"]))
    routes.sort(key=lambda route: len(route[0]), reverse=True)
    return [(re.compile("^" + path, re.IGNORECASE), service) for path, service in routes]


def route(objects, path):
    for pattern, service in ingress_routes(objects):
        if pattern.search(path):
            return service
    return None


@pytest.mark.parametrize(
    ("path", "service"),
    [
        ("/v1/sessions/s-0123456789abcdef01234567/events", "labvirt-gateway"),
        ("/v1/sessions/s-0123456789abcdef01234567/terminal", "labvirt-gateway"),
        ("/ui", "labvirt-gateway"),
        ("/ui/", "labvirt-gateway"),
        ("/ui/app.js", "labvirt-gateway"),
        ("/ui/ops", "labvirt-api"),
        ("/ui/ops/", "labvirt-api"),
        ("/ui/ops/static/ops.css", "labvirt-api"),
        ("/ui/ops/failed/f-0123456789abcdef0123/requeue", "labvirt-api"),
        ("/ui/opsx", "labvirt-gateway"),
        ("/v1/sessions", "labvirt-api"),
        ("/v1/sessions/s-0123456789abcdef01234567", "labvirt-api"),
        ("/v1/sessions/s-0123456789abcdef01234567/heartbeat", "labvirt-api"),
        ("/v1/sessions/s-0123456789abcdef01234567/events/more", "labvirt-api"),
        ("/v1/sessions//events", "labvirt-api"),
        ("/v1/templates", "labvirt-api"),
        ("/v1/admin/pools", "labvirt-api"),
        ("/healthz", "labvirt-api"),
        ("/uix", "labvirt-api"),
    ],
)
def test_ingress_routes_long_lived_connections_to_the_gateway(builds, path, service):
    assert route(builds["production"], path) == service


def test_gateway_ingress_keeps_connections_open_and_unbuffered(built):
    gateway = find(built, "Ingress", "labvirt-gateway")
    annotations = gateway["metadata"]["annotations"]
    assert annotations["nginx.ingress.kubernetes.io/use-regex"] == "true"
    assert int(annotations["nginx.ingress.kubernetes.io/proxy-read-timeout"]) >= 3600
    assert int(annotations["nginx.ingress.kubernetes.io/proxy-send-timeout"]) >= 3600
    assert annotations["nginx.ingress.kubernetes.io/proxy-buffering"] == "off"
    for ingress in of_kind(built, "Ingress"):
        assert ingress["spec"]["ingressClassName"] == "nginx"
        for rule in ingress["spec"]["rules"]:
            for path in rule["http"]["paths"]:
                service = find(built, "Service", path["backend"]["service"]["name"])
                names = {port["name"] for port in service["spec"]["ports"]}
                assert path["backend"]["service"]["port"]["name"] in names


def test_namespaced_objects_stay_in_labvirts_two_namespaces(built):
    for obj in built:
        if obj["kind"] in {"Namespace", "KubeVirt"}:
            continue
        assert obj["metadata"].get("namespace") in {LABVIRT_NAMESPACE, ENVIRONMENTS_NAMESPACE}, obj[
            "metadata"
        ]
