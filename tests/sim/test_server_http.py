"""The simulator's REST protocol over real HTTP: verbs, errors, discovery, watch, faults."""

from __future__ import annotations

import calendar
import http.client
import json
import time
from urllib.parse import urlparse

import pytest

from labvirt.sim.testing import running_simulator_in_thread, wait_until

VMIS = "/apis/kubevirt.io/v1/namespaces/default/virtualmachineinstances"
SERVICES = "/api/v1/namespaces/default/services"
TABLE = "application/json;as=Table;v=v1;g=meta.k8s.io,application/json"
PROTOBUF = "application/vnd.kubernetes.protobuf"


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    with running_simulator_in_thread(
        tmp_path_factory.mktemp("sim"),
        boot_seconds=1,
        time_scale=0.2,
        seed=3,
        bookmark_seconds=0.2,
    ) as handle:
        yield handle


class Client:
    def __init__(self, url):
        parsed = urlparse(url)
        self.host, self.port = parsed.hostname, parsed.port

    def call(
        self, method, path, body=None, *, content_type="application/json", headers=None, raw=None
    ):
        conn = http.client.HTTPConnection(self.host, self.port, timeout=10)
        data = raw if raw is not None else (None if body is None else json.dumps(body))
        conn.request(
            method, path, body=data, headers={"Content-Type": content_type, **(headers or {})}
        )
        response = conn.getresponse()
        payload = response.read()
        conn.close()
        try:
            decoded = json.loads(payload)
        except ValueError:
            decoded = payload.decode()
        return response.status, response.headers, decoded

    def stream(self, path, headers=None):
        """Open a watch; yields decoded events until the server ends the stream."""
        conn = http.client.HTTPConnection(self.host, self.port, timeout=10)
        conn.request("GET", path, headers=headers or {})
        response = conn.getresponse()
        assert response.status == 200
        assert response.getheader("Content-Type") == "application/json"
        assert response.getheader("Transfer-Encoding") == "chunked"

        def events():
            try:
                while line := response.readline():
                    yield json.loads(line)
            finally:
                conn.close()

        return events()


@pytest.fixture(scope="module")
def api(sim):
    return Client(sim.url)


def vmi(name, **labels):
    return {
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachineInstance",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "domain": {
                "devices": {
                    "disks": [{"name": "containerdisk", "disk": {"bus": "virtio"}}],
                    "interfaces": [{"name": "default", "masquerade": {}}],
                },
                "resources": {"requests": {"memory": "128Mi"}},
            },
            "networks": [{"name": "default", "pod": {}}],
            "volumes": [
                {
                    "name": "containerdisk",
                    "containerDisk": {"image": "quay.io/containerdisks/cirros:latest"},
                }
            ],
        },
    }


def assert_status(body, code, reason):
    assert body["kind"] == "Status"
    assert body["apiVersion"] == "v1"
    assert body["status"] == "Failure"
    assert body["code"] == code
    assert body["reason"] == reason
    assert body["message"]


# -- discovery ----------------------------------------------------------------------------------


def test_discovery_documents(api):
    status, _, version = api.call("GET", "/version")
    assert status == 200
    assert version["major"] == "1"
    _, _, groups = api.call("GET", "/apis")
    assert "kubevirt.io" in [g["name"] for g in groups["groups"]]
    _, _, core = api.call("GET", "/api")
    assert core["versions"] == ["v1"]
    _, _, resources = api.call("GET", "/apis/kubevirt.io/v1")
    (entry,) = [r for r in resources["resources"] if r["name"] == "virtualmachineinstances"]
    assert entry["shortNames"] == ["vmi", "vmis"]
    assert entry["categories"] == ["all"]
    assert entry["namespaced"]
    assert entry["kind"] == "VirtualMachineInstance"
    assert "watch" in entry["verbs"]


