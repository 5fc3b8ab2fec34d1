"""The network fence, checked by connectivity analysis of the built manifests.

A model cluster holds labvirt's pods as the manifests define them, learners' VMs labelled by
labvirt's own manifest builders (their virt-launcher pods copy the VMI's labels), the
per-environment policy the same builders make for each multi-VM environment (what the
provisioner creates; deploy/examples holds one, checked equal to the builder's), kube-dns, an
ingress controller, and a few outside addresses. The evaluator in netpol.py answers each
connection; every property is checked under both readings the API allows of whether an ipBlock
also matches pod addresses.
"""

from __future__ import annotations

import copy
import ipaddress
import itertools
from dataclasses import dataclass

import pytest
import yaml

from shared.adapters.template_files import load_templates
from shared.domain.manifests import (
    build_environment,
    build_headless_service,
    build_network_policy,
    parse_timestamp,
)
from tests.deploy.kustomize import (
    COMPONENTS,
    ENV_POLICY_EXAMPLE,
    ENVIRONMENTS_NAMESPACE,
    KUSTOMIZATIONS,
    LABVIRT_NAMESPACE,
    Manifest,
    build_overlay,
    of_kind,
    pod_template,
    workloads,
)
from tests.deploy.netpol import Address, Fence, Namespace, Pod, Policy

# These tests build the manifests with kubectl kustomize.
pytestmark = pytest.mark.kubectl

EXAMPLE_ENVIRONMENT = "3f9a1c7e42"
EXAMPLE_TEMPLATE = "kubernetes"
TOKEN = "abcdef.0123456789abcdef"
# What KubeVirt adds to the VMI's labels on its virt-launcher pod.
LAUNCHER_LABELS = {"kubevirt.io": "virt-launcher", "kubevirt.io/created-by": "0000-uid"}

INTERNET = [Address("example.com", "93.184.216.34"), Address("1.1.1.1", "1.1.1.1")]
METADATA = Address("cloud metadata", "169.254.169.254")
PRIVATE = [
    Address("10/8 low", "10.0.0.1"),
    Address("10/8 high", "10.255.255.254"),
    Address("172.16/12", "172.16.0.1"),
    Address("172.16/12 high", "172.31.255.254"),
    Address("192.168/16", "192.168.1.1"),
    Address("shared 100.64/10", "100.64.0.1"),
    Address("link-local", "169.254.0.1"),
]


@dataclass
class Model:
    fence: Fence
    pods: dict[str, Pod]
    apiserver: list[Address]


def environment_policy(environment_id: str, template: str) -> Manifest:
    """What the provisioner creates for a multi-VM environment (the example is one of them)."""
    return build_network_policy(
        environment_id=environment_id, namespace=ENVIRONMENTS_NAMESPACE, template_name=template
    )


def vm_pods(environment_id, template, *, session, ips) -> list[Pod]:
    extra = None if session else {"labvirt.io/pool": template.name}
    manifests = build_environment(
        template=template,
        environment_id=environment_id,
        namespace=ENVIRONMENTS_NAMESPACE,
        session_id=session,
        environment_token=TOKEN,
        extra_labels=extra,
    )
    return [
        Pod(
            name=vmi["metadata"]["name"],
            namespace=ENVIRONMENTS_NAMESPACE,
            labels={
                **vmi["metadata"]["labels"],
                **LAUNCHER_LABELS,
                "vm.kubevirt.io/name": vmi["spec"]["hostname"],
            },
            ip=next(ips),
        )
        for vmi in manifests.vmis
    ]


def labvirt_pods(objects, ips) -> list[Pod]:
    pods = []
    for workload in workloads(objects):
        template = pod_template(workload)
        named = {
            port["name"]: (port.get("protocol", "TCP"), port["containerPort"])
            for container in template["spec"]["containers"]
            for port in container.get("ports") or []
        }
        pods.append(
            Pod(
                name=template["metadata"]["labels"]["app.kubernetes.io/component"],
                namespace=workload["metadata"]["namespace"],
                labels=template["metadata"]["labels"],
                ip=next(ips),
                named_ports=named,
            )
        )
    return pods


