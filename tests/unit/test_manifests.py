"""Manifest builders: exact objects for known inputs, and the shipped templates against KubeVirt."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta, timezone
from importlib import resources
from typing import Any

import jsonschema
import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from shared.domain.manifests import (
    CREATED_AT_ANNOTATION,
    ENVIRONMENT_LABEL,
    MANAGED_BY_LABEL,
    MANAGED_BY_SELECTOR,
    MAX_ENVIRONMENT_ID_LENGTH,
    SESSION_LABEL,
    TEMPLATE_LABEL,
    VM_COUNT_ANNOTATION,
    VM_LABEL,
    EnvironmentManifests,
    build_environment,
    build_headless_service,
    build_network_policy,
    build_vmi,
    environment_domain,
    environment_selector,
    environment_subdomain,
    environment_vmi_name,
    format_timestamp,
    is_valid_environment_id,
    parse_timestamp,
)
from shared.domain.template_parsing import parse_templates
from shared.domain.templates import MAX_VM_NAME_LENGTH, Template, VmSpec
from shared.domain.user_data import render_user_data
from tests.conftest import STRICT_VMI_SCHEMA, require_kubevirt_reference

TOKEN = "abcdef.0123456789abcdef"
DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
SSH_PROBE: dict[str, Any] = {
    "tcpSocket": {"port": 22},
    "initialDelaySeconds": 5,
    "periodSeconds": 5,
}

BOX = VmSpec(
    name="box",
    hostname="box",
    image="quay.io/containerdisks/ubuntu:22.04",
    cpu_cores=2,
    memory="2Gi",
    user_data="#cloud-config\npassword: {{ environment_token }}\n",
    readiness_probe=SSH_PROBE,
)
SINGLE = Template(name="single", description="one box", vms=(BOX,))

CONTROLPLANE = VmSpec(
    name="cp",
    hostname="controlplane",
    image="quay.io/labvirt/kubeadm-node:1.31",
    cpu_cores=2,
    memory="2Gi",
    user_data="#cloud-config\nfqdn: controlplane.{{ environment_domain }}\n",
)
WORKER = VmSpec(
    name="worker",
    hostname="node01",
    image="quay.io/labvirt/kubeadm-node:1.31",
    cpu_cores=1,
    memory="1Gi",
    user_data="#cloud-config\nruncmd:\n  - join {{environment_domain}} {{ environment_token }}\n",
)
PAIR = Template(name="pair", description="two boxes", vms=(CONTROLPLANE, WORKER))


def shipped_templates() -> dict[str, Template]:
    text = resources.files("shared.templates").joinpath("default.yaml").read_text()
    return parse_templates(yaml.safe_load(text))


@pytest.fixture(scope="module")
def strict_vmi_validator() -> jsonschema.Draft4Validator:
    schema = json.loads(require_kubevirt_reference(STRICT_VMI_SCHEMA).read_text())
    return jsonschema.Draft4Validator(schema)


def test_single_vm_vmi() -> None:
    vmi = build_vmi(
        template=SINGLE,
        vm=BOX,
        environment_id="e1",
        namespace="labs",
        session_id="s-42",
        environment_token=TOKEN,
    )

    assert vmi == {
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachineInstance",
        "metadata": {
            "name": "lv-e1-box",
            "namespace": "labs",
            "labels": {
                "app.kubernetes.io/managed-by": "labvirt",
                "labvirt.io/environment": "e1",
                "labvirt.io/template": "single",
                "labvirt.io/vm": "box",
                "labvirt.io/session": "s-42",
            },
            "annotations": {"labvirt.io/vm-count": "1"},
        },
        "spec": {
            "domain": {
                "cpu": {"cores": 2},
                "resources": {
                    "requests": {"cpu": "2", "memory": "2Gi"},
                    "limits": {"cpu": "2", "memory": "2Gi"},
                },
                "devices": {
                    "disks": [
                        {"name": "containerdisk", "disk": {"bus": "virtio"}},
                        {"name": "cloudinitdisk", "disk": {"bus": "virtio"}},
                    ],
                    "interfaces": [{"name": "default", "masquerade": {}}],
                },
            },
            "networks": [{"name": "default", "pod": {}}],
            "volumes": [
                {
                    "name": "containerdisk",
                    "containerDisk": {"image": "quay.io/containerdisks/ubuntu:22.04"},
                },
                {
                    "name": "cloudinitdisk",
                    "cloudInitNoCloud": {
                        "userData": "#cloud-config\npassword: abcdef.0123456789abcdef\n"
                    },
                },
            ],
            "hostname": "box",
            "terminationGracePeriodSeconds": 0,
            "readinessProbe": {
                "tcpSocket": {"port": 22},
                "initialDelaySeconds": 5,
                "periodSeconds": 5,
            },
        },
    }


def test_multi_vm_vmi_gets_subdomain_and_domain_placeholder() -> None:
    vmi = build_vmi(
        template=PAIR,
        vm=WORKER,
        environment_id="e2",
        namespace="labs",
        session_id=None,
        environment_token=TOKEN,
        extra_labels={"example.com/cohort": "spring"},
        created_at=datetime(2026, 3, 1, 12, 30, 5, 999, tzinfo=UTC),
    )

    assert vmi == {
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachineInstance",
        "metadata": {
            "name": "lv-e2-worker",
            "namespace": "labs",
            "labels": {
                "app.kubernetes.io/managed-by": "labvirt",
                "labvirt.io/environment": "e2",
                "labvirt.io/template": "pair",
                "labvirt.io/vm": "worker",
                "example.com/cohort": "spring",
            },
            "annotations": {
                "labvirt.io/vm-count": "2",
                "labvirt.io/created-at": "2026-03-01T12:30:05Z",
            },
        },
        "spec": {
            "domain": {
                "cpu": {"cores": 1},
                "resources": {
                    "requests": {"cpu": "1", "memory": "1Gi"},
                    "limits": {"cpu": "1", "memory": "1Gi"},
                },
                "devices": {
                    "disks": [
                        {"name": "containerdisk", "disk": {"bus": "virtio"}},
                        {"name": "cloudinitdisk", "disk": {"bus": "virtio"}},
                    ],
                    "interfaces": [{"name": "default", "masquerade": {}}],
                },
            },
            "networks": [{"name": "default", "pod": {}}],
            "volumes": [
                {
                    "name": "containerdisk",
                    "containerDisk": {"image": "quay.io/labvirt/kubeadm-node:1.31"},
                },
                {
                    "name": "cloudinitdisk",
                    "cloudInitNoCloud": {
                        "userData": "#cloud-config\nruncmd:\n"
                        "  - join lv-e2.labs.svc.cluster.local abcdef.0123456789abcdef\n"
                    },
                },
            ],
            "hostname": "node01",
            "subdomain": "lv-e2",
            "terminationGracePeriodSeconds": 0,
        },
    }


def test_headless_service() -> None:
    service = build_headless_service(
        environment_id="e2",
        namespace="labs",
        template_name="pair",
        created_at=datetime(2026, 3, 1, 14, 30, 5, tzinfo=timezone(timedelta(hours=2))),
    )

    assert service == {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": "lv-e2",
            "namespace": "labs",
            "labels": {
                "app.kubernetes.io/managed-by": "labvirt",
                "labvirt.io/environment": "e2",
                "labvirt.io/template": "pair",
            },
            "annotations": {"labvirt.io/created-at": "2026-03-01T12:30:05Z"},
        },
        "spec": {
            "clusterIP": "None",
            "selector": {"labvirt.io/environment": "e2"},
            "publishNotReadyAddresses": True,
            "ports": [{"name": "ssh", "port": 22, "targetPort": 22, "protocol": "TCP"}],
        },
    }


def test_single_vm_environment_has_no_service() -> None:
    manifests = build_environment(
        template=SINGLE,
        environment_id="e1",
        namespace="labs",
        session_id=None,
        environment_token=TOKEN,
    )

    assert manifests.service is None
    assert manifests.network_policy is None  # no peer to reach
    assert [vmi["metadata"]["name"] for vmi in manifests.vmis] == ["lv-e1-box"]
    assert "subdomain" not in manifests.vmis[0]["spec"]


def test_multi_vm_environment_is_the_vmis_plus_their_service_and_policy() -> None:
    created_at = datetime(2026, 3, 1, tzinfo=UTC)
    arguments: dict[str, Any] = {
        "environment_id": "e2",
        "namespace": "labs",
        "session_id": "s1",
        "environment_token": TOKEN,
        "created_at": created_at,
    }

    manifests = build_environment(template=PAIR, **arguments)

    assert manifests == EnvironmentManifests(
        vmis=(
            build_vmi(template=PAIR, vm=CONTROLPLANE, **arguments),
            build_vmi(template=PAIR, vm=WORKER, **arguments),
        ),
        service=build_headless_service(
            environment_id="e2", namespace="labs", template_name="pair", created_at=created_at
        ),
        network_policy=build_network_policy(
            environment_id="e2", namespace="labs", template_name="pair", created_at=created_at
        ),
    )


def test_built_vmis_do_not_share_the_template_probe() -> None:
    vmi = build_vmi(
        template=SINGLE,
        vm=BOX,
        environment_id="e1",
        namespace="labs",
        session_id=None,
        environment_token=TOKEN,
    )

    vmi["spec"]["readinessProbe"]["tcpSocket"]["port"] = 2222

    assert BOX.readiness_probe == SSH_PROBE


def test_session_label_only_when_there_is_a_session() -> None:
    def labels(session_id: str | None) -> dict[str, str]:
        vmi = build_vmi(
            template=SINGLE,
            vm=BOX,
            environment_id="e1",
            namespace="labs",
            session_id=session_id,
            environment_token=TOKEN,
        )
        return dict(vmi["metadata"]["labels"])

    assert SESSION_LABEL not in labels(None)
    assert labels("0f8fad5b-d9cb-469f-a165-70867728950e")[SESSION_LABEL] == (
        "0f8fad5b-d9cb-469f-a165-70867728950e"
    )


def test_selectors() -> None:
    assert environment_selector("e2") == (
        "app.kubernetes.io/managed-by=labvirt,labvirt.io/environment=e2"
    )
    assert MANAGED_BY_SELECTOR == "app.kubernetes.io/managed-by=labvirt"


def test_names() -> None:
    assert environment_vmi_name("e2", "worker") == "lv-e2-worker"
    assert environment_subdomain("e2") == "lv-e2"
    assert environment_domain("e2", "labs") == "lv-e2.labs.svc.cluster.local"
    assert environment_domain("e2", "labs", cluster_domain="k8s.example") == (
        "lv-e2.labs.svc.k8s.example"
    )


def test_longest_names_fit_in_a_dns_label() -> None:
    name = environment_vmi_name("a" * MAX_ENVIRONMENT_ID_LENGTH, "b" * MAX_VM_NAME_LENGTH)

    assert len(name) == 63
    assert len("0f8fad5bd9cb469fa16570867728950e") <= MAX_ENVIRONMENT_ID_LENGTH


@pytest.mark.parametrize(
    "environment_id",
    ["", "ABC", "a-b", "a_b", "a.b", "é1", " a", "a" * (MAX_ENVIRONMENT_ID_LENGTH + 1)],
)
def test_environment_id_must_be_short_lowercase_alphanumeric(environment_id: str) -> None:
    assert not is_valid_environment_id(environment_id)
    with pytest.raises(ValueError, match="environment id must be 1-32 lowercase letters"):
        environment_vmi_name(environment_id, "box")
    with pytest.raises(ValueError, match="environment id"):
        environment_subdomain(environment_id)
    with pytest.raises(ValueError, match="environment id"):
        environment_selector(environment_id)
    with pytest.raises(ValueError, match="environment id"):
        build_environment(
            template=PAIR,
            environment_id=environment_id,
            namespace="labs",
            session_id=None,
            environment_token=TOKEN,
        )


@pytest.mark.parametrize("vm_name", ["", "Box", "box-", "b" * (MAX_VM_NAME_LENGTH + 1)])
def test_vmi_name_rejects_bad_vm_names(vm_name: str) -> None:
    with pytest.raises(ValueError, match="VM name must be a DNS-1123 label"):
        environment_vmi_name("e1", vm_name)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"environment_token": ""}, "environment token"),
        ({"environment_token": "a b"}, "environment token"),
        ({"environment_token": "-rf"}, "environment token"),
        ({"environment_token": "x'; reboot"}, "environment token"),
        ({"namespace": "Labs"}, "namespace must be a DNS-1123 label"),
        ({"session_id": "not a label"}, "session id is not a valid Kubernetes label value"),
        ({"session_id": ""}, "session id is not a valid Kubernetes label value"),
        ({"extra_labels": {ENVIRONMENT_LABEL: "other"}}, "would override a label labvirt owns"),
        ({"extra_labels": {"bad key!": "x"}}, "is not a valid Kubernetes label key"),
        ({"extra_labels": {"team": "a/b"}}, "value of label 'team' is not a valid"),
        ({"created_at": datetime(2026, 3, 1)}, "timestamp must be timezone-aware"),
        ({"cluster_domain": "bad domain"}, "cluster domain must be a DNS name"),
    ],
)
def test_build_environment_rejects_bad_inputs(overrides: dict[str, Any], message: str) -> None:
    arguments: dict[str, Any] = {
        "template": PAIR,
        "environment_id": "e2",
        "namespace": "labs",
        "session_id": None,
        "environment_token": TOKEN,
    }
    arguments.update(overrides)

    with pytest.raises(ValueError, match=re.escape(message)):
        build_environment(**arguments)


def test_vm_must_belong_to_the_template() -> None:
    with pytest.raises(ValueError, match="VM 'box' is not part of template 'pair'"):
        build_vmi(
            template=PAIR,
            vm=BOX,
            environment_id="e2",
            namespace="labs",
            session_id=None,
            environment_token=TOKEN,
        )


def test_domain_placeholder_has_no_value_in_a_single_vm_environment() -> None:
    # parse_template refuses this; a hand-built Template must not slip a dead domain through.
    vm = VmSpec(
        name="box",
        hostname="box",
        image="img",
        cpu_cores=1,
        memory="1Gi",
        user_data="#cloud-config\nfqdn: box.{{ environment_domain }}\n",
    )
    template = Template(name="single", description="", vms=(vm,))

    with pytest.raises(ValueError, match="has no value here"):
        build_vmi(
            template=template,
            vm=vm,
            environment_id="e1",
            namespace="labs",
            session_id=None,
            environment_token=TOKEN,
        )


def test_render_user_data_tolerates_placeholder_spacing() -> None:
    rendered = render_user_data(
        "{{environment_token}} {{  environment_token  }} {{ environment_domain }}",
        environment_token="t0k",
        environment_domain="lv-e.labs.svc.cluster.local",
    )

    assert rendered == "t0k t0k lv-e.labs.svc.cluster.local"


def test_timestamps_round_trip_at_second_precision() -> None:
    moment = datetime(2026, 3, 1, 12, 30, 5, tzinfo=UTC)

    assert format_timestamp(moment) == "2026-03-01T12:30:05Z"
    assert parse_timestamp(format_timestamp(moment)) == moment


# Shipped templates against KubeVirt's own schema.


def shipped_environments() -> list[tuple[Template, EnvironmentManifests]]:
    return [
        (
            template,
            build_environment(
                template=template,
                environment_id="0f8fad5bd9cb469fa16570867728950e",
                namespace="labvirt-environments",
                session_id="0f8fad5b-d9cb-469f-a165-70867728950e",
                environment_token=TOKEN,
                created_at=datetime(2026, 3, 1, tzinfo=UTC),
            ),
        )
        for template in shipped_templates().values()
    ]


def shipped_environments_by_name() -> list[tuple[str, EnvironmentManifests]]:
    return [(template.name, manifests) for template, manifests in shipped_environments()]


def test_every_shipped_vmi_passes_the_strict_kubevirt_schema(
    strict_vmi_validator: jsonschema.Draft4Validator,
) -> None:
    for template, manifests in shipped_environments():
        for vmi in manifests.vmis:
            errors = [
                f"{'/'.join(map(str, error.absolute_path))}: {error.message}"
                for error in strict_vmi_validator.iter_errors(vmi)
            ]
            assert errors == [], f"{template.name}: {vmi['metadata']['name']}"


def test_strict_schema_catches_a_typo(strict_vmi_validator: jsonschema.Draft4Validator) -> None:
    # Guards the test above against a validator that accepts anything.
    vmi = build_vmi(
        template=SINGLE,
        vm=BOX,
        environment_id="e1",
        namespace="labs",
        session_id=None,
        environment_token=TOKEN,
    )
    vmi["spec"]["domain"]["devices"]["disks"][0]["disk"] = {"buss": "virtio"}

    assert not strict_vmi_validator.is_valid(vmi)


def test_shipped_vmis_are_ephemeral_and_well_named() -> None:
    for template, manifests in shipped_environments():
        assert len(manifests.vmis) == len(template.vms)
        for vmi in manifests.vmis:
            spec = vmi["spec"]
            assert len(vmi["metadata"]["name"]) <= 63
            assert DNS1123_LABEL.match(vmi["metadata"]["name"])
            volume_sources = [set(volume) - {"name"} for volume in spec["volumes"]]
            assert volume_sources == [{"containerDisk"}, {"cloudInitNoCloud"}]
            assert {disk["name"] for disk in spec["domain"]["devices"]["disks"]} == {
                volume["name"] for volume in spec["volumes"]
            }
            resources = spec["domain"]["resources"]
            assert resources["requests"]["memory"]
            # Sized by the template and fenced: limits equal to requests, CPU as many cores.
            assert resources["limits"] == resources["requests"]
            assert resources["requests"]["cpu"] == str(spec["domain"]["cpu"]["cores"])
            assert spec["networks"] == [{"name": "default", "pod": {}}]
            assert spec["domain"]["devices"]["interfaces"] == [
                {"name": "default", "masquerade": {}}
            ]
            assert spec["readinessProbe"]["tcpSocket"] == {"port": 22}
            assert vmi["metadata"]["annotations"][VM_COUNT_ANNOTATION] == str(len(template.vms))
            assert vmi["metadata"]["annotations"][CREATED_AT_ANNOTATION] == "2026-03-01T00:00:00Z"


def test_shipped_user_data_is_fully_rendered_cloud_config() -> None:
    for _, manifests in shipped_environments():
        for vmi in manifests.vmis:
            user_data = vmi["spec"]["volumes"][1]["cloudInitNoCloud"]["userData"]
            assert "{{" not in user_data
            assert "}}" not in user_data
            assert user_data.startswith("#cloud-config\n")
            assert isinstance(yaml.safe_load(user_data), dict)


def test_kubernetes_template_shares_one_subdomain_behind_its_service() -> None:
    templates = dict(shipped_environments_by_name())
    manifests = templates["kubernetes"]

    hostnames = [vmi["spec"]["hostname"] for vmi in manifests.vmis]
    subdomains = {vmi["spec"]["subdomain"] for vmi in manifests.vmis}
    assert hostnames == ["controlplane", "node01"]
    assert subdomains == {"lv-0f8fad5bd9cb469fa16570867728950e"}

    service = manifests.service
    assert service is not None
    assert service["metadata"]["name"] in subdomains
    assert service["spec"]["clusterIP"] == "None"
    assert service["metadata"]["namespace"] == manifests.vmis[0]["metadata"]["namespace"]
    for vmi in manifests.vmis:
        labels = vmi["metadata"]["labels"]
        assert service["spec"]["selector"].items() <= labels.items()
        assert labels[MANAGED_BY_LABEL] == "labvirt"
        assert labels[TEMPLATE_LABEL] == "kubernetes"
        assert labels[VM_LABEL] == vmi["spec"]["hostname"]
        user_data = vmi["spec"]["volumes"][1]["cloudInitNoCloud"]["userData"]
        assert TOKEN in user_data
        assert "controlplane.lv-0f8fad5bd9cb469fa16570867728950e.labvirt-environments" in user_data


def test_ubuntu_template_is_a_single_vm_without_service() -> None:
    manifests = dict(shipped_environments_by_name())["ubuntu"]

    assert manifests.service is None
    assert manifests.network_policy is None
    (vmi,) = manifests.vmis
    assert vmi["spec"]["hostname"] == "ubuntu"
    assert "subdomain" not in vmi["spec"]


# Property: names derived from ids are valid and stable.

environment_ids = st.from_regex(rf"\A[a-z0-9]{{1,{MAX_ENVIRONMENT_ID_LENGTH}}}\Z")
vm_names = st.from_regex(rf"\A[a-z0-9]([-a-z0-9]{{0,{MAX_VM_NAME_LENGTH - 2}}}[a-z0-9])?\Z")


@given(environment_id=environment_ids, vm_name=vm_names)
def test_derived_names_are_dns_labels_and_deterministic(environment_id: str, vm_name: str) -> None:
    vmi_name = environment_vmi_name(environment_id, vm_name)
    subdomain = environment_subdomain(environment_id)

    assert DNS1123_LABEL.match(vmi_name)
    assert len(vmi_name) <= 63
    assert DNS1123_LABEL.match(subdomain)
    assert subdomain[0].isalpha()  # Service names must start with a letter
    assert vmi_name == environment_vmi_name(environment_id, vm_name)
    assert subdomain == environment_subdomain(environment_id)
    assert vmi_name.startswith(subdomain + "-")


@given(first=st.tuples(environment_ids, vm_names), second=st.tuples(environment_ids, vm_names))
def test_distinct_environments_or_vms_never_share_a_vmi_name(
    first: tuple[str, str], second: tuple[str, str]
) -> None:
    if first != second:
        assert environment_vmi_name(*first) != environment_vmi_name(*second)
