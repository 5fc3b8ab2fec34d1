"""VMI admission: the schema check, KubeVirt's validating and mutating webhooks, updates."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from labvirt.sim.boot import SimulationConfig
from labvirt.sim.clock import FakeScheduler
from labvirt.sim.controllers import KubeVirt
from labvirt.sim.errors import ApiError
from labvirt.sim.store import Store
from labvirt.sim.validation import NO_MEMORY_MESSAGE, schema_validator
from labvirt.sim.vmi import FINALIZER, VMI
from tests.conftest import KUBEVIRT_REFERENCE, STRICT_VMI_SCHEMA, require_kubevirt_reference

EXAMPLES = sorted((KUBEVIRT_REFERENCE / "examples").glob("*.yaml"))
NS = "labs"
DENIED = (
    'admission webhook "virtualmachineinstances-create-validator.kubevirt.io" denied the request: '
)


def strict_schema() -> Path:
    return require_kubevirt_reference(STRICT_VMI_SCHEMA)


@pytest.fixture(params=["hand-written checks", "strict schema"])
def schema_path(request: pytest.FixtureRequest) -> Path | None:
    return None if request.param == "hand-written checks" else strict_schema()


def make_store(schema: Path | None = None) -> tuple[Store, FakeScheduler, KubeVirt]:
    clock = FakeScheduler()
    store = Store(clock, seed=1)
    kubevirt = KubeVirt(store, clock, SimulationConfig(seed=1, vmi_schema_path=schema))
    return store, clock, kubevirt


def vmi(name: str = "box", **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachineInstance",
        "metadata": {"name": name, "labels": {"app": "lab"}},
        "spec": {
            "domain": {
                "devices": {
                    "disks": [{"name": "containerdisk", "disk": {"bus": "virtio"}}],
                    "interfaces": [{"name": "default", "masquerade": {}}],
                },
                "resources": {"requests": {"memory": "1Gi"}},
            },
            "networks": [{"name": "default", "pod": {}}],
            "volumes": [
                {
                    "name": "containerdisk",
                    "containerDisk": {"image": "quay.io/containerdisks/fedora:40"},
                }
            ],
        },
    }
    body["spec"].update(spec)
    return body


def rejection(store: Store, body: dict[str, Any]) -> ApiError:
    with pytest.raises(ApiError) as caught:
        store.create(VMI, NS, body)
    error = caught.value
    assert error.code == 422
    assert error.reason == "Invalid"
    assert store.peek(VMI, NS, body["metadata"]["name"]) is None
    return error


def causes(error: ApiError) -> list[dict[str, str]]:
    assert error.details is not None
    return list(error.details["causes"])


# -- schema and structure --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("remove", "missing"),
    [
        (lambda b: b.pop("spec"), "spec"),
        (lambda b: b["spec"].pop("domain"), "spec.domain"),
        (lambda b: b["spec"]["domain"].pop("devices"), "spec.domain.devices"),
    ],
)
def test_required_objects(schema_path: Path | None, remove: Any, missing: str) -> None:
    store, _, _ = make_store(schema_path)
    body = vmi()
    remove(body)
    error = rejection(store, body)
    assert causes(error) == [
        {"type": "FieldValueRequired", "message": "Required value", "field": missing}
    ]
    assert (
        error.message
        == f'VirtualMachineInstance.kubevirt.io "box" is invalid: {missing}: Required value'
    )
    assert error.status()["details"]["kind"] == "VirtualMachineInstance"


def test_wrong_types_are_named(schema_path: Path | None) -> None:
    store, _, _ = make_store(schema_path)
    error = rejection(store, vmi(terminationGracePeriodSeconds="30"))
    assert causes(error) == [
        {
            "type": "FieldValueTypeInvalid",
            "message": 'Invalid value: "string": spec.terminationGracePeriodSeconds in body must '
            'be of type integer: "string"',
            "field": "spec.terminationGracePeriodSeconds",
        }
    ]


def test_disks_must_be_a_list_of_named_objects(schema_path: Path | None) -> None:
    store, _, _ = make_store(schema_path)
    body = vmi()
    body["spec"]["domain"]["devices"]["disks"] = [{"disk": {}}]
    assert causes(rejection(store, body)) == [
        {
            "type": "FieldValueRequired",
            "message": "Required value",
            "field": "spec.domain.devices.disks[0].name",
        }
    ]
    body["spec"]["domain"]["devices"]["disks"] = {"name": "containerdisk"}
    [cause] = causes(rejection(store, body))
    assert cause["type"] == "FieldValueTypeInvalid"
    assert cause["field"] == "spec.domain.devices.disks"


def test_malformed_memory_quantity(schema_path: Path | None) -> None:
    store, _, _ = make_store(schema_path)
    body = vmi()
    body["spec"]["domain"]["resources"]["requests"]["memory"] = "lots"
    [cause] = causes(rejection(store, body))
    assert cause["type"] == "FieldValueInvalid"
    assert cause["field"] == "spec.domain.resources.requests.memory"
    assert cause["message"].startswith(
        'Invalid value: "lots": spec.domain.resources.requests.memory in body should match'
    )


def test_typo_field_is_rejected_by_the_strict_schema() -> None:
    store, _, _ = make_store(strict_schema())
    body = vmi()
    body["spec"]["domain"]["devices"]["disks"][0]["disk"] = {"buss": "virtio"}
    assert causes(rejection(store, body)) == [
        {
            "type": "FieldValueInvalid",
            "message": 'unknown field "spec.domain.devices.disks[0].disk.buss"',
            "field": "spec.domain.devices.disks[0].disk.buss",
        }
    ]


def test_typo_field_passes_without_the_schema() -> None:
    store, _, _ = make_store(None)
    body = vmi()
    body["spec"]["domain"]["devices"]["disks"][0]["disk"] = {"buss": "virtio"}
    created = store.create(VMI, NS, body)
    assert created["spec"]["domain"]["devices"]["disks"][0]["disk"] == {"buss": "virtio"}


def test_enum_violations_list_the_supported_values() -> None:
    store, _, _ = make_store(strict_schema())
    body = vmi()
    body["spec"]["domain"]["devices"]["interfaces"][0]["ports"] = [{"port": 22, "protocol": 6}]
    [cause] = causes(rejection(store, body))
    assert cause["field"] == "spec.domain.devices.interfaces[0].ports[0].protocol"


def testschema_validator_is_loaded_once() -> None:
    path = strict_schema()
    make_store(path)
    make_store(path)
    assert schema_validator(str(path)) is schema_validator(str(path))
    assert schema_validator.cache_info().hits >= 2


def test_missing_schema_file_fails_at_start_up(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        make_store(tmp_path / "absent.json")


# -- the validating webhook -------------------------------------------------------------------


def test_no_memory_requested(schema_path: Path | None) -> None:
    store, _, _ = make_store(schema_path)
    body = vmi()
    del body["spec"]["domain"]["resources"]
    error = rejection(store, body)
    assert causes(error) == [
        {
            "type": "FieldValueRequired",
            "message": NO_MEMORY_MESSAGE,
            "field": "spec.domain.resources.requests.memory",
        }
    ]
    assert NO_MEMORY_MESSAGE == (
        "no memory requested, at least one of 'spec.domain.memory.guest', "
        "'spec.domain.memory.hugepages.pageSize' or 'spec.domain.resources.requests.memory' "
        "must be set"
    )
    assert error.message == DENIED + NO_MEMORY_MESSAGE


def test_zero_memory_request_counts_as_none() -> None:
    store, _, _ = make_store()
    body = vmi()
    body["spec"]["domain"]["resources"]["requests"]["memory"] = "0"
    assert causes(rejection(store, body))[0]["message"] == NO_MEMORY_MESSAGE


@pytest.mark.parametrize(
    "memory",
    [{"guest": "512Mi"}, {"hugepages": {"pageSize": "2Mi"}}],
)
def test_guest_memory_or_hugepages_satisfy_the_memory_rule(memory: dict[str, Any]) -> None:
    store, _, _ = make_store()
    body = vmi()
    del body["spec"]["domain"]["resources"]
    body["spec"]["domain"]["memory"] = memory
    store.create(VMI, NS, body)


def test_disk_without_volume(schema_path: Path | None) -> None:
    store, _, _ = make_store(schema_path)
    body = vmi()
    body["spec"]["domain"]["devices"]["disks"].append({"name": "cloudinitdisk", "disk": {}})
    error = rejection(store, body)
    assert causes(error) == [
        {
            "type": "FieldValueInvalid",
            "message": "spec.domain.devices.disks[1].name 'cloudinitdisk' does not have a "
            "matching Volume.",
            "field": "spec.domain.devices.disks[1].name",
        }
    ]
    assert error.message == DENIED + causes(error)[0]["message"]


def test_volume_without_disk() -> None:
    store, _, _ = make_store()
    body = vmi()
    body["spec"]["volumes"].append({"name": "extra", "emptyDisk": {"capacity": "1Gi"}})
    assert causes(rejection(store, body)) == [
        {
            "type": "FieldValueInvalid",
            "message": "spec.domain.volumes[1].name 'extra' not found.",
            "field": "spec.domain.volumes[1].name",
        }
    ]


def test_repeated_disk_and_volume_names(schema_path: Path | None) -> None:
    store, _, _ = make_store(schema_path)
    body = vmi()
    body["spec"]["domain"]["devices"]["disks"].append({"name": "containerdisk", "disk": {}})
    body["spec"]["volumes"].append(copy.deepcopy(body["spec"]["volumes"][0]))
    error = rejection(store, body)
    assert causes(error) == [
        {
            "type": "FieldValueInvalid",
            "message": "spec.domain.devices.disks[1] and spec.domain.devices.disks[0] must not "
            "have the same Name.",
            "field": "spec.domain.devices.disks[1].name",
        },
        {
            "type": "FieldValueInvalid",
            "message": "spec.volumes[1] and spec.volumes[0] must not have the same Name.",
            "field": "spec.volumes[1].name",
        },
    ]
    assert error.message == DENIED + ", ".join(c["message"] for c in causes(error))


def test_repeated_network_and_interface_names() -> None:
    store, _, _ = make_store()
    body = vmi()
    body["spec"]["networks"].append({"name": "default", "pod": {}})
    body["spec"]["domain"]["devices"]["interfaces"].append({"name": "default", "masquerade": {}})
    assert causes(rejection(store, body)) == [
        {
            "type": "FieldValueDuplicate",
            "message": 'Network with name "default" already exists, every network must have a '
            "unique name",
            "field": "spec.networks[1].name",
        },
        {
            "type": "FieldValueDuplicate",
            "message": "Only one interface can be connected to one specific network",
            "field": "spec.domain.devices.interfaces[1].name",
        },
    ]


def test_interface_without_network() -> None:
    store, _, _ = make_store()
    body = vmi()
    body["spec"]["domain"]["devices"]["interfaces"] = [{"name": "lan", "masquerade": {}}]
    assert causes(rejection(store, body)) == [
        {
            "type": "FieldValueRequired",
            "message": "spec.networks[0].name 'default' not found.",
            "field": "spec.networks[0].name",
        },
        {
            "type": "FieldValueInvalid",
            "message": "spec.domain.devices.interfaces[0].name 'lan' not found.",
            "field": "spec.domain.devices.interfaces[0].name",
        },
    ]


def test_interface_without_any_network() -> None:
    store, _, _ = make_store()
    body = vmi()
    del body["spec"]["networks"]
    assert causes(rejection(store, body)) == [
        {
            "type": "FieldValueInvalid",
            "message": "spec.domain.devices.interfaces[0].name 'default' not found.",
            "field": "spec.domain.devices.interfaces[0].name",
        }
    ]


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_upstream_examples_are_admitted(example: Path) -> None:
    schema = strict_schema()
    store, _, _ = make_store(schema)
    body = yaml.safe_load(example.read_text())
    created = store.create(VMI, NS, body)
    assert created["status"]["phase"] == "Pending"
    # What the mutating webhook stored is still a valid VMI.
    errors = [e.message for e in schema_validator(str(schema)).iter_errors(created)]
    assert errors == []


def test_example_folder_is_present_when_the_reference_is() -> None:
    require_kubevirt_reference()
    assert EXAMPLES, "the KubeVirt reference folder has no examples"


# -- the mutating webhook ---------------------------------------------------------------------


def test_create_adds_finalizer_defaults_and_pending_status() -> None:
    store, clock, _ = make_store()
    body = vmi()
    body["metadata"]["finalizers"] = ["example.com/mine"]
    body["status"] = {"phase": "Running"}  # a user's status is never taken
    created = store.create(VMI, NS, body)
    assert created["metadata"]["finalizers"] == ["example.com/mine", FINALIZER]
    assert created["spec"]["terminationGracePeriodSeconds"] == 30
    assert created["spec"]["domain"]["resources"]["requests"] == {"memory": "1Gi"}
    assert created["spec"]["domain"]["memory"] == {"guest": "1Gi"}
    assert created["spec"]["domain"]["machine"] == {"type": "q35"}
    assert created["spec"]["volumes"][0]["containerDisk"]["imagePullPolicy"] == "IfNotPresent"
    status = created["status"]
    assert status["phase"] == "Pending"
    assert status["phaseTransitionTimestamps"] == [
        {"phase": "Pending", "phaseTransitionTimestamp": created["metadata"]["creationTimestamp"]}
    ]
    assert status["conditions"] == [
        {
            "type": "Ready",
            "status": "False",
            "lastProbeTime": None,
            "lastTransitionTime": "2023-11-14T22:13:20Z",
            "reason": "PodNotExists",
            "message": "virt-launcher pod has not yet been scheduled",
        }
    ]
    assert clock.now() == 1_700_000_000.0


def test_explicit_zero_grace_period_is_kept() -> None:
    store, _, _ = make_store()
    created = store.create(VMI, NS, vmi(terminationGracePeriodSeconds=0))
    assert created["spec"]["terminationGracePeriodSeconds"] == 0


def test_pod_network_is_added_when_none_is_given() -> None:
    store, _, _ = make_store()
    body = vmi()
    del body["spec"]["networks"]
    del body["spec"]["domain"]["devices"]["interfaces"]
    created = store.create(VMI, NS, body)
    assert created["spec"]["networks"] == [{"name": "default", "pod": {}}]
    assert created["spec"]["domain"]["devices"]["interfaces"] == [{"name": "default", "bridge": {}}]


def test_no_pod_network_when_auto_attach_is_off() -> None:
    store, _, _ = make_store()
    body = vmi()
    del body["spec"]["networks"]
    devices = body["spec"]["domain"]["devices"]
    del devices["interfaces"]
    devices["autoattachPodInterface"] = False
    created = store.create(VMI, NS, body)
    assert "networks" not in created["spec"]
    assert "interfaces" not in created["spec"]["domain"]["devices"]


def test_latest_images_are_always_pulled() -> None:
    store, _, _ = make_store()
    body = vmi()
    body["spec"]["volumes"][0]["containerDisk"]["image"] = "quay.io/containerdisks/fedora"
    created = store.create(VMI, NS, body)
    assert created["spec"]["volumes"][0]["containerDisk"]["imagePullPolicy"] == "Always"


def test_limits_become_requests_and_requests_become_guest_memory() -> None:
    store, _, _ = make_store()
    body = vmi()
    body["spec"]["domain"]["resources"] = {"limits": {"memory": "2Gi", "cpu": "2"}}
    created = store.create(VMI, NS, body)
    resources = created["spec"]["domain"]["resources"]
    assert resources["requests"] == {"memory": "2Gi", "cpu": "2"}
    assert created["spec"]["domain"]["memory"] == {"guest": "2Gi"}


# -- updates ----------------------------------------------------------------------------------


def test_spec_is_immutable() -> None:
    store, _, _ = make_store()
    created = store.create(VMI, NS, vmi())
    changed = copy.deepcopy(created)
    changed["spec"]["domain"]["resources"]["requests"]["memory"] = "2Gi"
    with pytest.raises(ApiError) as caught:
        store.update(VMI, NS, "box", changed)
    error = caught.value
    assert error.code == 422
    assert error.reason == "Invalid"
    assert error.message == (
        'admission webhook "virtualmachineinstances-update-validator.kubevirt.io" denied the '
        "request: update of VMI object is restricted"
    )
    assert causes(error) == [
        {
            "type": "FieldValueNotSupported",
            "message": "update of VMI object is restricted",
            "field": "spec",
        }
    ]


def test_labels_annotations_and_finalizers_may_change() -> None:
    store, _, _ = make_store()
    created = store.create(VMI, NS, vmi())
    changed = copy.deepcopy(created)
    changed["metadata"]["labels"]["owner"] = "alice"
    changed["metadata"]["annotations"]["note"] = "hello"
    changed["metadata"]["finalizers"] = []
    updated = store.update(VMI, NS, "box", changed)
    assert updated["metadata"]["labels"] == {"app": "lab", "owner": "alice"}
    assert updated["metadata"]["annotations"]["note"] == "hello"
    assert updated["metadata"]["finalizers"] == []
    assert updated["metadata"]["generation"] == 1


def test_users_cannot_rewrite_status() -> None:
    store, clock, _ = make_store()
    created = store.create(VMI, NS, vmi())
    clock.advance(60)
    running = store.get(VMI, NS, "box")
    assert running["status"]["phase"] == "Running"
    stale = copy.deepcopy(running)
    stale["status"] = created["status"]
    stale["metadata"]["labels"]["seen"] = "yes"
    updated = store.update(VMI, NS, "box", stale)
    assert updated["status"] == running["status"]
    assert updated["metadata"]["labels"]["seen"] == "yes"
    # A PUT that changes nothing but status is a no-op.
    again = copy.deepcopy(updated)
    again["status"] = {"phase": "Failed"}
    assert (
        store.update(VMI, NS, "box", again)["metadata"]["resourceVersion"]
        == updated["metadata"]["resourceVersion"]
    )


def test_rejection_status_is_a_kubernetes_status() -> None:
    store, _, _ = make_store()
    body = vmi()
    del body["spec"]["domain"]["resources"]
    status = rejection(store, body).status()
    assert json.loads(json.dumps(status)) == status
    assert status["kind"] == "Status"
    assert status["code"] == 422
    assert status["reason"] == "Invalid"
    assert status["details"]["name"] == "box"
    assert status["details"]["group"] == "kubevirt.io"
    assert status["details"]["causes"][0]["message"] == NO_MEMORY_MESSAGE


def test_null_metadata_maps_are_tolerated() -> None:
    store, clock, _ = make_store()
    body = vmi()
    body["metadata"].update({"labels": None, "annotations": None, "finalizers": None})
    created = store.create(VMI, NS, body)
    assert created["metadata"]["finalizers"] == [FINALIZER]
    clock.advance(60)
    running = store.get(VMI, NS, "box")
    assert running["metadata"]["labels"] == {"kubevirt.io/nodeName": running["status"]["nodeName"]}