def model(objects, *, ipblock_matches_pods, pod_cidr, apiserver) -> Model:
    templates = load_templates(None)
    ips = (str(ip) for ip in itertools.islice(ipaddress.ip_network(pod_cidr).hosts(), 1, None))
    pods: dict[str, Pod] = {pod.name: pod for pod in labvirt_pods(objects, ips)}
    environments = {
        # environment id: (template, session or None for a warm pool's environment)
        "aaaaaaaaaa": ("kubernetes", "s-aaaaaaaaaaaaaaaaaaaaaaaa"),
        "bbbbbbbbbb": ("kubernetes", "s-bbbbbbbbbbbbbbbbbbbbbbbb"),
        "cccccccccc": ("ubuntu", "s-cccccccccccccccccccccccc"),
        "dddddddddd": ("kubernetes", None),
    }
    policies = [Policy.from_manifest(p) for p in of_kind(objects, "NetworkPolicy")]
    for environment_id, (template_name, session) in environments.items():
        template = templates[template_name]
        for index, pod in enumerate(vm_pods(environment_id, template, session=session, ips=ips)):
            pods[f"vm {environment_id[0]}{index + 1}"] = pod
        if template.is_multi_vm:
            policies.append(Policy.from_manifest(environment_policy(environment_id, template_name)))
    extra = [
        Pod(
            "kube-dns",
            "kube-system",
            {"k8s-app": "kube-dns"},
            next(ips),
            {"dns": ("UDP", 53), "dns-tcp": ("TCP", 53), "metrics": ("TCP", 9153)},
        ),
        Pod(
            "ingress-nginx", "ingress-nginx", {"app.kubernetes.io/name": "ingress-nginx"}, next(ips)
        ),
        Pod("other app", "default", {"app": "shop"}, next(ips)),
        Pod("stray pod", ENVIRONMENTS_NAMESPACE, {"app": "debug"}, next(ips)),
        Pod("virt-handler", "kubevirt", {"kubevirt.io": "virt-handler"}, next(ips)),
    ]
    pods.update({pod.name: pod for pod in extra})
    namespaces = [
        Namespace(o["metadata"]["name"], o["metadata"].get("labels") or {})
        for o in of_kind(objects, "Namespace")
    ]
    namespaces += [
        Namespace(name) for name in ("kube-system", "ingress-nginx", "default", "kubevirt")
    ]
    fence = Fence(
        namespaces=namespaces, policies=policies, ipblock_matches_pods=ipblock_matches_pods
    )
    return Model(fence=fence, pods=pods, apiserver=apiserver)


@pytest.fixture(params=[True, False], ids=["ipblock-matches-pods", "ipblock-outside-only"])
def cluster(request, built) -> Model:
    return model(
        built,
        ipblock_matches_pods=request.param,
        pod_cidr="10.244.0.0/16",
        # The kubernetes Service's address and a control-plane node's (kind, kubeadm).
        apiserver=[Address("apiserver service", "10.96.0.1"), Address("apiserver", "172.18.0.2")],
    )


def vms(cluster: Model) -> list[Pod]:
    return [pod for name, pod in cluster.pods.items() if name.startswith("vm ")]


def labvirt(cluster: Model) -> list[Pod]:
    return [pod for pod in cluster.pods.values() if pod.namespace == LABVIRT_NAMESPACE]


def assert_allowed(cluster, source, destination, port, protocol="TCP"):
    verdict = cluster.fence.connection(source, destination, port, protocol)
    assert verdict, f"{source} -> {destination} {protocol}/{port} denied: {verdict}"


def assert_denied(cluster, source, destination, port, protocol="TCP"):
    verdict = cluster.fence.connection(source, destination, port, protocol)
    assert not verdict, f"{source} -> {destination} {protocol}/{port} allowed: {verdict}"


PEER_PORTS = [("TCP", 22), ("TCP", 6443), ("TCP", 10250), ("UDP", 8472), ("TCP", 30000)]


def test_a_vm_reaches_the_vms_of_its_environment_on_any_port(cluster):
    for first, second in (("vm a1", "vm a2"), ("vm b1", "vm b2"), ("vm d1", "vm d2")):
        for protocol, port in PEER_PORTS:
            assert_allowed(cluster, cluster.pods[first], cluster.pods[second], port, protocol)
            assert_allowed(cluster, cluster.pods[second], cluster.pods[first], port, protocol)


