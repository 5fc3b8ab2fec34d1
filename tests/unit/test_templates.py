"""Template parsing: good documents become Templates, bad ones say exactly what is wrong."""

from __future__ import annotations

import copy
from importlib import resources
from typing import Any

import pytest
import yaml

from shared.domain.template_parsing import TemplateError, parse_template, parse_templates
from shared.domain.templates import (
    DEFAULT_EXTEND_STEP_SECONDS,
    DEFAULT_HARD_DEADLINE_SECONDS,
    DEFAULT_IDLE_TIMEOUT_SECONDS,
    DEFAULT_MAX_LIFETIME_SECONDS,
    DEFAULT_STARTUP_TIMEOUT_SECONDS,
    Template,
    VmSpec,
    quantity_to_bytes,
)

USER_DATA = "#cloud-config\nhostname: box\n"
SSH_PROBE: dict[str, Any] = {
    "tcpSocket": {"port": 22},
    "initialDelaySeconds": 5,
    "periodSeconds": 5,
}


def vm_body(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "name": "box",
        "image": "quay.io/containerdisks/ubuntu:22.04",
        "cpu_cores": 1,
        "memory": "1Gi",
        "user_data": USER_DATA,
    }
    body.update(overrides)
    return body


def template_body(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"vms": [vm_body()]}
    body.update(overrides)
    return body


def shipped_document() -> dict[str, Any]:
    text = resources.files("shared.templates").joinpath("default.yaml").read_text()
    document = yaml.safe_load(text)
    assert isinstance(document, dict)
    return document


def test_minimal_template_gets_defaults_and_hostname_from_vm_name() -> None:
    template = parse_template("demo", template_body())

    assert template == Template(
        name="demo",
        description="",
        vms=(
            VmSpec(
                name="box",
                hostname="box",
                image="quay.io/containerdisks/ubuntu:22.04",
                cpu_cores=1,
                memory="1Gi",
                user_data=USER_DATA,
                readiness_probe=None,
            ),
        ),
        max_lifetime_seconds=2 * 60 * 60,
        idle_timeout_seconds=300,
        startup_timeout_seconds=600,
        extend_step_seconds=30 * 60,
        hard_deadline_seconds=4 * 60 * 60,
    )
    assert not template.is_multi_vm


def test_default_constants_match_the_documented_knobs() -> None:
    assert (
        DEFAULT_MAX_LIFETIME_SECONDS,
        DEFAULT_IDLE_TIMEOUT_SECONDS,
        DEFAULT_STARTUP_TIMEOUT_SECONDS,
        DEFAULT_EXTEND_STEP_SECONDS,
        DEFAULT_HARD_DEADLINE_SECONDS,
    ) == (7200, 300, 600, 1800, 14400)


def test_full_template_keeps_every_field() -> None:
    body = template_body(
        description="Two boxes",
        max_lifetime_seconds=60,
        idle_timeout_seconds=10,
        startup_timeout_seconds=20,
        extend_step_seconds=30,
        hard_deadline_seconds=120,
        vms=[
            vm_body(name="a", hostname="alpha", readiness_probe=SSH_PROBE),
            vm_body(name="b", cpu_cores=4, memory="512Mi"),
        ],
    )

    template = parse_template("pair", body)

    assert template.description == "Two boxes"
    assert (
        template.max_lifetime_seconds,
        template.idle_timeout_seconds,
        template.startup_timeout_seconds,
        template.extend_step_seconds,
        template.hard_deadline_seconds,
    ) == (60, 10, 20, 30, 120)
    assert [vm.name for vm in template.vms] == ["a", "b"]
    assert template.vm("a").hostname == "alpha"
    assert template.vm("a").readiness_probe == SSH_PROBE
    assert template.vm("b").cpu_cores == 4
    assert template.vm("b").memory_bytes == 512 * 2**20
    assert template.is_multi_vm


def test_vm_lookup_by_unknown_name_raises_key_error() -> None:
    with pytest.raises(KeyError):
        parse_template("demo", template_body()).vm("nope")


def test_readiness_probe_is_copied_not_shared_with_the_input() -> None:
    probe = copy.deepcopy(SSH_PROBE)
    template = parse_template("demo", template_body(vms=[vm_body(readiness_probe=probe)]))

    probe["tcpSocket"]["port"] = 2222

    assert template.vms[0].readiness_probe == SSH_PROBE


