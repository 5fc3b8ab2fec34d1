"""Warm pools end to end: real API, worker, prewarm worker and beat processes, the simulator.

Each system here gets a Redis database of its own: the session-wide ``system`` of the other
end-to-end tests must never consume these queues or see these pools.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import claim_redis_database
from tests.e2e.harness import ADMIN_TOKEN, System, start, start_system, wait_until

pytestmark = pytest.mark.e2e

MANAGED = "app.kubernetes.io/managed-by"
POOL = "labvirt.io/pool"
SESSION = "labvirt.io/session"
ENVIRONMENT = "labvirt.io/environment"
# Concurrent creates against a pool of this size: "CREATES:POOL". `make test` runs a small
# honest version; `make pool-load` the full 500 against 100.
LOAD = os.environ.get("LABVIRT_POOL_LOAD", "50:10")
LOAD_CREATES, LOAD_POOL = (int(part) for part in LOAD.split(":"))
# Fast boots (the readiness probe's delays scale with the simulator's time), and nodes enough
# for every session of the load test plus the pool refilling behind them (8 VMs a node: each
# asks for 2 of a node's 16 cores).
SIM_ARGS = ["--time-scale", "0.2", "--nodes", str(max(10, (LOAD_CREATES + 2 * LOAD_POOL) // 7 + 1))]
PREWARM_ENV = {
    "LABVIRT_PREWARM_INTERVAL_SECONDS": "1",
    "LABVIRT_PREWARM_BATCH": "10",
    "LABVIRT_PREWARM_MAX_IN_FLIGHT": "20",
    "LABVIRT_WORKER_CONCURRENCY": "64" if LOAD_CREATES > 100 else "32",
    "LABVIRT_API_THREADS": "64" if LOAD_CREATES > 100 else "32",
}


@pytest.fixture(scope="module")
def own_redis_url() -> Iterator[str]:
    with claim_redis_database() as url:
        yield url


@pytest.fixture(scope="module")
def pools(own_redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    running = start_system(
        own_redis_url,
        tmp_path_factory.mktemp("pools"),
        extra_env=PREWARM_ENV,
        sim_args=SIM_ARGS,
    )
    try:
        yield running
    finally:
        running.stop()


def admin(system: System, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
    response = system.call(method, path, token=ADMIN_TOKEN, **kwargs)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def pool_view(system: System, template: str) -> dict[str, Any]:
    pools = admin(system, "GET", "/v1/admin/pools")["pools"]
    [view] = [p for p in pools if p["template"] == template]
    return view


def wait_ready(system: System, template: str, count: int, *, timeout: float = 90) -> None:
    def filled() -> dict[str, Any] | None:
        view = pool_view(system, template)
        return view if view["ready"] >= count else None

    try:
        wait_until(filled, timeout=timeout, what=f"{count} ready {template} environments")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{system.logs()}") from None


def pool_vmis(system: System, template: str) -> list[dict[str, Any]]:
    return [
        v
        for v in system.sim.vmis(f"{MANAGED}=labvirt,{POOL}={template}")
        if not v["metadata"].get("deletionTimestamp")
    ]


def create_many(system: System, template: str, users: list[str]) -> list[dict[str, Any]]:
    with ThreadPoolExecutor(max_workers=min(32, len(users))) as executor:
        return list(executor.map(lambda user: system.create(template, user), users))


def assert_each_environment_has_one_session(system: System, sessions: list[dict[str, Any]]) -> None:
    """Checked on the simulator's VMI labels, not only in Redis."""
    environments: dict[str, str] = {}
    for session in sessions:
        vmis = system.sim.vmis(f"{MANAGED}=labvirt,{SESSION}={session['id']}")
        assert vmis, f"session {session['id']} has no VMIs"
        for vmi in vmis:
            labels = vmi["metadata"]["labels"]
            assert POOL not in labels
            owner = environments.setdefault(labels[ENVIRONMENT], session["id"])
            assert owner == session["id"], f"environment {labels[ENVIRONMENT]} has two sessions"
    everything = system.sim.vmis()
    by_environment: dict[str, set[str]] = {}
    for vmi in everything:
        labels = vmi["metadata"]["labels"]
        by_environment.setdefault(labels[ENVIRONMENT], set()).add(labels.get(SESSION, ""))
    for environment, holders in by_environment.items():
        assert len(holders) == 1, f"environment {environment} is labelled for {holders}"


def close_all(system: System, sessions: list[dict[str, Any]]) -> None:
    for session in sessions:
        system.call("DELETE", f"/v1/sessions/{session['id']}")


def test_static_pool_of_ten_serves_ten_concurrent_creates_warm_and_refills(pools: System) -> None:
    view = admin(pools, "PUT", "/v1/admin/pools/ubuntu", json={"size": 10})
    assert (view["mode"], view["target"]) == ("static", 10)
    wait_ready(pools, "ubuntu", 10)
    assert len(pool_vmis(pools, "ubuntu")) == 10

    sessions = create_many(pools, "ubuntu", [f"learner{i}" for i in range(10)])
    for session in sessions:
        assert session["state"] == "ready", session
        assert session["warm"] is True
        [vm] = session["vms"]
        assert vm["ready"] is True
        assert vm["ip"]
        assert vm["phase"] == "Running"

    def all_bound() -> bool:
        return all(pools.sim.vmis(f"{MANAGED}=labvirt,{SESSION}={s['id']}") for s in sessions)

    wait_until(all_bound, timeout=30, what="every claimed VMI to carry its session")
    assert_each_environment_has_one_session(pools, sessions)
    wait_ready(pools, "ubuntu", 10)
    view = pool_view(pools, "ubuntu")
    assert view["hit_rate_1h"] == 1.0

    close_all(pools, sessions)
    admin(pools, "PUT", "/v1/admin/pools/ubuntu", json={"size": 0})
    wait_until(lambda: pool_vmis(pools, "ubuntu") == [], timeout=30, what="the pool to drain")