def test_a_vm_never_reaches_another_environments_vms(cluster):
    for source, destination in itertools.permutations(vms(cluster), 2):
        if source.labels["labvirt.io/environment"] == destination.labels["labvirt.io/environment"]:
            continue
        for protocol, port in PEER_PORTS:
            assert_denied(cluster, source, destination, port, protocol)


def test_a_vm_resolves_names_with_kube_dns_and_nothing_else_there(cluster):
    dns = cluster.pods["kube-dns"]
    for vm in vms(cluster):
        assert_allowed(cluster, vm, dns, 53, "UDP")
        assert_allowed(cluster, vm, dns, 53, "TCP")
        assert_denied(cluster, vm, dns, 9153)


def test_a_vm_reaches_the_internet(cluster):
    for vm in vms(cluster):
        for address in INTERNET:
            for protocol, port in (("TCP", 443), ("TCP", 80), ("UDP", 123), ("TCP", 22)):
                assert_allowed(cluster, vm, address, port, protocol)


def test_a_vm_never_reaches_private_metadata_or_apiserver_addresses(cluster):
    for vm in vms(cluster):
        for address in [*PRIVATE, METADATA, *cluster.apiserver]:
            for port in (80, 443, 6443):
                assert_denied(cluster, vm, address, port)


def test_a_vm_never_reaches_labvirt_or_other_pods(cluster):
    others = [*labvirt(cluster), cluster.pods["other app"], cluster.pods["stray pod"]]
    others += [cluster.pods["ingress-nginx"], cluster.pods["virt-handler"]]
    for vm in vms(cluster):
        for pod in others:
            for port in (6379, 8080, 8081, 80, 443, 8186):
                assert_denied(cluster, vm, pod, port)


def test_nothing_outside_an_environment_reaches_its_vms(cluster):
    # Not the gateway either: the console runs API server -> virt-handler -> the launcher's
    # socket, never over the pod network.
    outsiders = [*labvirt(cluster), *INTERNET, METADATA, cluster.pods["ingress-nginx"]]
    outsiders += [cluster.pods["other app"], cluster.pods["stray pod"], cluster.pods["kube-dns"]]
    outsiders += [cluster.pods["virt-handler"]]
    for vm in vms(cluster):
        for source in outsiders:
            for port in (22, 80, 443, 6443):
                assert_denied(cluster, source, vm, port)


def test_anything_else_in_the_vms_namespace_is_cut_off(cluster):
    stray = cluster.pods["stray pod"]
    for destination in [
        *INTERNET,
        cluster.pods["kube-dns"],
        cluster.pods["vm a1"],
        *labvirt(cluster),
    ]:
        assert_denied(cluster, stray, destination, 443)
        assert_denied(cluster, stray, destination, 53, "UDP")


def test_only_labvirt_processes_reach_redis(cluster):
    redis = cluster.pods["redis"]
    for pod in labvirt(cluster):
        if pod is not redis:
            assert_allowed(cluster, pod, redis, 6379)
            assert_denied(cluster, pod, redis, 6380)
    for name in ("other app", "ingress-nginx", "stray pod", "kube-dns", "virt-handler"):
        assert_denied(cluster, cluster.pods[name], redis, 6379)
    for address in [*INTERNET, *PRIVATE]:
        assert_denied(cluster, address, redis, 6379)


def test_redis_reaches_nothing(cluster):
    redis = cluster.pods["redis"]
    destinations = [*INTERNET, *cluster.apiserver, cluster.pods["kube-dns"], *vms(cluster)]
    for destination in destinations:
        assert_denied(cluster, redis, destination, 443)
        assert_denied(cluster, redis, destination, 53, "UDP")


def test_http_reaches_the_api_and_gateway_on_their_ports_only(cluster):
    api, gateway = cluster.pods["api"], cluster.pods["gateway"]
    controller = cluster.pods["ingress-nginx"]
    assert_allowed(cluster, controller, api, 8080)
    assert_allowed(cluster, controller, gateway, 8081)
    assert_denied(cluster, controller, api, 8081)
    assert_denied(cluster, controller, gateway, 8080)
    for name in ("worker", "prewarm-worker", "beat"):
        assert_denied(cluster, controller, cluster.pods[name], 8080)