def test_templates_are_hashable_despite_the_probe_dict() -> None:
    template = parse_template("demo", template_body(vms=[vm_body(readiness_probe=SSH_PROBE)]))

    assert {template: 1}[template] == 1


@pytest.mark.parametrize(
    ("body", "message"),
    [
        pytest.param(
            template_body(colour="blue"),
            "template 'demo': unknown keys colour",
            id="unknown-template-key",
        ),
        pytest.param(
            template_body(vms=[vm_body(memmory="2Gi")]),
            "template 'demo', vm 'box': unknown keys memmory",
            id="unknown-vm-key",
        ),
        pytest.param(
            template_body(vms=[{k: v for k, v in vm_body().items() if k != "image"}]),
            "template 'demo', vm 'box', field 'image': is required",
            id="missing-image",
        ),
        pytest.param(
            template_body(vms=[vm_body(image="")]),
            "template 'demo', vm 'box', field 'image': must not be empty",
            id="empty-image",
        ),
        pytest.param(
            template_body(vms=[vm_body(image="quay.io/a b")]),
            "template 'demo', vm 'box', field 'image': must be a container image reference",
            id="image-with-space",
        ),
        pytest.param(
            template_body(vms=[vm_body(memory="2GB")]),
            "template 'demo', vm 'box', field 'memory': '2GB' is not a Kubernetes memory quantity",
            id="bad-memory-quantity",
        ),
        pytest.param(
            template_body(vms=[vm_body(memory=2048)]),
            "template 'demo', vm 'box', field 'memory': must be a string, got int 2048",
            id="memory-not-a-string",
        ),
        pytest.param(
            template_body(vms=[vm_body(memory="1Mi")]),
            "template 'demo', vm 'box', field 'memory': must be at least 64Mi, got '1Mi'",
            id="memory-too-small",
        ),
        pytest.param(
            template_body(vms=[vm_body(), vm_body(hostname="other")]),
            "template 'demo', field 'vms': duplicate VM name 'box'",
            id="duplicate-vm-names",
        ),
        pytest.param(
            template_body(vms=[vm_body(name="a", hostname="x"), vm_body(name="b", hostname="x")]),
            "template 'demo', field 'vms': duplicate VM hostname 'x'",
            id="duplicate-hostnames",
        ),
        pytest.param(
            template_body(vms=[vm_body(hostname="Box_1")]),
            "template 'demo', vm 'box', field 'hostname': must be a DNS-1123 label, got 'Box_1'",
            id="hostname-not-dns-label",
        ),
        pytest.param(
            template_body(vms=[vm_body(name="Box")]),
            "template 'demo', vm 'Box', field 'name': must be a DNS-1123 label of at most 27",
            id="vm-name-not-dns-label",
        ),
        pytest.param(
            template_body(vms=[vm_body(name="a" * 28)]),
            "field 'name': must be a DNS-1123 label of at most 27 characters",
            id="vm-name-too-long",
        ),
        pytest.param(
            template_body(vms=[vm_body(cpu_cores=0)]),
            "template 'demo', vm 'box', field 'cpu_cores': must be a positive integer, got 0",
            id="cpu-below-one",
        ),
        pytest.param(
            template_body(vms=[vm_body(cpu_cores=True)]),
            "template 'demo', vm 'box', field 'cpu_cores': must be an integer, got bool True",
            id="cpu-boolean",
        ),
        pytest.param(
            template_body(vms=[vm_body(cpu_cores="2")]),
            "template 'demo', vm 'box', field 'cpu_cores': must be an integer, got str '2'",
            id="cpu-string",
        ),
        pytest.param(
            template_body(max_lifetime_seconds=0),
            "template 'demo', field 'max_lifetime_seconds': must be a positive integer, got 0",
            id="zero-lifetime",
        ),
        pytest.param(
            template_body(idle_timeout_seconds=-5),
            "template 'demo', field 'idle_timeout_seconds': must be a positive integer, got -5",
            id="negative-idle-timeout",
        ),
        pytest.param(
            template_body(startup_timeout_seconds=0),
            "template 'demo', field 'startup_timeout_seconds': must be a positive integer",
            id="zero-startup-timeout",
        ),
        pytest.param(
            template_body(extend_step_seconds=1.5),
            "template 'demo', field 'extend_step_seconds': must be an integer, got float 1.5",
            id="fractional-extend-step",
        ),
        pytest.param(
            template_body(max_lifetime_seconds=600, hard_deadline_seconds=300),
            "template 'demo', field 'hard_deadline_seconds': must be at least "
            "max_lifetime_seconds (600), got 300",
            id="hard-deadline-before-lifetime",
        ),
        pytest.param(
            {"description": "no vms"},
            "template 'demo', field 'vms': is required",
            id="missing-vms",
        ),
        pytest.param(
            template_body(vms=[]),
            "template 'demo', field 'vms': must list at least one VM",
            id="empty-vms",
        ),
        pytest.param(
            template_body(vms={"box": vm_body()}),
            "template 'demo', field 'vms': must be a list of VMs, got dict",
            id="vms-as-mapping",
        ),
        pytest.param(
            template_body(vms=["box"]),
            "template 'demo', field 'vms[0]': must be a mapping, got str",
            id="vm-not-a-mapping",
        ),
        pytest.param(
            template_body(vms=[vm_body(name=None)]),
            "template 'demo', vms[0], field 'name': is required",
            id="vm-without-name",
        ),
        pytest.param(
            template_body(description=["x"]),
            "template 'demo', field 'description': must be a string, got list",
            id="description-not-a-string",
        ),
        pytest.param(
            template_body(vms=[vm_body(user_data="hostname: box\n")]),
            "template 'demo', vm 'box', field 'user_data': must start with a cloud-init header",
            id="user-data-without-header",
        ),
        pytest.param(
            template_body(vms=[vm_body(user_data="#cloud-config\nx: {{ ds.meta_data }}\n")]),
            "template 'demo', vm 'box', field 'user_data': unknown placeholders ds.meta_data "
            "(known: environment_domain, environment_token)",
            id="unknown-placeholder",
        ),
        pytest.param(
            template_body(vms=[vm_body(user_data="#cloud-config\nfqdn: {{ environment_domain }}")]),
            "template 'demo', vm 'box', field 'user_data': {{ environment_domain }} is only "
            "available in multi-VM templates",
            id="domain-placeholder-in-single-vm",
        ),
        pytest.param(
            template_body(vms=[vm_body(readiness_probe="tcp 22")]),
            "template 'demo', vm 'box', field 'readiness_probe': must be a KubeVirt probe "
            "mapping, got str",
            id="probe-not-a-mapping",
        ),
        pytest.param(
            template_body(vms=[vm_body(readiness_probe={"tcpSocket": {"port": 22}, "delay": 1})]),
            "field 'readiness_probe': unknown keys delay",
            id="probe-unknown-key",
        ),
        pytest.param(
            template_body(vms=[vm_body(readiness_probe={"periodSeconds": 5})]),
            "field 'readiness_probe': must set exactly one of exec, guestAgentPing, httpGet, "
            "tcpSocket, got none",
            id="probe-without-handler",
        ),
        pytest.param(
            template_body(
                vms=[vm_body(readiness_probe={"tcpSocket": {"port": 22}, "guestAgentPing": {}})]
            ),
            "field 'readiness_probe': must set exactly one of",
            id="probe-with-two-handlers",
        ),
        pytest.param(
            template_body(vms=[vm_body(readiness_probe={"tcpSocket": {"port": 0}})]),
            "field 'readiness_probe': tcpSocket.port must be 1-65535 or a name, got 0",
            id="probe-port-zero",
        ),
        pytest.param(
            template_body(vms=[vm_body(readiness_probe={"tcpSocket": {"prot": 22}})]),
            "field 'readiness_probe': tcpSocket has unknown keys prot",
            id="probe-tcp-typo",
        ),
        pytest.param(
            template_body(
                vms=[vm_body(readiness_probe={"tcpSocket": {"port": 22}, "periodSeconds": 0})]
            ),
            "field 'readiness_probe': periodSeconds must be an integer >= 1",
            id="probe-period-zero",
        ),
        pytest.param(
            template_body(vms=[vm_body(readiness_probe={"guestAgentPing": True})]),
            "field 'readiness_probe': guestAgentPing must be a mapping, got bool",
            id="probe-handler-not-a-mapping",
        ),
    ],
)
def test_parse_template_names_the_template_and_field(body: dict[str, Any], message: str) -> None:
    with pytest.raises(TemplateError) as excinfo:
        parse_template("demo", body)

    assert message in str(excinfo.value)


