"""Chaos, small and honest: the API server fails 20% of requests and 20% of VMs never boot.

Every session must still end in a clear state (ready, or failed with a reason), and once the
learners leave, nothing labvirt made may remain in the cluster; labvirt may make at most three
times the Kubernetes calls per session of a fault-free class of the same size (``fault_free``,
measured once for the run). `make chaos` runs a larger version (LABVIRT_CHAOS_SESSIONS) and,
with `-s`, prints each scenario's figures.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.conftest import claim_redis_database
from tests.e2e.chaos_measures import (
    NODES,
    SESSIONS,
    ClassRun,
    KubeCalls,
    create_class,
    leave,
    report,
)
from tests.e2e.harness import System, start_system, wait_until

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def chaotic(tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    # Its own Redis database, so the shared system's queues stay clean.
    tmp: Path = tmp_path_factory.mktemp("chaos")
    with claim_redis_database() as url:
        system = start_system(
            url,
            tmp,
            sim_args=[
                "--error-rate",
                "0.2",
                "--boot-failure-rate",
                "0.2",
                "--seed",
                "3",
                "--nodes",
                str(NODES),
            ],
        )
        try:
            yield system
        finally:
            system.stop()


def test_every_session_settles_and_nothing_leaks(
    chaotic: System, fault_free: ClassRun, capsys: pytest.CaptureFixture[str]
) -> None:
    report(capsys, fault_free, None)
    calls = KubeCalls(chaotic)
    started = time.time()
    created = create_class(chaotic, "chaos", SESSIONS)
    settled = [chaotic.wait_state(s["id"], "ready", "failed", timeout=120) for s in created]
    for session in settled:
        if session["state"] == "failed":
            assert session.get("reason"), session
    assert any(s["state"] == "ready" for s in settled), "nothing survived 20% errors"
    run = ClassRun("20% failing calls, 20% failing boots", settled)
    run.measure_settling()
    run.measure_recovery(calls.vmis(), back=started)

    # Why each session is going: the learner's delete, or the failure that ended it.
    leaving: dict[str, str] = {}
    for session in settled:
        if session["state"] == "ready":
            response = chaotic.call("DELETE", f"/v1/sessions/{session['id']}")
            assert response.status_code == 202, response.text
            assert response.json().get("reason"), response.text
            leaving[session["id"]] = response.json()["reason"]
        else:
            leaving[session["id"]] = session["reason"]
    for session in settled:
        final = chaotic.wait_state(session["id"], "ended", "failed", timeout=120)
        # A delete ends the session however the cluster misbehaves; a failure stays a failure.
        expected = "ended" if session["state"] == "ready" else "failed"
        assert final["state"] == expected, f"a {session['state']} session became {final}"
        why = leaving[session["id"]]
        assert final.get("reason") == why, f"{session['id']} left for {why!r}, yet: {final}"
    run.calls = calls.count()
    report(capsys, run, fault_free)
    run.check(fault_free)

    # Stop the faults to look at the cluster as it is.
    faults = requests.put(
        f"{chaotic.sim.url}/_sim/faults", json={"error_rate": 0, "boot_failure_rate": 0}, timeout=5
    )
    assert faults.status_code == 200, faults.text
    wait_until(
        lambda: chaotic.sim.vmis() == [], timeout=120, what="every VMI labvirt made to be gone"
    )
    assert chaotic.sim.services() == []


def _faulty_class(tmp: Path, *, error_rate: float) -> ClassRun:
    """A class created, booted and deleted against a simulator failing ``error_rate`` of its
    calls (and cutting watches)."""
    with claim_redis_database() as url:
        system = start_system(
            url,
            tmp,
            sim_args=[
                "--error-rate",
                str(error_rate),
                # Every watch is cut within 2 s: the informers resume again and again.
                "--watch-drop-rate",
                "1",
                "--seed",
                "5",
                "--nodes",
                str(NODES),
            ],
        )
        try:
            before = requests.get(f"{system.sim.url}/_sim/stats", timeout=5).json()
            calls = KubeCalls(system)
            created = create_class(system, "calls", SESSIONS)
            settled = [system.wait_state(s["id"], "ready", "failed", timeout=120) for s in created]
            run = ClassRun(f"{error_rate:.0%} failing calls, cut watches", settled)
            run.measure_settling()
            leave(system, settled, timeout=120)
            run.calls = calls.count()
            after = requests.get(f"{system.sim.url}/_sim/stats", timeout=5).json()
        finally:
            system.stop()
    injected = after["injectedErrors"] - before["injectedErrors"]
    watches = after["watchesStarted"] - before["watchesStarted"]
    dropped = after["droppedWatches"] - before["droppedWatches"]
    run.note = f"{injected} injected errors, {dropped} watches cut, {watches} watches started"
    assert injected > 0, "the faults were not injected"
    assert dropped > 0, "no watch was cut"
    return run


def test_kubernetes_calls_under_faults_stay_within_three_times_the_fault_free_run(
    fault_free: ClassRun,
    tmp_path_factory: pytest.TempPathFactory,
    capsys: pytest.CaptureFixture[str],
) -> None:
    faulty = _faulty_class(tmp_path_factory.mktemp("calls-faulty"), error_rate=0.2)
    report(capsys, faulty, fault_free)
    faulty.check(fault_free)