def test_api_and_beat_reach_only_redis_and_dns(cluster):
    for name in ("api", "beat"):
        pod = cluster.pods[name]
        assert_allowed(cluster, pod, cluster.pods["redis"], 6379)
        assert_allowed(cluster, pod, cluster.pods["kube-dns"], 53, "UDP")
        for destination in [*INTERNET, *cluster.apiserver, METADATA, cluster.pods["other app"]]:
            assert_denied(cluster, pod, destination, 443)


def test_workers_and_gateway_reach_the_kubernetes_api(cluster):
    for name in ("worker", "prewarm-worker", "gateway"):
        for address in cluster.apiserver:
            assert_allowed(cluster, cluster.pods[name], address, 443)
            assert_allowed(cluster, cluster.pods[name], address, 6443)


def test_a_cluster_with_public_ranges_is_fenced_by_its_overlay_values(tmp_path):
    # Pods, Services and the API server on addresses no fixed private range covers: only the
    # overlay's cluster-network values keep the VMs from them.
    config = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": "labvirt-cluster-network",
            "annotations": {"config.kubernetes.io/local-config": "true"},
        },
        "data": {
            "pod-cidr": "198.18.0.0/16",
            "service-cidr": "198.19.0.0/16",
            "apiserver-cidr": "203.0.113.10/32",
        },
    }
    objects = build_overlay(
        tmp_path,
        resources=[KUSTOMIZATIONS["base"]],
        components=[COMPONENTS["cluster-network"]],
        files={"cluster-network.yaml": yaml.safe_dump(config)},
    )
    apiserver = [Address("apiserver service", "198.19.0.1"), Address("apiserver", "203.0.113.10")]
    for matches_pods in (True, False):
        cluster = model(
            objects,
            ipblock_matches_pods=matches_pods,
            pod_cidr="198.18.0.0/16",
            apiserver=apiserver,
        )
        for vm in vms(cluster):
            for address in apiserver:
                assert_denied(cluster, vm, address, 443)
            assert_denied(cluster, vm, cluster.pods["other app"], 80)
            assert_allowed(cluster, vm, INTERNET[0], 443)
        assert_allowed(cluster, cluster.pods["vm a1"], cluster.pods["vm a2"], 6443)


def test_example_policy_is_named_and_labelled_like_the_environments_service():
    """The provisioner builds the policy beside the headless Service: same name, same labels."""
    example = yaml.safe_load(ENV_POLICY_EXAMPLE.read_text())
    service = build_headless_service(
        environment_id=EXAMPLE_ENVIRONMENT,
        namespace=ENVIRONMENTS_NAMESPACE,
        template_name=EXAMPLE_TEMPLATE,
    )
    assert example["metadata"]["name"] == service["metadata"]["name"]
    assert example["metadata"]["namespace"] == service["metadata"]["namespace"]
    assert example["metadata"]["labels"] == service["metadata"]["labels"]
    selector = {"matchLabels": copy.deepcopy(service["metadata"]["labels"])}
    del selector["matchLabels"]["labvirt.io/template"]
    assert example["spec"]["podSelector"] == selector
    assert example["spec"]["ingress"] == [{"from": [{"podSelector": selector}]}]
    assert example["spec"]["egress"] == [{"to": [{"podSelector": selector}]}]
    assert example["spec"]["policyTypes"] == ["Ingress", "Egress"]


def test_example_policy_is_what_the_provisioner_builds():
    """The doc's example and the builder cannot drift apart: same environment, same object."""
    example = yaml.safe_load(ENV_POLICY_EXAMPLE.read_text())
    created_at = parse_timestamp(example["metadata"]["annotations"]["labvirt.io/created-at"])

    built = build_network_policy(
        environment_id=EXAMPLE_ENVIRONMENT,
        namespace=ENVIRONMENTS_NAMESPACE,
        template_name=EXAMPLE_TEMPLATE,
        created_at=created_at,
    )

    assert built == example
    # And a kubernetes environment's build carries exactly that policy.
    manifests = build_environment(
        template=load_templates(None)[EXAMPLE_TEMPLATE],
        environment_id=EXAMPLE_ENVIRONMENT,
        namespace=ENVIRONMENTS_NAMESPACE,
        session_id=None,
        environment_token=TOKEN,
        created_at=created_at,
    )
    assert manifests.network_policy == example