def test_template_name_must_be_a_dns_label() -> None:
    with pytest.raises(TemplateError, match="template 'Big Box': name must be a DNS-1123 label"):
        parse_template("Big Box", template_body())


def test_template_error_is_a_value_error() -> None:
    assert issubclass(TemplateError, ValueError)


def test_parse_templates_keys_templates_by_name() -> None:
    templates = parse_templates({"templates": {"one": template_body(), "two": template_body()}})

    assert sorted(templates) == ["one", "two"]
    assert templates["one"].name == "one"


@pytest.mark.parametrize(
    ("document", "message"),
    [
        pytest.param({}, "'templates' must be a mapping of name to template, got nothing", id="no"),
        pytest.param({"templates": {}}, "'templates' defines no template", id="empty"),
        pytest.param({"templates": []}, "must be a mapping of name to template, got list", id="l"),
        pytest.param(
            {"templates": {"a": template_body()}, "version": 2},
            "templates document: unknown keys version",
            id="unknown-top-level-key",
        ),
        pytest.param({"templates": {"a": None}}, "template 'a': must be a mapping", id="null"),
        pytest.param(
            {"templates": {1: template_body()}}, "template name 1 is not a string", id="int"
        ),
        pytest.param(
            {"templates": {"a": template_body(vms=[vm_body(cpu_cores=0)])}},
            "template 'a', vm 'box', field 'cpu_cores'",
            id="nested-error",
        ),
    ],
)
def test_parse_templates_rejects_bad_documents(document: dict[Any, Any], message: str) -> None:
    with pytest.raises(TemplateError) as excinfo:
        parse_templates(document)

    assert message in str(excinfo.value)


