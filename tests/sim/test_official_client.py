"""The official ``kubernetes`` Python client, unmodified, against the simulator subprocess."""

from __future__ import annotations

import json
import threading

import pytest
from kubernetes import client, watch
from kubernetes.client.rest import ApiException
from kubernetes.dynamic import DynamicClient

from labvirt.sim.testing import running_simulator, wait_until

GROUP, VERSION, PLURAL = "kubevirt.io", "v1", "virtualmachineinstances"


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    with running_simulator(
        tmp_path_factory.mktemp("sim"), boot_seconds=1, time_scale=0.2, seed=5, bookmark_seconds=0.2
    ) as handle:
        yield handle


@pytest.fixture(scope="module")
def api(sim):
    with sim.api_client() as api_client:
        yield client.CustomObjectsApi(api_client)


def vmi(name, **labels):
    return {
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachineInstance",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "domain": {
                "devices": {"disks": [{"name": "containerdisk", "disk": {"bus": "virtio"}}]},
                "resources": {"requests": {"memory": "64Mi"}},
            },
            "volumes": [
                {
                    "name": "containerdisk",
                    "containerDisk": {"image": "quay.io/containerdisks/cirros:latest"},
                }
            ],
        },
    }


def create(api, name, **labels):
    return api.create_namespaced_custom_object(
        GROUP, VERSION, "default", PLURAL, vmi(name, **labels)
    )


def test_custom_objects_crud(api):
    created = create(api, "crud", app="crud")
    assert created["status"]["phase"] == "Pending"
    assert "kubevirt.io/foregroundDeleteVirtualMachine" in created["metadata"]["finalizers"]
    fetched = api.get_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, "crud")
    assert fetched["metadata"]["uid"] == created["metadata"]["uid"]
    listed = api.list_namespaced_custom_object(
        GROUP, VERSION, "default", PLURAL, label_selector="app=crud"
    )
    assert [o["metadata"]["name"] for o in listed["items"]] == ["crud"]
    patched = api.patch_namespaced_custom_object(
        GROUP, VERSION, "default", PLURAL, "crud", {"metadata": {"labels": {"extra": "yes"}}}
    )
    assert patched["metadata"]["labels"] == {"app": "crud", "extra": "yes"}
    # The controller moves the VMI's status on meanwhile, so a replace is a read-modify-write
    # loop that retries on Conflict, as every real client's is.
    for _ in range(10):
        current = api.get_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, "crud")
        current["metadata"]["annotations"] = {"note": "replaced"}
        try:
            replaced = api.replace_namespaced_custom_object(
                GROUP, VERSION, "default", PLURAL, "crud", current
            )
            break
        except ApiException as exc:
            if exc.status != 409:
                raise
    else:
        pytest.fail("replace kept conflicting")
    assert replaced["metadata"]["annotations"] == {"note": "replaced"}
    with pytest.raises(ApiException) as caught:
        api.replace_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, "crud", patched)
    assert caught.value.status == 409
    assert json.loads(caught.value.body)["reason"] == "Conflict"
    deleted = api.delete_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, "crud")
    assert deleted["metadata"]["deletionTimestamp"]

    def gone():
        try:
            api.get_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, "crud")
        except ApiException as exc:
            return exc.status == 404
        return False

    wait_until(gone, timeout=10)


def test_watch_resumes_across_dropped_streams_and_passes_bookmarks(sim, api):
    start = api.list_namespaced_custom_object(
        GROUP, VERSION, "default", PLURAL, label_selector="feed=resume"
    )
    names = [f"resume-{i}" for i in range(6)]
    seen: list[tuple[str, str]] = []
    types: set[str] = set()
    stream_watch = watch.Watch()

    def consume():
        for event in stream_watch.stream(
            api.list_namespaced_custom_object,
            GROUP,
            VERSION,
            "default",
            PLURAL,
            label_selector="feed=resume",
            allow_watch_bookmarks=True,
            resource_version=start["metadata"]["resourceVersion"],
        ):
            types.add(event["type"])
            if event["type"] == "ADDED":
                seen.append(
                    (
                        event["object"]["metadata"]["name"],
                        event["object"]["metadata"]["resourceVersion"],
                    )
                )
            if len(seen) == len(names) and "BOOKMARK" in types:
                stream_watch.stop()

    sim.set_faults(watch_drop_rate=1.0)  # every stream is cut after a moment
    consumer = threading.Thread(target=consume, daemon=True)
    consumer.start()
    try:
        for name in names:
            create(api, name, feed="resume")
        consumer.join(timeout=20)
    finally:
        sim.set_faults(watch_drop_rate=0.0)
        stream_watch.stop()
    assert not consumer.is_alive()
    assert [name for name, _ in seen] == names, "each creation exactly once, in order"
    assert "BOOKMARK" in types
    assert sim.stats()["droppedWatches"] >= 1