def test_two_vm_kubernetes_environment_is_pooled_and_claimed_whole(pools: System) -> None:
    admin(pools, "PUT", "/v1/admin/pools/kubernetes", json={"size": 1})
    wait_ready(pools, "kubernetes", 1)
    pooled = pool_vmis(pools, "kubernetes")
    assert {v["spec"]["hostname"] for v in pooled} == {"controlplane", "node01"}
    [environment] = {v["metadata"]["labels"][ENVIRONMENT] for v in pooled}
    admin(pools, "PUT", "/v1/admin/pools/kubernetes", json={"size": 0})

    session = pools.create("kubernetes", "kube-learner")
    assert (session["state"], session["warm"]) == ("ready", True)
    assert {vm["hostname"] for vm in session["vms"]} == {"controlplane", "node01"}
    assert all(vm["ready"] and vm["ip"] for vm in session["vms"])

    def bound() -> list[dict[str, Any]] | None:
        vmis = pools.sim.vmis(f"{MANAGED}=labvirt,{SESSION}={session['id']}")
        return vmis if len(vmis) == 2 else None

    vmis = wait_until(bound, timeout=30, what="both VMIs to carry the session")
    assert {v["metadata"]["labels"][ENVIRONMENT] for v in vmis} == {environment}
    [service] = pools.sim.services(f"{MANAGED}=labvirt,{ENVIRONMENT}={environment}")
    assert service.spec.cluster_ip == "None"

    close_all(pools, [session])
    assert pools.wait_state(session["id"], "ended", "failed")["state"] == "ended"
    assert pools.sim.vmis(f"{MANAGED}=labvirt,{ENVIRONMENT}={environment}") == []


def test_two_prewarmers_never_push_a_pool_above_target_plus_one_batch(
    pools: System, tmp_path: Path
) -> None:
    # A second beat: every tick runs twice, at the same moment, on the worker's threads.
    second_beat = start("beat2", [sys.executable, "-m", "labvirt.cli", "beat"], pools.env, tmp_path)
    # Both beats tick before the pool moves (a process starting on a busy machine takes seconds).
    wait_until(
        lambda: "prewarm-pools" in second_beat.log.read_text(),
        timeout=60,
        what="the second beat's first prewarm tick",
    )
    target, batch = 6, int(PREWARM_ENV["LABVIRT_PREWARM_BATCH"])
    seen: list[int] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            environments = {
                v["metadata"]["labels"][ENVIRONMENT] for v in pool_vmis(pools, "ubuntu")
            }
            seen.append(len(environments))
            stop.wait(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        admin(pools, "PUT", "/v1/admin/pools/ubuntu", json={"size": target})
        wait_ready(pools, "ubuntu", target)
        sessions = create_many(pools, "ubuntu", [f"twice{i}" for i in range(4)])
        assert all(s["warm"] for s in sessions)
        wait_ready(pools, "ubuntu", target)
    finally:
        stop.set()
        sampler.join()
        second_beat.stop()
    assert max(seen) <= target + batch
    assert max(seen) >= target
    assert "prewarm-pools" in second_beat.log.read_text(), "the second beat sent no ticks"
    close_all(pools, sessions)
    admin(pools, "PUT", "/v1/admin/pools/ubuntu", json={"size": 0})
    wait_until(lambda: pool_vmis(pools, "ubuntu") == [], timeout=30, what="the pool to drain")


def test_concurrent_creates_against_a_pool_get_every_warm_one_once(pools: System) -> None:
    """Acceptance 2 (``LABVIRT_POOL_LOAD``, default 50 creates against a pool of 10)."""
    admin(pools, "PUT", "/v1/admin/pools/ubuntu", json={"size": LOAD_POOL})
    wait_ready(pools, "ubuntu", LOAD_POOL, timeout=60 + LOAD_POOL)

    sessions = create_many(pools, "ubuntu", [f"load{i}" for i in range(LOAD_CREATES)])
    warm = [s for s in sessions if s["warm"]]
    # Refills that land during the burst are claimed too.
    assert len(warm) >= LOAD_POOL, f"{len(warm)} warm hits with {LOAD_POOL} ready"
    assert all(s["state"] == "ready" for s in warm)
    assert all(s["state"] == "provisioning" for s in sessions if not s["warm"])
    for session in sessions:
        ended = pools.wait_state(session["id"], "ready", "failed", timeout=120 + LOAD_CREATES / 2)
        assert ended["state"] == "ready", ended

    def all_bound() -> bool:
        labelled = {
            v["metadata"]["labels"].get(SESSION)
            for v in pools.sim.vmis(f"{MANAGED}=labvirt,{SESSION}")
        }
        return {s["id"] for s in sessions} <= labelled

    wait_until(all_bound, timeout=60, what="every session's VMIs to carry its label")
    assert_each_environment_has_one_session(pools, sessions)

    admin(pools, "PUT", "/v1/admin/pools/ubuntu", json={"size": 0})
    close_all(pools, sessions)
    wait_until(
        lambda: pools.sim.vmis() == [], timeout=60 + LOAD_CREATES / 5, what="every VMI to go"
    )