@pytest.mark.parametrize(
    ("quantity", "expected"),
    [
        ("2Gi", 2 * 2**30),
        ("512Mi", 512 * 2**20),
        ("1.5Gi", 1536 * 2**20),
        ("1G", 10**9),
        ("100k", 100_000),
        ("1024", 1024),
        ("0.5", 1),
    ],
)
def test_quantity_to_bytes(quantity: str, expected: int) -> None:
    assert quantity_to_bytes(quantity) == expected


@pytest.mark.parametrize("quantity", ["", "2GB", "-1Gi", "1e3", "500m", "Gi", "1 Gi", "2gi"])
def test_quantity_to_bytes_rejects_what_a_template_should_not_say(quantity: str) -> None:
    with pytest.raises(ValueError, match="not a Kubernetes memory quantity"):
        quantity_to_bytes(quantity)


def test_shipped_templates_parse() -> None:
    templates = parse_templates(shipped_document())

    assert set(templates) == {"ubuntu", "kubernetes"}

    ubuntu = templates["ubuntu"]
    assert [(vm.name, vm.hostname) for vm in ubuntu.vms] == [("ubuntu", "ubuntu")]
    assert ubuntu.vms[0].image == "quay.io/containerdisks/ubuntu:22.04"
    assert not ubuntu.is_multi_vm

    kubernetes = templates["kubernetes"]
    assert [(vm.name, vm.hostname) for vm in kubernetes.vms] == [
        ("controlplane", "controlplane"),
        ("node01", "node01"),
    ]
    assert kubernetes.is_multi_vm

    for template in templates.values():
        assert template.description
        for vm in template.vms:
            assert (vm.cpu_cores, vm.memory) == (2, "2Gi")
            assert vm.readiness_probe is not None
            assert vm.readiness_probe["tcpSocket"] == {"port": 22}


def test_shipped_user_data_is_cloud_config_with_a_sudo_learner() -> None:
    templates = parse_templates(shipped_document())

    for template in templates.values():
        for vm in template.vms:
            cloud_config = yaml.safe_load(vm.user_data)
            assert vm.user_data.startswith("#cloud-config\n")
            assert cloud_config["hostname"] == vm.hostname
            (learner,) = cloud_config["users"]
            assert learner["name"] == "learner"
            assert learner["sudo"] == "ALL=(ALL) NOPASSWD:ALL"
            assert [command for command in cloud_config["runcmd"] if "ssh" in command] == [
                ["systemctl", "enable", "--now", "ssh"]
            ]


def test_kubernetes_nodes_share_the_environment_token() -> None:
    kubernetes = parse_templates(shipped_document())["kubernetes"]
    controlplane, node01 = kubernetes.vms

    assert "kubeadm init" in controlplane.user_data
    assert "kubeadm join" in node01.user_data
    for vm in (controlplane, node01):
        assert "--token {{ environment_token }}" in vm.user_data
    # The bootstrap token outlives the join by a margin, not the environment.
    assert "--token-ttl 1h " in controlplane.user_data
    assert "--token-ttl 0" not in controlplane.user_data
