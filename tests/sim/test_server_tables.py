"""Server-side printing (Table) and content negotiation."""

from __future__ import annotations

import pytest

from labvirt.sim.core import NETWORK_POLICIES, SERVICES
from labvirt.sim.errors import ApiError
from labvirt.sim.rest import negotiate
from labvirt.sim.store import ResourceType
from labvirt.sim.tables import human_duration, jsonpath, table
from labvirt.sim.vmi import VMI

NOW = 1_700_000_100.0  # 100 s after the objects below were created
CREATED = "2023-11-14T22:13:20Z"  # 1_700_000_000

RUNNING_VMI = {
    "apiVersion": "kubevirt.io/v1",
    "kind": "VirtualMachineInstance",
    "metadata": {
        "name": "vm1",
        "namespace": "default",
        "creationTimestamp": CREATED,
        "labels": {"a": "b"},
    },
    "status": {
        "phase": "Running",
        "nodeName": "node02",
        "interfaces": [{"name": "default", "ipAddress": "10.244.2.7"}],
        "conditions": [
            {"type": "LiveMigratable", "status": "False"},
            {"type": "Ready", "status": "True"},
        ],
    },
}


def test_vmi_table_has_kubevirts_printer_columns():
    result = table(VMI, [RUNNING_VMI], now=NOW)
    assert result["kind"] == "Table"
    assert result["apiVersion"] == "meta.k8s.io/v1"
    columns = [(c["name"], c["priority"]) for c in result["columnDefinitions"]]
    assert columns == [
        ("Name", 0),
        ("Age", 0),
        ("Phase", 0),
        ("IP", 0),
        ("NodeName", 0),
        ("Ready", 0),
        ("Live-Migratable", 1),
        ("Paused", 1),
    ]
    assert result["columnDefinitions"][0]["format"] == "name"
    (row,) = result["rows"]
    assert row["cells"] == ["vm1", "100s", "Running", "10.244.2.7", "node02", "True", "False", None]
    assert row["object"] == {
        "kind": "PartialObjectMetadata",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": RUNNING_VMI["metadata"],
    }


def test_pending_vmi_has_empty_cells():
    pending = {
        "metadata": {"name": "vm2", "creationTimestamp": CREATED},
        "status": {"phase": "Pending"},
    }
    (row,) = table(VMI, [pending], now=NOW)["rows"]
    assert row["cells"] == ["vm2", "100s", "Pending", None, None, None, None, None]


@pytest.mark.parametrize(
    ("include", "expected"),
    [
        ("Object", RUNNING_VMI),
        ("None", None),
    ],
)
def test_include_object(include, expected):
    (row,) = table(VMI, [RUNNING_VMI], now=NOW, include=include)["rows"]
    assert row.get("object") == expected


def test_watch_tables_after_the_first_carry_no_headers():
    assert table(VMI, [RUNNING_VMI], now=NOW, headers=False)["columnDefinitions"] == []


def test_other_types_print_their_own_columns():
    other = ResourceType(
        group="x.io",
        version="v1",
        plural="widgets",
        singular="widget",
        kind="Widget",
        namespaced=True,
    )
    assert [c["name"] for c in table(other, [], now=NOW)["columnDefinitions"]] == ["Name", "Age"]
    service = {
        "metadata": {"name": "s", "creationTimestamp": CREATED},
        "spec": {
            "type": "ClusterIP",
            "clusterIP": "None",
            "ports": [{"port": 22, "protocol": "TCP"}],
        },
    }
    (row,) = table(SERVICES, [service], now=NOW)["rows"]
    assert row["cells"][:6] == ["s", "ClusterIP", "None", "<none>", "22/TCP", "100s"]
    policy = {
        "metadata": {"name": "p", "creationTimestamp": CREATED},
        "spec": {"podSelector": {"matchLabels": {"env": "e1"}}},
    }
    (row,) = table(NETWORK_POLICIES, [policy], now=NOW)["rows"]
    assert row["cells"] == ["p", "env=e1", "100s"]


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (-5, "<invalid>"),
        (-1, "0s"),
        (0, "0s"),
        (119, "119s"),
        (125, "2m5s"),
        (600, "10m"),
        (3 * 3600 + 60, "3h1m"),
        (30 * 3600, "30h"),
        (3 * 86400 + 3600, "3d1h"),
        (30 * 86400, "30d"),
        (3 * 365 * 86400, "3y"),
    ],
)
def test_human_duration(seconds, text):
    assert human_duration(seconds) == text


def test_jsonpath_subset():
    assert jsonpath(".status.interfaces[0].ipAddress")(RUNNING_VMI) == ["10.244.2.7"]
    assert jsonpath(".status.conditions[?(@.type=='Ready')].status")(RUNNING_VMI) == ["True"]
    assert jsonpath(".status.conditions[*].type")(RUNNING_VMI) == ["LiveMigratable", "Ready"]
    assert jsonpath(".status.missing[3]")(RUNNING_VMI) == []


KUBECTL_ACCEPT = (
    "application/json;as=Table;v=v1;g=meta.k8s.io,application/json;as=Table;v=v1beta1;"
    "g=meta.k8s.io,application/json"
)


@pytest.mark.parametrize(
    ("accept", "form", "version"),
    [
        (None, "Object", "v1"),
        ("application/json", "Object", "v1"),
        ("*/*", "Object", "v1"),
        (KUBECTL_ACCEPT, "Table", "v1"),
        ("application/json;as=Table;v=v1beta1;g=meta.k8s.io", "Table", "v1beta1"),
        (
            "application/json;as=PartialObjectMetadataList;v=v1;g=meta.k8s.io",
            "PartialObjectMetadata",
            "v1",
        ),
        ("application/vnd.kubernetes.protobuf, application/json", "Object", "v1"),
        ("application/json;q=0.5, application/json;as=Table;g=meta.k8s.io;v=v1", "Table", "v1"),
        (
            "application/json;as=APIGroupDiscoveryList;v=v2;g=apidiscovery.k8s.io,application/json",
            "Object",
            "v1",
        ),
    ],
)
def test_negotiate(accept, form, version):
    chosen = negotiate(accept)
    assert (chosen.form, chosen.version) == (form, version)


def test_negotiate_refuses_what_it_cannot_speak():
    with pytest.raises(ApiError) as caught:
        negotiate("application/vnd.kubernetes.protobuf")
    assert caught.value.code == 406
