"""Session lifecycle through real processes: the reaper and the reconciler run by beat, progress
streamed to an EventSource-like client, Redis flushed mid-run.

One system for the whole module, with short clocks: idle timeout 4 s, reaper and reconciler
every second, orphans deleted after 2 s. It has a Redis database of its own (the shared e2e
system keeps its default clocks).
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
import redis
import requests
import yaml
from kubernetes import client

from shared.adapters.session_indexes import session_key
from tests.conftest import claim_redis_database, flush_database
from tests.e2e.harness import NAMESPACE, System, start, start_system, wait_until

pytestmark = pytest.mark.e2e

IDLE = 4
TICK = 1
GRACE = 2
MANAGED = "app.kubernetes.io/managed-by"


def quick_templates(tmp: Path) -> Path:
    """The shipped templates plus ``quick``: ubuntu without the readiness probe's 5 s delay."""
    data = yaml.safe_load(resources.files("shared.templates").joinpath("default.yaml").read_text())
    quick = dict(data["templates"]["ubuntu"])
    quick["vms"] = [{k: v for k, v in vm.items() if k != "readiness_probe"} for vm in quick["vms"]]
    quick["description"] = "ubuntu, ready as soon as it runs"
    data["templates"]["quick"] = quick
    path = tmp / "lifecycle-templates.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def lifecycle_db() -> Iterator[str]:
    with claim_redis_database() as url:
        yield url


@pytest.fixture(scope="module")
def system(lifecycle_db: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    tmp = tmp_path_factory.mktemp("lifecycle")
    running = start_system(
        lifecycle_db,
        tmp,
        extra_env={
            "LABVIRT_TEMPLATES": str(quick_templates(tmp)),
            "LABVIRT_IDLE_TIMEOUT_SECONDS": str(IDLE),
            "LABVIRT_REAPER_INTERVAL_SECONDS": str(TICK),
            "LABVIRT_RECONCILE_INTERVAL_SECONDS": str(TICK),
            "LABVIRT_ORPHAN_GRACE_SECONDS": str(GRACE),
            "LABVIRT_EXPIRY_WARNING_SECONDS": "2",
            "LABVIRT_EVENTS_KEEPALIVE_SECONDS": "1",
        },
    )
    try:
        yield running
    finally:
        running.stop()


def seconds(stamp: str) -> float:
    return datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp()


def session_vmis(system: System, session_id: str) -> list[dict[str, Any]]:
    return system.sim.vmis(f"{MANAGED}=labvirt,labvirt.io/session={session_id}")


@contextmanager
def heartbeats(system: System, session: dict[str, Any], every: float = 1.0) -> Iterator[None]:
    """The learner's tab: a heartbeat with the session token every second until it closes."""
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(every):
            try:
                system.call(
                    "POST", f"/v1/sessions/{session['id']}/heartbeat", token=session["token"]
                )
            except requests.RequestException:
                continue

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)


def ready_session(system: System, user: str) -> dict[str, Any]:
    created = system.create("quick", user)
    ready = system.wait_state(created["id"], "ready", "failed", timeout=30)
    assert ready["state"] == "ready", ready
    return {**ready, "token": created["token"]}


def close(system: System, session: dict[str, Any]) -> None:
    system.call("DELETE", f"/v1/sessions/{session['id']}")


# -- idle, heartbeats, beacon close ----------------------------------------------------------


def test_a_silent_session_is_reaped_within_idle_plus_two_ticks_and_its_vmis_go(
    system: System,
) -> None:
    session = ready_session(system, "silent")
    beat = system.call("POST", f"/v1/sessions/{session['id']}/heartbeat", token=session["token"])
    last_seen = time.time()
    assert beat.status_code == 200

    ended = system.wait_state(session["id"], "ended", "failed", timeout=IDLE + 20)

    assert ended["state"] == "ended"
    closing = next(h for h in ended["history"] if h["state"] == "terminating")
    assert closing["reason"] == "idle timeout"
    reaped_at = seconds(closing["at"])
    # History times are whole seconds: one second of rounding on top of the bound.
    assert reaped_at - last_seen <= IDLE + 2 * TICK + 1
    wait_until(lambda: session_vmis(system, session["id"]) == [], timeout=15, what="VMIs gone")


def test_heartbeats_keep_a_session_past_its_idle_timeout(system: System) -> None:
    session = ready_session(system, "present")

    with heartbeats(system, session):
        time.sleep(IDLE + 2 * TICK + 1)  # past when the reaper would have ended it
        alive = system.session(session["id"])

    assert alive["state"] == "ready"
    assert len(session_vmis(system, session["id"])) == 1
    close(system, session)