def test_openapi_v3_carries_group_version_kinds(api):
    _, _, index = api.call("GET", "/openapi/v3")
    url = index["paths"]["apis/kubevirt.io/v1"]["serverRelativeURL"]
    status, _, doc = api.call("GET", url)
    assert status == 200
    schema = doc["components"]["schemas"]["io.kubevirt.v1.VirtualMachineInstance"]
    assert schema["x-kubernetes-group-version-kind"] == [
        {"group": "kubevirt.io", "version": "v1", "kind": "VirtualMachineInstance"}
    ]
    patch = doc["paths"][
        "/apis/kubevirt.io/v1/namespaces/{namespace}/virtualmachineinstances/{name}"
    ]["patch"]
    assert "fieldValidation" in [p["name"] for p in patch["parameters"]]
    assert "application/strategic-merge-patch+json" not in patch["requestBody"]["content"]
    assert api.call("GET", "/openapi/v3/api/v1")[0] == 200


def test_unknown_paths_are_404_status(api):
    for path in (
        "/nope",
        "/apis/kubevirt.io/v1/nothings",
        "/apis/nope.io/v1",
        "/openapi/v2",
        f"{VMIS}/x/subresource",
    ):
        status, _, body = api.call("GET", path)
        assert status == 404, path
        assert_status(body, 404, "NotFound")


# -- verbs --------------------------------------------------------------------------------------


def test_create_get_conflict_and_not_found(api):
    status, _, created = api.call("POST", VMIS, vmi("crud-1"))
    assert status == 201
    meta = created["metadata"]
    assert meta["uid"]
    assert meta["resourceVersion"]
    assert meta["generation"] == 1
    assert meta["creationTimestamp"].endswith("Z")
    assert created["status"]["phase"] == "Pending"
    status, _, fetched = api.call("GET", f"{VMIS}/crud-1")
    assert status == 200
    assert fetched["metadata"]["uid"] == meta["uid"]
    status, _, body = api.call("POST", VMIS, vmi("crud-1"))
    assert_status(body, 409, "AlreadyExists")
    status, _, body = api.call("GET", f"{VMIS}/missing")
    assert status == 404
    assert body["message"] == 'virtualmachineinstances.kubevirt.io "missing" not found'
    assert body["details"] == {
        "name": "missing",
        "group": "kubevirt.io",
        "kind": "virtualmachineinstances",
    }


def test_generate_name_and_dry_run(api):
    body = vmi("")
    body["metadata"] = {"generateName": "gen-"}
    status, _, created = api.call("POST", VMIS, body)
    assert status == 201
    assert created["metadata"]["name"].startswith("gen-")
    status, _, dry = api.call("POST", f"{VMIS}?dryRun=All", vmi("dry-1"))
    assert status == 201
    assert dry["metadata"]["name"] == "dry-1"
    assert api.call("GET", f"{VMIS}/dry-1")[0] == 404


def test_bad_bodies_are_400(api):
    status, _, body = api.call("POST", VMIS, raw=b"{not json")
    assert status == 400
    assert_status(body, 400, "BadRequest")
    status, _, body = api.call("POST", VMIS, raw=b"[1, 2]")
    assert status == 400
    status, _, body = api.call("POST", VMIS, raw=b"\x08k8s\x00", content_type=PROTOBUF)
    assert_status(body, 415, "UnsupportedMediaType")
    status, _, body = api.call("POST", VMIS, raw=b" " * (4 * 1024 * 1024))
    assert status == 413
    assert body["kind"] == "Status"
    assert body["code"] == 413


def test_admission_rejects_a_vmi_without_memory(api):
    body = vmi("no-memory")
    del body["spec"]["domain"]["resources"]
    status, _, result = api.call("POST", VMIS, body)
    assert status == 422
    assert_status(result, 422, "Invalid")
    assert "no memory requested" in result["message"]
    assert result["details"]["causes"]


def test_update_needs_a_current_resource_version(api):
    _, _, created = api.call("POST", VMIS, vmi("upd-1"))
    stale = dict(created)
    labelled = json.loads(json.dumps(created))
    labelled["metadata"]["labels"] = {"x": "1"}
    status, _, updated = api.call("PUT", f"{VMIS}/upd-1", labelled)
    assert status == 200
    assert updated["metadata"]["labels"] == {"x": "1"}
    status, _, body = api.call("PUT", f"{VMIS}/upd-1", stale)
    assert_status(body, 409, "Conflict")
    assert "the object has been modified" in body["message"]
    no_rv = json.loads(json.dumps(updated))
    del no_rv["metadata"]["resourceVersion"]
    status, _, body = api.call("PUT", f"{VMIS}/upd-1", no_rv)
    assert_status(body, 422, "Invalid")


