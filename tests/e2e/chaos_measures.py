"""What the chaos tests measure of a class of sessions, and the line `make chaos` prints.

Every scenario is compared with a fault-free class of the same size: how the sessions ended,
how long they took to settle, how many Kubernetes calls labvirt made per session (the
simulator counts every request it serves but its own ``/_sim`` endpoints; the tests' own reads
of the cluster are taken off) and, after a fault, how long each session took to settle counted
from the fault's end (a worker or Redis back) and from the later of that and the moment its
VMs were ready in the simulator.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import requests
from kubernetes.client.exceptions import ApiException

from tests.conftest import claim_redis_database
from tests.e2e.harness import System, start_system

# The size of every chaos class; `make chaos` sets 200.
SESSIONS = int(os.environ.get("LABVIRT_CHAOS_SESSIONS", "12"))
# Room for every session's VM at once: a VM asks for 2 of a node's 16 cores, so 8 fit a node.
NODES = max(10, SESSIONS // 7 + 1)
# A session settles (ready, or failed with a reason) within this of the later of a worker (or
# Redis) being back and its VMs being ready, with every setting at its default.
RECOVERY_BOUND_SECONDS = 30.0
# Kubernetes calls per session under any fault stay within this many times the fault-free run's.
CALLS_FACTOR = 3.0
SESSION_LABEL = "labvirt.io/session"
# What the simulator answers a request it was told to fail (``--error-rate``).
INJECTED_STATUSES = frozenset({429, 500, 503})
# The API and the simulator give times to the second (truncated): a session may have settled up
# to this much after the moment it shows.
TIME_RESOLUTION_SECONDS = 1.0


def sim_requests(system: System) -> int:
    """Requests the simulator served so far (its control endpoints not counted)."""
    stats = requests.get(f"{system.sim.url}/_sim/stats", timeout=5).json()
    return int(stats["requests"])


class KubeCalls:
    """The Kubernetes calls labvirt makes from now on: the simulator's request counter, less
    the test's own reads of the cluster (made through ``vmis``, one request each try)."""

    def __init__(self, system: System) -> None:
        self._system = system
        self._start = sim_requests(system)
        self._own = 0

    def vmis(self) -> list[dict[str, Any]]:
        """labvirt's VMIs, asked again while the simulator injects errors."""
        for _ in range(20):
            self._own += 1
            try:
                return self._system.sim.vmis()
            except ApiException as exc:
                if exc.status not in INJECTED_STATUSES:
                    raise
                time.sleep(0.2)
        raise AssertionError("the simulator failed 20 lists in a row")

    def count(self) -> int:
        return sim_requests(self._system) - self._start - self._own


def parse_time(stamp: str) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def settled_at(body: dict[str, Any]) -> float:
    """When the session became what it is now (its last transition), at its latest."""
    return parse_time(body["history"][-1]["at"]) + TIME_RESOLUTION_SECONDS


def created_at(body: dict[str, Any]) -> float:
    return parse_time(body["history"][0]["at"])


def vms_ready_at(vmis: list[dict[str, Any]]) -> dict[str, float]:
    """When each session's VMs were all ready, by session id, as the simulator says (the
    ``Ready`` condition's last transition; sessions whose VMs are not all ready are absent)."""
    latest: dict[str, float] = {}
    not_ready: set[str] = set()
    for vmi in vmis:
        owner = (vmi["metadata"].get("labels") or {}).get(SESSION_LABEL)
        if owner is None:
            continue
        conditions = (vmi.get("status") or {}).get("conditions") or []
        ready = [c for c in conditions if c.get("type") == "Ready" and c.get("status") == "True"]
        if not ready:
            not_ready.add(owner)
            continue
        moment = parse_time(ready[0]["lastTransitionTime"])
        latest[owner] = max(latest.get(owner, moment), moment)
    return {owner: moment for owner, moment in latest.items() if owner not in not_ready}