@pytest.mark.parametrize("how", ["form", "json-blob"])
def test_a_beacon_close_with_the_token_alone(system: System, how: str) -> None:
    session = ready_session(system, f"beacon-{how}")
    url = f"/v1/sessions/{session['id']}/close"
    if how == "form":
        response = system.call("POST", url, token=None, data={"token": session["token"]})
    else:  # navigator.sendBeacon(url, new Blob([JSON.stringify({token})], {type: "text/plain"}))
        response = system.call(
            "POST",
            url,
            token=None,
            data=json.dumps({"token": session["token"]}),
            headers={"Content-Type": "text/plain;charset=UTF-8"},
        )

    assert response.status_code == 202, response.text
    assert system.wait_state(session["id"], "ended", "failed")["state"] == "ended"
    wait_until(lambda: session_vmis(system, session["id"]) == [], timeout=15, what="VMIs gone")


# -- the reconciler --------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_deleting_a_sessions_vmi_with_kubectl_fails_the_session(system: System) -> None:
    session = ready_session(system, "kubectl-victim")
    [vmi] = session_vmis(system, session["id"])
    name = vmi["metadata"]["name"]

    with heartbeats(system, session):
        subprocess.run(
            [
                "kubectl",
                *("--kubeconfig", str(system.sim.kubeconfig), "-n", NAMESPACE),
                *("delete", "vmi", name, "--wait=false"),
            ],
            check=True,
            capture_output=True,
            timeout=30,
        )
        failed = system.wait_state(session["id"], "failed", "ended", timeout=15)

    assert failed["state"] == "failed"
    assert failed["reason"] in {
        f"VM {name} vanished from the cluster",
        f"VM {name} is being deleted",
    }
    assert failed["history"][-1] == {
        "state": "failed",
        "at": failed["history"][-1]["at"],
        "reason": failed["reason"],
    }


def test_a_managed_vmi_that_nothing_owns_is_deleted_after_the_grace_time(system: System) -> None:
    body = {
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachineInstance",
        "metadata": {"name": "stray-e2e", "labels": {MANAGED: "labvirt"}},
        "spec": {
            "domain": {
                "devices": {
                    "disks": [{"name": "containerdisk", "disk": {"bus": "virtio"}}],
                    "interfaces": [{"name": "default", "masquerade": {}}],
                },
                "resources": {"requests": {"memory": "64Mi"}},
            },
            "networks": [{"name": "default", "pod": {}}],
            "terminationGracePeriodSeconds": 0,
            "volumes": [
                {
                    "name": "containerdisk",
                    "containerDisk": {"image": "quay.io/containerdisks/ubuntu:22.04"},
                }
            ],
        },
    }
    with system.sim.api() as api:
        client.CustomObjectsApi(api).create_namespaced_custom_object(
            "kubevirt.io", "v1", NAMESPACE, "virtualmachineinstances", body
        )
    created = time.monotonic()

    def stray() -> list[dict[str, Any]]:
        return [v for v in system.sim.vmis() if v["metadata"]["name"] == "stray-e2e"]

    assert stray()  # not at once: it is younger than the grace time
    wait_until(lambda: not stray(), timeout=GRACE + 10 * TICK, what="the orphan to be deleted")
    assert time.monotonic() - created >= GRACE - 1  # creationTimestamp has whole seconds


# -- progress --------------------------------------------------------------------------------


class EventStream:
    """What a browser's EventSource does with the stream, enough for these tests."""

    def __init__(self, system: System, session: dict[str, Any], last_event_id: str | None = None):
        headers = {"Accept": "text/event-stream"}
        if last_event_id:
            headers["Last-Event-ID"] = last_event_id
        self.response = requests.get(
            f"{system.base_url}/v1/sessions/{session['id']}/events",
            params={"token": session["token"]},
            headers=headers,
            stream=True,
            timeout=(5, 10),
        )
        self.comments = 0
        self._lines = self.response.iter_lines(decode_unicode=True)

    def next_event(self) -> dict[str, Any] | None:
        """The next event; None when the server ended the stream."""
        fields: dict[str, str] = {}
        for line in self._lines:
            if line == "":
                if "event" in fields:
                    return {
                        "id": fields["id"],
                        "event": fields["event"],
                        "data": json.loads(fields["data"]),
                    }
                fields = {}
                continue
            if line.startswith(":"):
                self.comments += 1
                continue
            name, _, value = line.partition(":")
            fields[name] = value.removeprefix(" ")
        return None

    def until(self, stage: str) -> list[dict[str, Any]]:
        seen = []
        while (event := self.next_event()) is not None:
            seen.append(event)
            if event["event"] == stage:
                return seen
        raise AssertionError(f"the stream ended before {stage!r}: {[e['event'] for e in seen]}")

    def close(self) -> None:
        self.response.close()