def test_patch_content_types(api):
    api.call("POST", VMIS, vmi("patch-1", a="1"))
    status, _, merged = api.call(
        "PATCH",
        f"{VMIS}/patch-1",
        {"metadata": {"labels": {"b": "2"}}},
        content_type="application/merge-patch+json",
    )
    assert status == 200
    assert merged["metadata"]["labels"] == {"a": "1", "b": "2"}
    status, _, patched = api.call(
        "PATCH",
        f"{VMIS}/patch-1",
        [
            {"op": "test", "path": "/metadata/labels/a", "value": "1"},
            {"op": "add", "path": "/metadata/labels/c~1d", "value": "3"},
        ],
        content_type="application/json-patch+json",
    )
    assert status == 200
    assert patched["metadata"]["labels"]["c/d"] == "3"
    status, _, body = api.call(
        "PATCH",
        f"{VMIS}/patch-1",
        [{"op": "test", "path": "/metadata/labels/a", "value": "9"}],
        content_type="application/json-patch+json",
    )
    assert status == 422
    status, _, body = api.call(
        "PATCH",
        f"{VMIS}/patch-1",
        {"metadata": {}},
        content_type="application/strategic-merge-patch+json",
    )
    assert_status(body, 415, "UnsupportedMediaType")
    status, _, applied = api.call(
        "PATCH",
        f"{VMIS}/patch-1?fieldManager=test",
        raw=b"apiVersion: kubevirt.io/v1\nkind: VirtualMachineInstance\n"
        b"metadata:\n  name: patch-1\n  labels:\n    e: '5'\n",
        content_type="application/apply-patch+yaml",
    )
    assert status == 200
    assert applied["metadata"]["labels"]["e"] == "5"
    status, _, body = api.call("PATCH", f"{VMIS}/patch-1", {}, content_type="text/plain")
    assert status == 415
    status, _, body = api.call(
        "PATCH", f"{VMIS}/nothing", {}, content_type="application/merge-patch+json"
    )
    assert status == 404


def test_patch_with_stale_resource_version_conflicts(api):
    _, _, created = api.call("POST", VMIS, vmi("patch-rv"))
    api.call(
        "PATCH",
        f"{VMIS}/patch-rv",
        {"metadata": {"labels": {"x": "1"}}},
        content_type="application/merge-patch+json",
    )
    status, _, body = api.call(
        "PATCH",
        f"{VMIS}/patch-rv",
        {"metadata": {"resourceVersion": created["metadata"]["resourceVersion"]}},
        content_type="application/merge-patch+json",
    )
    assert status == 409
    assert_status(body, 409, "Conflict")


def test_spec_is_immutable(api):
    api.call("POST", VMIS, vmi("immutable-1"))
    status, _, body = api.call(
        "PATCH",
        f"{VMIS}/immutable-1",
        {"spec": {"domain": {"resources": {"requests": {"memory": "256Mi"}}}}},
        content_type="application/merge-patch+json",
    )
    assert status == 422
    assert "update of VMI object is restricted" in body["message"]