@dataclass
class ClassRun:
    """One class of sessions through one scenario: created, settled, measured."""

    scenario: str
    settled: list[dict[str, Any]]
    calls: int = 0
    # Seconds from each session's creation to its settling.
    settle_seconds: list[float] = field(default_factory=list)
    # Seconds from the fault's end to each session's settling, and from the later of the
    # fault's end and the session's VMs being ready (a fault-free run has neither).
    after_fault: list[float] = field(default_factory=list)
    after_recovery: list[float] = field(default_factory=list)
    note: str = ""  # what else the scenario saw

    @property
    def sessions(self) -> int:
        return len(self.settled)

    @property
    def ready(self) -> int:
        return sum(1 for s in self.settled if s["state"] == "ready")

    @property
    def failed(self) -> int:
        return sum(1 for s in self.settled if s["state"] == "failed")

    @property
    def calls_per_session(self) -> float:
        return self.calls / max(1, self.sessions)

    def measure_settling(self) -> None:
        self.settle_seconds = [settled_at(s) - created_at(s) for s in self.settled]

    def measure_recovery(self, vmis: list[dict[str, Any]], *, back: float) -> None:
        """Each session's settling counted from the later of ``back`` (wall clock) and its VMs
        being ready, from ``vmis`` listed while the sessions still hold them."""
        ready = vms_ready_at(vmis)
        self.after_fault = [settled_at(s) - back for s in self.settled]
        self.after_recovery = [
            settled_at(s) - max(back, ready.get(s["id"], back)) for s in self.settled
        ]

    def line(self, fault_free: ClassRun | None) -> str:
        settle = _spread(self.settle_seconds)
        text = (
            f"{self.scenario}: {self.sessions} sessions, {self.ready} ready, {self.failed} "
            f"failed; settled in {settle} s after creation"
        )
        if self.after_recovery:
            text += (
                f", {_spread(self.after_fault)} s after the fault's end, at most "
                f"{max(self.after_recovery):.1f} s after the later of that and the VMs ready"
            )
        text += f"; {self.calls_per_session:.1f} Kubernetes calls per session"
        if fault_free is not None:
            ratio = self.calls_per_session / fault_free.calls_per_session
            text += f" (fault-free {fault_free.calls_per_session:.1f}, x{ratio:.2f})"
        if self.note:
            text += f"; {self.note}"
        return text

    def check(self, fault_free: ClassRun) -> None:
        """The bounds every fault scenario keeps."""
        for session in self.settled:
            if session["state"] == "failed":
                assert session.get("reason"), session
        late = [t for t in self.after_recovery if t > RECOVERY_BOUND_SECONDS]
        assert not late, (self.scenario, sorted(self.after_recovery))
        assert self.calls_per_session <= CALLS_FACTOR * fault_free.calls_per_session, (
            self.scenario,
            self.calls_per_session,
            fault_free.calls_per_session,
        )


def report(capsys: pytest.CaptureFixture[str], run: ClassRun, fault_free: ClassRun | None) -> None:
    with capsys.disabled():
        print(f"\n{run.line(fault_free)}")  # noqa: T201 - `make chaos -s` reports each scenario


def _spread(values: Iterable[float]) -> str:
    data = sorted(values)
    if not data:
        return "-"
    return f"p50 {statistics.median(data):.1f} / max {data[-1]:.1f}"


def create_class(system: System, prefix: str, size: int) -> list[dict[str, Any]]:
    with ThreadPoolExecutor(max_workers=8) as pool:
        created = list(pool.map(lambda i: system.create("ubuntu", f"{prefix}-{i}"), range(size)))
    assert len({s["id"] for s in created}) == size, "two learners were given one session"
    return created


def leave(
    system: System,
    settled: list[dict[str, Any]],
    *,
    timeout: float = 60,
    wait: Callable[[System, str, tuple[str, ...], float], dict[str, Any]] | None = None,
) -> None:
    """The learners leave: every ready session is deleted and ends; a failed one stays so."""
    for session in settled:
        if session["state"] == "ready":
            response = system.call("DELETE", f"/v1/sessions/{session['id']}")
            assert response.status_code == 202, response.text
    for session in settled:
        if wait is None:
            final = system.wait_state(session["id"], "ended", "failed", timeout=timeout)
        else:
            final = wait(system, session["id"], ("ended", "failed"), timeout)
        expected = "ended" if session["state"] == "ready" else "failed"
        assert final["state"] == expected, (session, final)


def fault_free_class(system: System, size: int, *, prefix: str = "fault-free") -> ClassRun:
    """A class created, settled and left with nothing going wrong: what each scenario is
    compared with."""
    calls = KubeCalls(system)
    created = create_class(system, prefix, size)
    settled = [system.wait_state(s["id"], "ready", "failed", timeout=120) for s in created]
    leave(system, settled)
    run = ClassRun("fault-free", settled, calls=calls.count())
    run.measure_settling()
    assert run.ready == size, [s.get("reason") for s in settled]
    return run


def fault_free_run(tmp: Path) -> ClassRun:
    """A class of ``SESSIONS`` through a system of its own where nothing goes wrong."""
    with claim_redis_database() as url:
        system = start_system(url, tmp, sim_args=["--seed", "5", "--nodes", str(NODES)])
        try:
            return fault_free_class(system, SESSIONS)
        finally:
            system.stop()