def test_watch_older_than_history_raises_410(sim, api):
    old = create(api, "expired-0")["metadata"]["resourceVersion"]
    sim.request("PUT", "/_sim/history", {"max_events": 1})
    try:
        create(api, "expired-1")
        create(api, "expired-2")
        with pytest.raises(ApiException) as caught:
            for _ in watch.Watch().stream(
                api.list_namespaced_custom_object,
                GROUP,
                VERSION,
                "default",
                PLURAL,
                resource_version=old,
            ):
                pass
    finally:
        sim.request("PUT", "/_sim/history", {"max_events": 100_000})
    assert caught.value.status == 410
    # The way out: list again and watch from the list's version.
    fresh = api.list_namespaced_custom_object(GROUP, VERSION, "default", PLURAL)
    events = list(
        watch.Watch().stream(
            api.list_namespaced_custom_object,
            GROUP,
            VERSION,
            "default",
            PLURAL,
            resource_version=fresh["metadata"]["resourceVersion"],
            timeout_seconds=1,
        )
    )
    assert all(e["type"] != "ERROR" for e in events)


def test_dynamic_client_discovers_and_lists(sim, api):
    create(api, "dynamic-1", via="dynamic")
    with sim.api_client() as api_client:
        dynamic = DynamicClient(api_client)
        vmis = dynamic.resources.get(api_version="kubevirt.io/v1", kind="VirtualMachineInstance")
        assert vmis.namespaced
        assert vmis.short_names == ["vmi", "vmis"]
        listed = dynamic.get(vmis, namespace="default", label_selector="via=dynamic")
        assert [item.metadata.name for item in listed.items] == ["dynamic-1"]
        patched = dynamic.patch(
            vmis,
            name="dynamic-1",
            namespace="default",
            body={"metadata": {"labels": {"p": "1"}}},
            content_type="application/merge-patch+json",
        )
        assert patched.metadata.labels.p == "1"
        with pytest.raises(ApiException) as caught:  # DynamicClient's default is strategic
            dynamic.patch(vmis, name="dynamic-1", namespace="default", body={"metadata": {}})
        assert caught.value.status == 415
        services = dynamic.resources.get(api_version="v1", kind="Service")
        created = dynamic.create(
            services,
            namespace="default",
            body={"metadata": {"name": "dyn-svc"}, "spec": {"clusterIP": "None"}},
        )
        assert created.spec.clusterIP == "None"


def peer_policy(name, environment):
    """A per-environment policy as labvirt makes them (docs/DEPLOY.md)."""
    members = {"app.kubernetes.io/managed-by": "labvirt", "labvirt.io/environment": environment}
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": name, "labels": dict(members)},
        "spec": {
            "podSelector": {"matchLabels": members},
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [{"from": [{"podSelector": {"matchLabels": members}}]}],
            "egress": [{"to": [{"podSelector": {"matchLabels": members}}]}],
        },
    }