def test_list_selectors_and_paging(api):
    for i in range(5):
        api.call("POST", VMIS, vmi(f"list-{i}", group="paging", parity=str(i % 2)))
    _, _, listed = api.call("GET", f"{VMIS}?labelSelector=group%3Dpaging,parity%3D0")
    assert listed["kind"] == "VirtualMachineInstanceList"
    assert [o["metadata"]["name"] for o in listed["items"]] == ["list-0", "list-2", "list-4"]
    _, _, one = api.call("GET", f"{VMIS}?fieldSelector=metadata.name%3Dlist-3")
    assert [o["metadata"]["name"] for o in one["items"]] == ["list-3"]
    status, _, body = api.call("GET", f"{VMIS}?fieldSelector=status.phase%3DRunning")
    assert status == 400
    assert body["message"] == "field label not supported: status.phase"
    names, token = [], ""
    while True:
        _, _, page = api.call(
            "GET",
            f"{VMIS}?labelSelector=group%3Dpaging&limit=2"
            + (f"&continue={token}" if token else ""),
        )
        names += [o["metadata"]["name"] for o in page["items"]]
        token = page["metadata"].get("continue")
        if not token:
            break
    assert names == [f"list-{i}" for i in range(5)]
    _, _, everywhere = api.call(
        "GET", "/apis/kubevirt.io/v1/virtualmachineinstances?labelSelector=group%3Dpaging"
    )
    assert len(everywhere["items"]) == 5


def test_table_for_get_and_list(api):
    api.call("POST", VMIS, vmi("table-1", kind="table"))
    _, _, listed = api.call("GET", f"{VMIS}?labelSelector=kind%3Dtable", headers={"Accept": TABLE})
    assert listed["kind"] == "Table"
    assert [c["name"] for c in listed["columnDefinitions"]][:6] == [
        "Name",
        "Age",
        "Phase",
        "IP",
        "NodeName",
        "Ready",
    ]
    assert listed["rows"][0]["cells"][0] == "table-1"
    assert listed["rows"][0]["object"]["kind"] == "PartialObjectMetadata"
    _, _, one = api.call("GET", f"{VMIS}/table-1?includeObject=Object", headers={"Accept": TABLE})
    assert one["rows"][0]["object"]["kind"] == "VirtualMachineInstance"
    status, _, _ = api.call("GET", f"{VMIS}/table-1?includeObject=Bogus", headers={"Accept": TABLE})
    assert status == 400
    status, _, _ = api.call("GET", VMIS, headers={"Accept": "application/vnd.kubernetes.protobuf"})
    assert status == 406