def test_the_event_stream_follows_a_cold_session_and_stays_open_until_it_ends(
    system: System,
) -> None:
    created = system.create("quick", "watcher")
    session = {"id": created["id"], "token": created["token"]}
    stream = EventStream(system, session)
    assert stream.response.status_code == 200
    assert stream.response.headers["Content-Type"].startswith("text/event-stream")

    with heartbeats(system, session):
        booting = stream.until("ready")
        comments_at_ready = stream.comments
        # Still open after ready: keep-alives arrive while the learner works.
        time.sleep(2.5)
    later = stream.until("ended")  # heartbeats stopped: expiring-soon, then the idle end
    assert stream.next_event() is None  # the server ends the stream after the last stage
    stream.close()

    stages = [e["event"] for e in booting]
    assert stages[0] == "queued"
    assert stages[1] == "creating"
    assert stages[-1] == "ready"
    assert set(stages[2:-1]) == {"booting"}
    assert [e["data"]["ready"] for e in booting[2:-1]][-1] == 1
    assert booting[2]["data"]["total"] == 1
    assert stream.comments > comments_at_ready
    assert [e["event"] for e in later] == ["expiring-soon", "ended"]
    assert later[-1]["data"]["reason"] == "idle timeout"

    # A reconnect from the middle misses nothing and repeats nothing...
    everything = booting + later
    for cut in (1, len(booting) - 1, len(everything) - 2):
        resumed = EventStream(system, session, last_event_id=everything[cut]["id"])
        rest = resumed.until("ended")
        resumed.close()
        assert rest == everything[cut + 1 :]
    # ...and after the end there is nothing more: 204 tells EventSource to stop.
    done = EventStream(system, session, last_event_id=everything[-1]["id"])
    assert done.response.status_code == 204


# -- Redis loses its data --------------------------------------------------------------------


def test_after_flushdb_the_reconciler_restores_every_live_session(
    system: System, lifecycle_db: str
) -> None:
    sessions = [ready_session(system, f"survivor{i}") for i in range(3)]
    with (
        heartbeats(system, sessions[0]),
        heartbeats(system, sessions[1]),
        heartbeats(system, sessions[2]),
    ):
        flush_database(lifecycle_db)
        assert system.call("GET", f"/v1/sessions/{sessions[0]['id']}").status_code == 404

        def restored() -> bool:
            return all(
                system.call("GET", f"/v1/sessions/{s['id']}").status_code == 200 for s in sessions
            )

        # Two reconcile passes (one a second) and a little slack for the beat's first tick.
        wait_until(restored, timeout=4 * TICK + 2, what="the sessions to be rebuilt")
        for session in sessions:
            # The learner's own token still works, and the session is whole again.
            own = system.call("GET", f"/v1/sessions/{session['id']}", token=session["token"])
            assert own.status_code == 200
            body = own.json()
            assert body["state"] == "ready"
            assert body["user"] == session["user"]
            # Deadlines are kept on the VMIs to the second, rounded up: never earlier.
            assert 0 <= seconds(body["expires_at"]) - seconds(session["expires_at"]) <= 1
            assert [vm["ready"] for vm in body["vms"]] == [True]

    # No VMI is left unowned: every labvirt VMI belongs to a live session Redis knows.
    store = redis.Redis.from_url(lifecycle_db)
    for vmi in system.sim.vmis():
        if vmi["metadata"].get("deletionTimestamp"):
            continue
        owner = vmi["metadata"]["labels"].get("labvirt.io/session")
        assert owner is not None, vmi["metadata"]["name"]
        document = store.get(session_key(owner))
        assert document is not None, owner
        assert json.loads(document)["state"] in {"provisioning", "ready", "terminating"}
    store.close()
    for session in sessions:
        close(system, session)
        assert system.wait_state(session["id"], "ended", "failed")["state"] == "ended"


# -- shutdown --------------------------------------------------------------------------------


def test_the_gateway_stops_promptly_with_event_streams_open(system: System, tmp_path: Path) -> None:
    """Event streams live in the gateway: stopping it ends them at once, not after a timeout.
    The gateway is started again afterwards, for the tests that follow."""
    session = ready_session(system, "streaming-at-shutdown")
    with heartbeats(system, session):
        streams = [EventStream(system, session) for _ in range(3)]
        for stream in streams:
            stream.until("ready")

        gateway = system.procs["gateway"].process
        started = time.monotonic()
        gateway.send_signal(signal.SIGTERM)
        gateway.wait(timeout=9)
        stopped = time.monotonic() - started

        assert stopped < 5
        for stream in streams:
            leftovers = []
            while (event := stream.next_event()) is not None:  # the server closed each stream
                leftovers.append(event["event"])
            assert set(leftovers) <= {"expiring-soon"}
            stream.close()
        system.procs["gateway"] = start(
            "gateway", [sys.executable, "-m", "labvirt.cli", "gateway"], system.env, tmp_path
        )
        wait_until(
            lambda: _answers(f"{system.base_url}/readyz"), timeout=30, what="the gateway again"
        )
    close(system, session)


def _answers(url: str) -> bool:
    try:
        return requests.get(url, timeout=1).status_code == 200
    except requests.ConnectionError:
        return False