def test_network_policies_with_the_typed_client(sim):
    with sim.api_client() as api_client:
        groups = {g.name: g for g in client.ApisApi(api_client).get_api_versions().groups}
        assert groups["networking.k8s.io"].preferred_version.version == "v1"
        networking = client.NetworkingV1Api(api_client)
        resources = {r.name: r for r in networking.get_api_resources().resources}
        policies = resources["networkpolicies"]
        assert (policies.kind, policies.namespaced) == ("NetworkPolicy", True)
        assert {"create", "get", "list", "delete", "deletecollection"} <= set(policies.verbs)

        created = networking.create_namespaced_network_policy(
            "default", peer_policy("lv-np1", "np1")
        )
        assert created.metadata.uid
        assert created.spec.pod_selector.match_labels["labvirt.io/environment"] == "np1"
        assert created.spec.policy_types == ["Ingress", "Egress"]
        assert created.spec.ingress[0]._from[0].pod_selector.match_labels == (
            created.spec.pod_selector.match_labels
        )
        with pytest.raises(ApiException) as caught:
            networking.create_namespaced_network_policy("default", peer_policy("lv-np1", "np1"))
        assert caught.value.status == 409
        assert json.loads(caught.value.body)["reason"] == "AlreadyExists"
        networking.create_namespaced_network_policy("default", peer_policy("lv-np2", "np2"))
        fetched = networking.read_namespaced_network_policy("lv-np2", "default")
        assert fetched.metadata.name == "lv-np2"

        listed = networking.list_namespaced_network_policy(
            "default",
            label_selector="app.kubernetes.io/managed-by=labvirt,labvirt.io/environment=np1",
        )
        assert [p.metadata.name for p in listed.items] == ["lv-np1"]
        networking.delete_namespaced_network_policy("lv-np1", "default")
        with pytest.raises(ApiException) as caught:
            networking.read_namespaced_network_policy("lv-np1", "default")
        assert caught.value.status == 404
        networking.delete_collection_namespaced_network_policy(
            "default", label_selector="app.kubernetes.io/managed-by=labvirt"
        )
        assert networking.list_namespaced_network_policy("default").items == []


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda spec: spec["ingress"][0]["from"].append({}), "spec.ingress[0].from[1]"),
        (lambda spec: spec.update(policyTypes=["Sideways"]), "spec.policyTypes[0]"),
        (lambda spec: spec["egress"][0]["to"].insert(0, {}), "spec.egress[0].to[0]"),
    ],
)
def test_malformed_network_policies_are_invalid(sim, change, field):
    body = peer_policy("lv-bad", "bad")
    change(body["spec"])
    with sim.api_client() as api_client, pytest.raises(ApiException) as caught:
        client.NetworkingV1Api(api_client).create_namespaced_network_policy("default", body)
    assert caught.value.status == 422
    status = json.loads(caught.value.body)
    assert status["reason"] == "Invalid"
    assert [cause["field"] for cause in status["details"]["causes"]] == [field]


def test_an_omitted_pod_selector_selects_every_pod(sim):
    # As the API server decodes it: the empty selector, not an error.
    body = {"metadata": {"name": "everyone"}, "spec": {"policyTypes": ["Ingress"]}}
    with sim.api_client() as api_client:
        networking = client.NetworkingV1Api(api_client)
        created = networking.create_namespaced_network_policy("default", body)
        assert created.spec.pod_selector.to_dict() == {
            "match_expressions": None,
            "match_labels": None,
        }
        networking.delete_namespaced_network_policy("everyone", "default")


def test_only_well_formed_answers_under_20_percent_errors(sim):
    # urllib3 on its own retries 429 and 503 that carry Retry-After (up to 3 times, waiting
    # a second each): switch that off to see every injected error, and to stay fast.
    with sim.api_client(retries=False) as api_client:
        api = client.CustomObjectsApi(api_client)
        core = client.CoreV1Api(api_client)
        sim.set_faults(error_rate=0.2)
        errors: list[ApiException] = []
        successes = 0
        try:
            for i in range(150):
                try:
                    if i % 3 == 0:
                        create(api, f"chaos-{i}", chaos="yes")
                    elif i % 3 == 1:
                        api.list_namespaced_custom_object(
                            GROUP, VERSION, "default", PLURAL, label_selector="chaos=yes"
                        )
                    else:
                        core.list_namespaced_service("default")
                    successes += 1
                except ApiException as exc:
                    errors.append(exc)
            events, watch_errors = 0, []
            for _ in range(6):  # watches: errors, dropped streams, or normal timeouts
                try:
                    for _ in watch.Watch().stream(
                        api.list_namespaced_custom_object,
                        GROUP,
                        VERSION,
                        "default",
                        PLURAL,
                        label_selector="chaos=yes",
                        timeout_seconds=1,
                    ):
                        events += 1
                except ApiException as exc:
                    watch_errors.append(exc.status)
        finally:
            sim.set_faults(error_rate=0.0)
    failures = [exc.status for exc in errors]
    for exc in errors:
        body = json.loads(exc.body)
        assert body["kind"] == "Status"
        assert body["code"] == exc.status
        if exc.status == 429:
            assert exc.headers["Retry-After"] == "1"
            assert body["details"]["retryAfterSeconds"] == 1
    assert set(failures + watch_errors) <= {429, 500, 503}
    assert 10 <= len(failures) <= 60
    assert successes >= 90
    assert events > 0