def test_delete_marks_then_the_controller_removes(api):
    api.call("POST", VMIS, vmi("del-1"))
    status, _, marked = api.call(
        "DELETE",
        f"{VMIS}/del-1",
        {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Background"},
    )
    assert status == 200
    assert marked["metadata"]["deletionTimestamp"]
    assert "kubevirt.io/foregroundDeleteVirtualMachine" in marked["metadata"]["finalizers"]
    wait_until(lambda: api.call("GET", f"{VMIS}/del-1")[0] == 404, timeout=10)
    status, _, _ = api.call("DELETE", f"{VMIS}/del-1")
    assert status == 404


def test_delete_options_are_validated(api):
    api.call("POST", VMIS, vmi("del-opts"))
    status, _, body = api.call("DELETE", f"{VMIS}/del-opts?propagationPolicy=Sideways")
    assert status == 422
    status, _, body = api.call(
        "DELETE", f"{VMIS}/del-opts", {"preconditions": {"uid": "not-the-uid"}}
    )
    assert_status(body, 409, "Conflict")
    status, _, body = api.call("DELETE", f"{VMIS}/del-opts", raw=b"{oops")
    assert status == 400


def test_delete_of_a_service_answers_the_deleted_service(api):
    # The Service registry returns the deleted object, as the official client expects
    # (its delete_namespaced_service decodes a V1Service).
    api.call(
        "POST", SERVICES, {"metadata": {"name": "gone-at-once"}, "spec": {"clusterIP": "None"}}
    )
    status, _, body = api.call("DELETE", f"{SERVICES}/gone-at-once")
    assert status == 200
    assert body["kind"] == "Service"
    assert body["metadata"]["name"] == "gone-at-once"
    assert api.call("GET", f"{SERVICES}/gone-at-once")[0] == 404


def test_delete_without_finalizers_answers_success_status(api):
    path = "/apis/networking.k8s.io/v1/namespaces/default/networkpolicies"
    api.call("POST", path, {"metadata": {"name": "gone-at-once"}, "spec": {"podSelector": {}}})
    status, _, body = api.call("DELETE", f"{path}/gone-at-once")
    assert status == 200
    assert body["kind"] == "Status"
    assert body["status"] == "Success"
    assert body["details"]["name"] == "gone-at-once"
    assert body["details"]["kind"] == "networkpolicies"
    assert body["details"]["group"] == "networking.k8s.io"


def test_delete_collection_by_label(api):
    for i in range(3):
        api.call("POST", VMIS, vmi(f"coll-{i}", batch="b1"))
    api.call("POST", VMIS, vmi("coll-keep", batch="b2"))
    status, _, body = api.call("DELETE", f"{VMIS}?labelSelector=batch%3Db1")
    assert status == 200
    assert body["kind"] == "VirtualMachineInstanceList"
    assert sorted(o["metadata"]["name"] for o in body["items"]) == ["coll-0", "coll-1", "coll-2"]
    wait_until(lambda: not api.call("GET", f"{VMIS}?labelSelector=batch%3Db1")[2]["items"])
    assert api.call("GET", f"{VMIS}/coll-keep")[0] == 200


# -- built-in types -----------------------------------------------------------------------------


def test_services_get_cluster_ips_unless_headless(api):
    status, _, svc = api.call(
        "POST",
        SERVICES,
        {
            "metadata": {"name": "web"},
            "spec": {"selector": {"app": "web"}, "ports": [{"port": 80}]},
        },
    )
    assert status == 201
    assert svc["spec"]["clusterIP"].startswith("10.")
    assert svc["spec"]["type"] == "ClusterIP"
    assert svc["spec"]["ports"] == [{"port": 80, "protocol": "TCP", "targetPort": 80}]
    _, _, headless = api.call(
        "POST",
        SERVICES,
        {
            "metadata": {"name": "env1"},
            "spec": {"clusterIP": "None", "selector": {"env": "e1"}},
        },
    )
    assert headless["spec"]["clusterIP"] == "None"
    status, _, body = api.call("POST", SERVICES, {"metadata": {"name": "noports"}, "spec": {}})
    assert status == 422
    assert "spec.ports: Required value" in body["message"]
    status, _, body = api.call(
        "PATCH",
        f"{SERVICES}/web",
        {"spec": {"clusterIP": "10.96.9.9"}},
        content_type="application/merge-patch+json",
    )
    assert status == 422
    assert "field is immutable" in body["message"]
    status, _, patched = api.call(
        "PATCH",
        f"{SERVICES}/web",
        {
            "spec": {
                "$setElementOrder/ports": [{"port": 80}, {"port": 22}],
                "ports": [{"port": 22, "name": "ssh"}],
            }
        },
        content_type="application/strategic-merge-patch+json",
    )
    assert status == 422  # two ports now, and the first has no name
    status, _, patched = api.call(
        "PATCH",
        f"{SERVICES}/web",
        {"spec": {"ports": [{"port": 22, "name": "ssh"}, {"port": 80, "name": "http"}]}},
        content_type="application/strategic-merge-patch+json",
    )
    assert status == 200
    assert [p["port"] for p in patched["spec"]["ports"]] == [80, 22]


def test_network_policies_are_defaulted(api):
    status, _, policy = api.call(
        "POST",
        "/apis/networking.k8s.io/v1/namespaces/default/networkpolicies",
        {
            "metadata": {"name": "isolate"},
            "spec": {
                "podSelector": {"matchLabels": {"env": "e"}},
                "ingress": [{"from": []}],
                "egress": [{}],
            },
        },
    )
    assert status == 201
    assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"]


def test_network_policy_selectors_must_be_label_maps(api):
    status, _, body = api.call(
        "POST",
        "/apis/networking.k8s.io/v1/namespaces/default/networkpolicies",
        {"metadata": {"name": "numbers"}, "spec": {"podSelector": {"matchLabels": {"a": 1}}}},
    )
    assert status == 422
    assert body["details"]["causes"] == [
        {
            "type": "FieldValueInvalid",
            "message": "Invalid value: must be a map of strings",
            "field": "spec.podSelector.matchLabels",
        }
    ]


def test_namespaces(api):
    _, _, namespaces = api.call("GET", "/api/v1/namespaces")
    names = {n["metadata"]["name"] for n in namespaces["items"]}
    assert {"default", "kube-system"} <= names
    status, _, body = api.call("DELETE", "/api/v1/namespaces/default")
    assert_status(body, 403, "Forbidden")
    assert api.call("POST", "/api/v1/namespaces", {"metadata": {"name": "lab1"}})[0] == 201
    api.call("POST", "/apis/kubevirt.io/v1/namespaces/lab1/virtualmachineinstances", vmi("inside"))
    status, _, _ = api.call("DELETE", "/api/v1/namespaces/lab1")
    assert status == 200
    wait_until(
        lambda: (
            api.call("GET", "/apis/kubevirt.io/v1/namespaces/lab1/virtualmachineinstances/inside")[
                0
            ]
            == 404
        )
    )
    status, _, body = api.call(
        "POST", "/apis/kubevirt.io/v1/namespaces/nowhere/virtualmachineinstances", vmi("x")
    )
    assert status == 404
    assert body["message"] == 'namespaces "nowhere" not found'


# -- watch --------------------------------------------------------------------------------------


def test_watch_streams_changes_then_a_bookmark_before_timeout(api):
    _, _, listed = api.call("GET", f"{VMIS}?labelSelector=w%3D1")
    events = api.stream(
        f"{VMIS}?watch=true&labelSelector=w%3D1&allowWatchBookmarks=true"
        f"&timeoutSeconds=2&resourceVersion={listed['metadata']['resourceVersion']}"
    )
    api.call("POST", VMIS, vmi("watch-1", w="1"))
    seen = list(events)
    assert seen[0]["type"] == "ADDED"
    assert seen[0]["object"]["metadata"]["name"] == "watch-1"
    assert {e["type"] for e in seen} <= {"ADDED", "MODIFIED", "BOOKMARK"}
    assert "MODIFIED" in {e["type"] for e in seen}, "the lifecycle moved it on"
    bookmark = seen[-1]
    assert bookmark["type"] == "BOOKMARK"
    assert set(bookmark["object"]) == {"apiVersion", "kind", "metadata"}
    assert set(bookmark["object"]["metadata"]) == {"resourceVersion"}
    rvs = [int(e["object"]["metadata"]["resourceVersion"]) for e in seen]
    assert rvs == sorted(rvs)


def test_watch_with_an_expired_version_gets_410_then_ends(sim, api):
    store = sim.simulator.store
    store.set_history_limit(max_events=1)
    try:
        api.call("POST", VMIS, vmi("expire-1"))
        api.call("POST", VMIS, vmi("expire-2"))
        events = list(api.stream(f"{VMIS}?watch=1&resourceVersion=101"))
    finally:
        store.set_history_limit(max_events=100_000)
    assert len(events) == 1
    assert events[0]["type"] == "ERROR"
    assert events[0]["object"]["code"] == 410
    assert events[0]["object"]["reason"] == "Expired"


def test_a_client_hanging_up_frees_its_watcher(sim, api):
    before = sim.stats()["watchers"]
    conn = http.client.HTTPConnection(api.host, api.port, timeout=10)
    conn.request("GET", f"{VMIS}?watch=1&fieldSelector=metadata.name%3Dhang-up")
    response = conn.getresponse()
    assert response.status == 200
    wait_until(lambda: sim.stats()["watchers"] == before + 1)
    conn.close()
    wait_until(lambda: sim.stats()["watchers"] == before)
    assert sim.stats()["watchStreams"] == 0


def test_table_watch_has_headers_only_first(api):
    events = api.stream(
        f"{VMIS}?watch=1&fieldSelector=metadata.name%3Dtw-1&timeoutSeconds=1",
        headers={"Accept": TABLE},
    )
    api.call("POST", VMIS, vmi("tw-1"))
    seen = list(events)
    assert len(seen) >= 2
    assert all(e["object"]["kind"] == "Table" and len(e["object"]["rows"]) == 1 for e in seen)
    assert seen[0]["object"]["columnDefinitions"]
    assert not seen[1]["object"]["columnDefinitions"]


# -- /_sim --------------------------------------------------------------------------------------


def test_faults_endpoint_validates_and_applies(sim, api):
    status, _, faults = api.call("GET", "/_sim/faults")
    assert status == 200
    assert set(faults) == {"error_rate", "boot_failure_rate", "latency_ms", "watch_drop_rate"}
    for bad in (
        {"error_rate": 2},
        {"error_rate": "x"},
        {"latency_ms": -1},
        {"nope": 1},
        {"error_rate": True},
        [1],
    ):
        status, _, body = api.call("PUT", "/_sim/faults", bad)
        assert status == 400, bad
        assert_status(body, 400, "BadRequest")
    status, _, faults = api.call("PUT", "/_sim/faults", {"boot_failure_rate": 0.5})
    assert faults["boot_failure_rate"] == 0.5
    assert faults["error_rate"] == 0
    assert sim.simulator.kubevirt.boot_failure_rate == 0.5
    api.call("PUT", "/_sim/faults", {"boot_failure_rate": 0})


def test_injected_errors_are_well_formed(sim, api):
    sim.set_faults(error_rate=1.0)
    try:
        codes = set()
        for _ in range(40):
            status, headers, body = api.call("GET", VMIS)
            codes.add(status)
            assert status in (429, 500, 503)
            assert_status(
                body,
                status,
                {429: "TooManyRequests", 500: "InternalError", 503: "ServiceUnavailable"}[status],
            )
            if status == 429:
                assert headers["Retry-After"] == "1"
                assert body["details"]["retryAfterSeconds"] == 1
        assert codes == {429, 500, 503}
        # Discovery, OpenAPI and /_sim are spared, so clients can still find their way.
        assert api.call("GET", "/apis/kubevirt.io/v1")[0] == 200
        assert api.call("GET", "/_sim/stats")[0] == 200
    finally:
        sim.set_faults(error_rate=0.0)


def test_dropped_watches_end_cleanly(sim, api):
    sim.set_faults(watch_drop_rate=1.0)
    try:
        events = list(api.stream(f"{VMIS}?watch=1&fieldSelector=metadata.name%3Dnothing"))
    finally:
        sim.set_faults(watch_drop_rate=0.0)
    assert events == []


def test_crash_and_stats(sim, api):
    status, _, _ = api.call("POST", "/_sim/vmis/default/ghost/crash")
    assert status == 404
    api.call("POST", VMIS, vmi("crash-1"))

    def running():
        return api.call("GET", f"{VMIS}/crash-1")[2]["status"]["phase"] == "Running"

    wait_until(running, timeout=10)
    status, _, crashed = api.call("POST", "/_sim/vmis/default/crash-1/crash")
    assert status == 200
    assert crashed["status"]["phase"] == "Failed"
    status, _, stats = api.call("GET", "/_sim/stats")
    assert stats["objects"]["virtualmachineinstances.kubevirt.io"] >= 1
    assert int(stats["resourceVersion"]) > 100
    assert {"watchers", "watchStreams", "requests"} <= set(stats)


def test_timeline_times_each_create_and_first_readiness_below_the_second(api):
    before = time.time()
    status, _, created = api.call("POST", VMIS, vmi("timeline-1", t="1"))
    answered = time.time()
    assert status == 201

    def entry():
        _, _, body = api.call("GET", "/_sim/timeline")
        found = [e for e in body["vmis"] if e["name"] == "timeline-1"]
        return found[0] if found and found[0]["ready"] is not None else None

    timed = wait_until(entry, timeout=10)
    assert timed["uid"] == created["metadata"]["uid"]
    assert timed["labels"] == {"t": "1"}
    assert before <= timed["createReceived"] <= timed["created"] <= answered
    _, _, current = api.call("GET", f"{VMIS}/timeline-1")
    condition = next(c for c in current["status"]["conditions"] if c["type"] == "Ready")
    transition = calendar.timegm(
        time.strptime(condition["lastTransitionTime"], "%Y-%m-%dT%H:%M:%SZ")
    )
    # The condition keeps whole seconds; the timeline the same moment, to the microsecond.
    assert transition <= timed["ready"] < transition + 1
    assert timed["ready"] > timed["created"]
