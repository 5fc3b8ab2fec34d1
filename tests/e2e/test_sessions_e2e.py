"""From an HTTP request to Running VMIs in the simulator and back, through real processes."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest

from tests.conftest import STRICT_VMI_SCHEMA, require_kubevirt_reference
from tests.e2e.harness import SHORT_LIFETIME_SECONDS, System, wait_until

pytestmark = pytest.mark.e2e

MANAGED = "app.kubernetes.io/managed-by"


def _environment_selector(vmis: list[dict[str, Any]]) -> str:
    envs = {v["metadata"]["labels"]["labvirt.io/environment"] for v in vmis}
    assert len(envs) == 1
    return f"{MANAGED}=labvirt,labvirt.io/environment={envs.pop()}"


def _session_vmis(system: System, session_id: str) -> list[dict[str, Any]]:
    return system.sim.vmis(f"{MANAGED}=labvirt,labvirt.io/session={session_id}")


def _assert_valid(vmi: dict[str, Any]) -> None:
    """Checked last in a test: without KubeVirt's schema it skips, after everything else ran."""
    schema = json.loads(require_kubevirt_reference(STRICT_VMI_SCHEMA).read_text())
    validator = jsonschema.Draft4Validator(schema)
    # Validate what labvirt asked for: the object minus what the cluster added.
    requested = {k: v for k, v in vmi.items() if k != "status"}
    errors = [e.message for e in validator.iter_errors(requested)]
    assert not errors, errors


def test_ubuntu_session_becomes_ready_and_is_removed(system: System) -> None:
    # Not "alice": `labvirt dev`'s test leaves her session in this database, and a second
    # create for the same user and template is a reconnect.
    created = system.create("ubuntu", "uma")
    assert created["state"] == "provisioning"
    assert created["warm"] is False
    assert created["token"]

    ready = system.wait_state(created["id"], "ready", "failed")
    assert ready["state"] == "ready", ready
    [vm] = ready["vms"]
    assert vm["name"] == "ubuntu"
    assert vm["hostname"] == "ubuntu"
    assert vm["ready"] is True
    assert vm["phase"] == "Running"
    assert vm["ip"]

    [vmi] = _session_vmis(system, created["id"])
    labels = vmi["metadata"]["labels"]
    assert labels[MANAGED] == "labvirt"
    assert labels["labvirt.io/template"] == "ubuntu"
    assert labels["labvirt.io/session"] == created["id"]
    assert labels["labvirt.io/environment"]
    assert vmi["status"]["phase"] == "Running"
    assert vmi["status"]["interfaces"][0]["ipAddress"] == vm["ip"]
    volumes = vmi["spec"]["volumes"]
    assert {next(iter(set(v) - {"name"})) for v in volumes} <= {"containerDisk", "cloudInitNoCloud"}

    response = system.call("DELETE", f"/v1/sessions/{created['id']}")
    assert response.status_code == 202
    assert response.json()["state"] == "terminating"
    ended = system.wait_state(created["id"], "ended", "failed")
    assert ended["state"] == "ended"
    assert _session_vmis(system, created["id"]) == []
    _assert_valid(vmi)


def test_kubernetes_session_has_two_named_vms_on_one_subdomain(system: System) -> None:
    created = system.create("kubernetes", "bob")
    ready = system.wait_state(created["id"], "ready", "failed")
    assert ready["state"] == "ready", ready
    assert {vm["hostname"] for vm in ready["vms"]} == {"controlplane", "node01"}
    assert all(vm["ready"] and vm["ip"] for vm in ready["vms"])

    vmis = _session_vmis(system, created["id"])
    assert {v["spec"]["hostname"] for v in vmis} == {"controlplane", "node01"}
    subdomains = {v["spec"]["subdomain"] for v in vmis}
    assert len(subdomains) == 1
    for vmi in vmis:
        assert vmi["status"]["phase"] == "Running"

    selector = _environment_selector(vmis)
    [service] = system.sim.services(selector)
    assert service.metadata.name == subdomains.pop()
    assert service.spec.cluster_ip == "None"
    [policy] = system.sim.network_policies(selector)
    assert policy.metadata.name == service.metadata.name
    assert policy.spec.policy_types == ["Ingress", "Egress"]
    for vmi in vmis:
        labels = vmi["metadata"]["labels"]
        assert all(labels.get(k) == v for k, v in service.spec.selector.items())
        # The fence lets the environment's VMs, and only they, reach each other.
        for members in (
            policy.spec.pod_selector,
            policy.spec.ingress[0]._from[0].pod_selector,
            policy.spec.egress[0].to[0].pod_selector,
        ):
            assert members.match_labels.items() <= labels.items()
    assert "environment_token" not in created
    assert "environment_token" not in ready

    assert system.call("DELETE", f"/v1/sessions/{created['id']}").status_code == 202
    assert system.wait_state(created["id"], "ended", "failed")["state"] == "ended"
    assert system.sim.vmis(selector) == []
    assert system.sim.services(selector) == []
    assert system.sim.network_policies(selector) == []
    for vmi in vmis:
        _assert_valid(vmi)


def test_close_with_the_session_token_alone(system: System) -> None:
    created = system.create("ubuntu", "carol")
    system.wait_state(created["id"], "ready", "failed")
    # navigator.sendBeacon: a form body carrying the token, no Authorization header.
    response = system.call(
        "POST", f"/v1/sessions/{created['id']}/close", token=None, data={"token": created["token"]}
    )
    assert response.status_code == 202, response.text
    assert system.wait_state(created["id"], "ended", "failed")["state"] == "ended"
    assert _session_vmis(system, created["id"]) == []


def test_beat_reaper_ends_a_session_past_its_lifetime(system: System) -> None:
    created = system.create("short", "dave")
    ended = system.wait_state(created["id"], "ended", "failed", timeout=SHORT_LIFETIME_SECONDS + 60)
    assert ended["state"] == "ended"
    states = [h["state"] for h in ended["history"]]
    assert states[0] == "provisioning"
    assert states[-2:] == ["terminating", "ended"]
    assert ended["history"][-2]["reason"] == "maximum lifetime reached"
    wait_until(
        lambda: _session_vmis(system, created["id"]) == [],
        timeout=30,
        what="the reaped session's VMIs to go",
    )


def test_a_session_token_opens_no_other_session(system: System) -> None:
    first = system.create("ubuntu", "erin")
    second = system.create("ubuntu", "frank")
    response = system.call("GET", f"/v1/sessions/{second['id']}", token=first["token"])
    assert response.status_code == 404
    response = system.call("DELETE", f"/v1/sessions/{second['id']}", token=first["token"])
    assert response.status_code == 404
    own = system.call("GET", f"/v1/sessions/{first['id']}", token=first["token"])
    assert own.status_code == 200
    for session in (first, second):
        system.call("DELETE", f"/v1/sessions/{session['id']}")
    for session in (first, second):
        assert system.wait_state(session["id"], "ended", "failed")["state"] == "ended"
