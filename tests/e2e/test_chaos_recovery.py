"""Chaos that kills things: a worker killed with SIGKILL in the middle of a class's cold
starts, the prewarm worker killed while pools fill and a class claims, both workers killed at
random moments, Redis (append-only file on) restarted in the middle of a class, a Sentinel-
watched primary failing over, and a simulator that fails 20% of calls and cuts watches.

Every setting that bounds recovery is labvirt's default (``Settings``). Every session must end
`ready`, or `failed` with a reason, within 30 s of the later of the fault's end (a worker or
Redis back) and its VMs being ready, with no environment owned twice and nothing left unowned
after a reconcile pass; and labvirt may make at most three times the Kubernetes calls per
session of a fault-free class of the same size. `make chaos` runs a larger class
(LABVIRT_CHAOS_SESSIONS) and, with `-s`, prints each scenario's figures."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import redis
import requests

from shared.adapters.pool_store import RedisPoolStore
from shared.adapters.redis_client import sync_client
from shared.adapters.redis_server import EmbeddedRedis, answers, free_port
from shared.config import Settings
from shared.jobs import RECONCILE, make_celery
from tests.conftest import claim_redis_database
from tests.e2e.chaos_measures import (
    SESSIONS,
    ClassRun,
    KubeCalls,
    create_class,
    leave,
    report,
)
from tests.e2e.harness import ADMIN_TOKEN, Proc, System, start, start_system, wait_until
from tests.e2e.test_metrics_e2e import samples_of, total, worker_url

pytestmark = pytest.mark.e2e

DEFAULTS = Settings()
SETTLE_TIMEOUT = 120
# Warm environments for the prewarm scenarios: enough that a class both hits and misses.
POOL_SIZE = max(4, SESSIONS // 2)
# Long enough that the workers' broker connections are lost and made again, not just a command
# retried inside a call; `make chaos` keeps Redis down for 30 s.
REDIS_DOWN_SECONDS = float(os.environ.get("LABVIRT_CHAOS_REDIS_DOWN_SECONDS", "5"))


def check_ownership(
    system: System, sessions: list[dict[str, Any]], vmis: list[dict[str, Any]]
) -> None:
    """No environment held by two sessions; every labvirt VMI with a session label (``vmis``,
    listed after the sessions settled) owned by a live session of the class."""
    owners: dict[str, str] = {}
    for session in sessions:
        body = system.session(session["id"])
        if body["state"] == "ready":
            for vm in body["vms"]:
                assert vm["ready"], body
    live = {s["id"] for s in sessions if system.session(s["id"])["state"] == "ready"}
    for vmi in vmis:
        labels = vmi["metadata"].get("labels") or {}
        environment = labels.get("labvirt.io/environment")
        owner = labels.get("labvirt.io/session")
        if vmi["metadata"].get("deletionTimestamp") or owner is None:
            continue
        assert owners.setdefault(environment, owner) == owner, (environment, owner)
        assert owner in live, (vmi["metadata"]["name"], owner)


def start_recovering(redis_url: str, tmp: Path, *, seed: int, **env: str) -> System:
    """A system with every recovery setting at labvirt's default: the provision recovery
    delay, the reconcile interval, and the reaper's tick (which the harness shortens for the
    short-lived template of other tests) put back to its default."""
    return start_system(
        redis_url,
        tmp,
        extra_env={
            "LABVIRT_REAPER_INTERVAL_SECONDS": f"{DEFAULTS.reaper_interval_seconds:g}",
            **env,
        },
        sim_args=["--nodes", str(SESSIONS // 8 + 5), "--boot-seconds", "2", "--seed", str(seed)],
    )


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    with claim_redis_database() as url:
        running = start_recovering(
            url,
            tmp_path_factory.mktemp("chaos-recovery"),
            seed=9,
            LABVIRT_ORPHAN_GRACE_SECONDS="5",
        )
        try:
            yield running
        finally:
            running.stop()


def kill(system: System, name: str) -> None:
    """SIGKILL: no goodbye; the tasks it held stay unacknowledged."""
    process = system.procs[name].process
    process.kill()
    process.wait()


def restart(system: System, name: str, tmp_path: Path) -> float:
    """Start the process again, as its Deployment would; when (wall clock)."""
    argv = [sys.executable, "-m", "labvirt.cli", *COMMANDS[name]]
    system.procs[name] = start(f"{name}-{time.monotonic_ns()}", argv, system.env, tmp_path)
    return time.time()


def settle(system: System, sessions: list[dict[str, Any]], scenario: str) -> ClassRun:
    """Every session ready or failed; how it went."""
    settled = [
        system.wait_state(s["id"], "ready", "failed", timeout=SETTLE_TIMEOUT) for s in sessions
    ]
    run = ClassRun(scenario, settled)
    run.measure_settling()
    return run


def reconcile_once(system: System) -> None:
    """One reconcile pass, asked for now rather than at beat's next one, run by the worker."""
    app = make_celery(Settings(redis_url=system.redis_url))
    task_id = f"chaos-reconcile-{time.monotonic_ns()}"
    app.send_task(RECONCILE, kwargs={}, task_id=task_id)
    worker = system.procs["worker"]
    wait_until(
        lambda: f"{RECONCILE}[{task_id}] succeeded" in worker.log.read_text(errors="replace"),
        timeout=60,
        what="the reconcile pass",
        interval=0.3,
    )


def check_nothing_unowned(system: System, calls: KubeCalls) -> None:
    """After a reconcile pass, every labvirt environment left in the cluster belongs to a live
    session or to a warm pool (booting, ready, or claimed and not yet relabelled), as the
    reconciler itself judges ownership."""
    reconcile_once(system)
    client = sync_client(system.redis_url)
    try:
        pooled = RedisPoolStore(client).owned_environment_ids(DEFAULTS.default_region)
    finally:
        client.close()
    for vmi in calls.vmis():
        metadata = vmi["metadata"]
        labels = metadata.get("labels") or {}
        if metadata.get("deletionTimestamp"):
            continue
        owner = labels.get("labvirt.io/session")
        if owner is not None:
            state = system.session(owner)["state"]
            assert state in ("provisioning", "ready", "terminating"), (metadata["name"], state)
            continue
        assert labels.get("labvirt.io/pool") is not None, metadata["name"]
        assert labels["labvirt.io/environment"] in pooled, metadata["name"]


def admin(system: System, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
    response = system.call(method, path, token=ADMIN_TOKEN, **kwargs)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def judge_kills(
    system: System,
    run: ClassRun,
    calls: KubeCalls,
    fault_free: ClassRun,
    capsys: pytest.CaptureFixture[str],
    *,
    back: float,
    sessions: list[dict[str, Any]],
    pools: bool = False,
) -> None:
    """After processes were killed: no session failed (nothing was the class's fault), each
    settled within the bound, no environment is owned twice and, with ``pools``, nothing is
    left unowned after a reconcile pass (the pool then emptied); the learners leave."""
    vmis = calls.vmis()
    run.measure_recovery(vmis, back=back)
    assert run.failed == 0, [s["reason"] for s in run.settled]
    check_ownership(system, sessions, vmis)
    if pools:
        check_nothing_unowned(system, calls)
        empty_pool(system, calls)
    leave(system, run.settled)
    run.calls = calls.count()
    report(capsys, run, fault_free)
    run.check(fault_free)


def test_a_worker_killed_mid_run_loses_no_session(
    system: System, fault_free: ClassRun, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report(capsys, fault_free, None)
    rng = random.Random(int(os.environ.get("LABVIRT_CHAOS_SEED", "5")))
    calls = KubeCalls(system)
    # A slow API server keeps the worker's provisions in flight, so the kill catches some.
    set_faults(system, latency_ms=2000)
    with ThreadPoolExecutor(max_workers=1) as background:
        creating = background.submit(create_class, system, "killed-worker", SESSIONS)
        wait_until(
            lambda: "labvirt.provision[" in system.procs["worker"].log.read_text(errors="replace"),
            timeout=60,
            what="the worker to take a provision",
        )
        time.sleep(rng.uniform(0.0, 1.0))  # somewhere in the middle of the creates
        kill(system, "worker")
        sessions = creating.result()
    set_faults(system, latency_ms=0)
    time.sleep(2)
    # A provision the dead worker held comes back through the reaper (its environment is not
    # created yet); a VM that booted while no worker watched is seen when the new worker lists.
    back = restart(system, "worker", tmp_path)
    run = settle(system, sessions, "a worker killed mid-run")
    run.note = f"{asked_again(system)} provision(s) asked again"
    judge_kills(system, run, calls, fault_free, capsys, back=back, sessions=sessions)


def handed_back(worker: Proc) -> int:
    """Tasks a worker's pool gave back to the queue when the child running them died."""
    log = worker.log.read_text(errors="replace")
    return log.count("Task handler raised error: WorkerLostError")


def pool_children(process_id: int) -> list[int]:
    """The prefork pool's processes under a worker (Linux: /proc)."""
    found = Path(f"/proc/{process_id}/task/{process_id}/children").read_text().split()
    return [int(pid) for pid in found]


def test_a_workers_child_killed_mid_run_loses_no_session(
    fault_free: ClassRun, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A worker running its tasks in child processes (``LABVIRT_WORKER_POOL=prefork``) has
    children SIGKILLed at random moments while a class is created; the worker lives on, hands
    each lost task back to the queue and starts a new child."""
    rng = random.Random(int(os.environ.get("LABVIRT_CHAOS_SEED", "5")) + 3)
    with claim_redis_database() as url:
        system = start_recovering(
            url,
            tmp_path,
            seed=11,
            LABVIRT_WORKER_POOL="prefork",
            LABVIRT_WORKER_CONCURRENCY="4",
        )
        try:
            worker = system.procs["worker"]
            first = dict(system.procs)
            calls = KubeCalls(system)
            set_faults(system, latency_ms=2000)  # the children's provisions stay in flight
            killed: list[int] = []
            with ThreadPoolExecutor(max_workers=1) as background:
                creating = background.submit(create_class, system, "killed-child", SESSIONS)
                wait_until(
                    lambda: "labvirt.provision[" in worker.log.read_text(errors="replace"),
                    timeout=60,
                    what="a child to take a provision",
                )
                # Until the class is created, one kill in 40 sessions (3 at least) is made and
                # one caught a task (a child may be idle when it dies); at most 20 kills.
                while len(killed) < 20 and (
                    not creating.done()
                    or len(killed) < max(3, SESSIONS // 40)
                    or handed_back(worker) == 0
                ):
                    time.sleep(rng.uniform(0.3, 1.5))
                    children = [c for c in pool_children(worker.process.pid) if c not in killed]
                    if children:
                        victim = rng.choice(children)
                        os.kill(victim, 9)
                        killed.append(victim)
                sessions = creating.result()
            back = time.time()  # the worker never left; its pool replaced the last child now
            set_faults(system, latency_ms=0)
            run = settle(system, sessions, "a worker's children killed mid-run")
            run.note = (
                f"{len(killed)} children killed, {handed_back(worker)} tasks handed back, "
                f"{asked_again(system)} provision(s) asked again"
            )
            assert handed_back(worker) > 0, worker.tail(40)
            # The worker itself never stopped: its pool replaced every child.
            check_still_running(system, first)
            assert len(pool_children(worker.process.pid)) == 4
            # The children's series reach the worker's one /metrics (their shared directory):
            # every session's environment was created, and timed, in a child.
            samples = samples_of(worker_url(system, "worker"))
            assert total(samples, "labvirt_provisioning_duration_seconds_count") >= SESSIONS
            judge_kills(
                system, run, calls, fault_free, capsys, back=back, sessions=sessions, pools=True
            )
        finally:
            system.stop()


def test_failing_calls_and_cut_watches_lose_no_session(
    system: System, fault_free: ClassRun, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    faults = requests.put(
        f"{system.sim.url}/_sim/faults",
        json={"error_rate": 0.2, "watch_drop_rate": 1.0},  # every watch cut within 2 s
        timeout=5,
    )
    assert faults.status_code == 200, faults.text
    calls = KubeCalls(system)
    # A worker started now follows the region through watches that are cut again and again.
    system.procs["worker"].stop()
    back = restart(system, "worker", tmp_path)
    try:
        sessions = create_class(system, "faulty", SESSIONS)
        run = settle(system, sessions, "20% failing calls, cut watches")
        assert run.failed <= SESSIONS // 4, [s["reason"] for s in run.settled]
        stats = requests.get(f"{system.sim.url}/_sim/stats", timeout=5).json()
        assert stats["injectedErrors"] > 0, stats
        assert stats["droppedWatches"] > 0, stats
        vmis = calls.vmis()
    finally:
        requests.put(
            f"{system.sim.url}/_sim/faults",
            json={"error_rate": 0, "watch_drop_rate": 0},
            timeout=5,
        )
    run.measure_recovery(vmis, back=back)
    check_ownership(system, sessions, vmis)
    leave(system, run.settled)
    run.calls = calls.count()
    report(capsys, run, fault_free)
    run.check(fault_free)
    # After the learners leave, nothing labvirt made is left.
    wait_until(lambda: system.sim.vmis() == [], timeout=60, what="every VMI to be gone")


def test_the_prewarm_worker_killed_while_pools_fill_loses_no_session(
    system: System, fault_free: ClassRun, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The process that boots warm pools' environments dies (SIGKILL) with boots in flight,
    while a class claims what is warm and goes cold for the rest."""
    rng = random.Random(int(os.environ.get("LABVIRT_CHAOS_SEED", "5")) + 1)
    calls = KubeCalls(system)
    admin(system, "PUT", "/v1/admin/pools/ubuntu", json={"size": POOL_SIZE})
    wait_until(
        lambda: pool_view(system)["in_flight"] > 0, timeout=30, what="warm environments booting"
    )
    with ThreadPoolExecutor(max_workers=1) as background:
        creating = background.submit(create_class, system, "prewarm-killed", SESSIONS)
        time.sleep(rng.uniform(0.0, 1.0))
        kill(system, "prewarm")
        sessions = creating.result()
    time.sleep(2)
    back = restart(system, "prewarm", tmp_path)
    run = settle(system, sessions, "the prewarm worker killed while pools fill")
    judge_kills(system, run, calls, fault_free, capsys, back=back, sessions=sessions, pools=True)


def test_both_workers_killed_at_random_moments_lose_no_session(
    system: System, fault_free: ClassRun, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The default worker and the prewarm worker, each SIGKILLed at moments drawn at random
    while pools fill, a class is created and its sessions boot, and started again."""
    rng = random.Random(int(os.environ.get("LABVIRT_CHAOS_SEED", "5")) + 2)
    calls = KubeCalls(system)
    admin(system, "PUT", "/v1/admin/pools/ubuntu", json={"size": POOL_SIZE})
    kills = sorted((rng.uniform(0.0, 6.0), name) for name in ("worker", "prewarm", "worker"))
    back = time.time()
    with ThreadPoolExecutor(max_workers=1) as background:
        started = time.monotonic()
        creating = background.submit(create_class, system, "random-kills", SESSIONS)
        for moment, name in kills:
            time.sleep(max(0.0, started + moment - time.monotonic()))
            kill(system, name)
            time.sleep(rng.uniform(0.5, 2.0))
            back = restart(system, name, tmp_path)
        sessions = creating.result()
    run = settle(system, sessions, "both workers killed at random moments")
    judge_kills(system, run, calls, fault_free, capsys, back=back, sessions=sessions, pools=True)


def set_faults(system: System, **faults: float) -> None:
    response = requests.put(f"{system.sim.url}/_sim/faults", json=faults, timeout=5)
    assert response.status_code == 200, response.text


def asked_again(system: System) -> int:
    """Provisions the reaper asked for again, as the running worker's log says."""
    return (
        system.procs["worker"]
        .log.read_text(errors="replace")
        .count("session.provision_asked_again")
    )


def pool_view(system: System, template: str = "ubuntu") -> dict[str, Any]:
    [view] = [
        p for p in admin(system, "GET", "/v1/admin/pools")["pools"] if p["template"] == template
    ]
    return view


def empty_pool(system: System, calls: KubeCalls) -> None:
    """Size the pool back to nothing and wait for its environments to go (later tests in the
    module see a cluster with sessions' environments only)."""
    admin(system, "PUT", "/v1/admin/pools/ubuntu", json={"size": 0})

    def drained() -> bool:
        pooled = [
            v
            for v in calls.vmis()
            if "labvirt.io/session" not in (v["metadata"].get("labels") or {})
            and not v["metadata"].get("deletionTimestamp")
        ]
        return not pooled

    wait_until(drained, timeout=60, what="the pool to drain", interval=1.0)


def settle_through_outages(
    system: System, session_id: str, states: tuple[str, ...], timeout: float
) -> dict[str, Any]:
    """The session once it reaches one of ``states``, asking again through 503s and resets
    (Redis may be coming back)."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            response = system.call("GET", f"/v1/sessions/{session_id}")
            last = response.status_code
            if response.status_code == 200 and response.json()["state"] in states:
                return dict(response.json())
        except requests.RequestException as exc:
            last = exc
        time.sleep(0.3)
    raise AssertionError(f"{session_id} did not reach {states} (last: {last!r})\n{system.logs()}")


def settle_class_through_outages(
    system: System, sessions: list[dict[str, Any]], scenario: str
) -> ClassRun:
    settled = [
        settle_through_outages(system, s["id"], ("ready", "failed"), SETTLE_TIMEOUT)
        for s in sessions
    ]
    run = ClassRun(scenario, settled)
    run.measure_settling()
    return run


def check_still_running(system: System, first: dict[str, Proc]) -> None:
    """Every process rode out the outage: none exited, none had to be started again."""
    exited = {
        name: (proc.process.returncode, proc.tail(20))
        for name, proc in system.procs.items()
        if proc.process.poll() is not None or proc is not first[name]
    }
    assert not exited, exited


def test_a_redis_restart_mid_run_loses_no_session(
    fault_free: ClassRun, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    binary = shutil.which("redis-server")
    server = EmbeddedRedis(appendonly=True, binary=binary, workdir=tmp_path / "redis").start()
    system = start_recovering(server.url, tmp_path, seed=13)
    first = dict(system.procs)
    try:
        calls = KubeCalls(system)
        sessions = create_class(system, "redis-restart", SESSIONS)
        time.sleep(random.Random(7).uniform(0.1, 1.0))
        server.restart(down_seconds=REDIS_DOWN_SECONDS)
        back = time.time()
        run = settle_class_through_outages(system, sessions, "Redis restarted mid-run")
        vmis = calls.vmis()
        run.measure_recovery(vmis, back=back)
        assert run.failed == 0, [s["reason"] for s in run.settled]
        check_ownership(system, sessions, vmis)
        # The same processes, the workers included: none stopped on its lost connections.
        check_still_running(system, first)
        leave(system, run.settled, wait=settle_through_outages)
        run.calls = calls.count()
        report(capsys, run, fault_free)
        run.check(fault_free)
    finally:
        system.stop()
        server.stop()


COMMANDS = {
    "api": ["api"],
    "gateway": ["gateway"],
    "worker": ["worker"],
    "prewarm": ["worker", "--queues", "prewarm"],
    "beat": ["beat"],
}


def _server(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    handle = log.open("wb")
    return subprocess.Popen(argv, stdout=handle, stderr=subprocess.STDOUT)


def _wait_answer(port: int) -> None:
    wait_until(lambda: answers(f"redis://127.0.0.1:{port}/0"), timeout=10, what=f"redis {port}")


def promoted(sentinel_port: int, replica_port: int) -> float:
    """When (wall clock) the sentinels named the replica the primary: Redis is back."""
    sentinel = redis.Redis(port=sentinel_port, socket_timeout=2, decode_responses=True)

    def named() -> bool:
        address = sentinel.execute_command("SENTINEL", "get-master-addr-by-name", "labvirt")
        return bool(address) and int(address[1]) == replica_port

    try:
        wait_until(named, timeout=60, what="the sentinels to promote the replica", interval=0.2)
    finally:
        sentinel.close()
    return time.time()


def test_a_redis_primary_failing_over_loses_no_session(
    fault_free: ClassRun, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    binary = shutil.which("redis-server")
    if binary is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("redis-server is needed for the Sentinel failover test")
        pytest.skip("no redis-server binary: cannot run a primary, a replica and sentinels")
    primary_port, replica_port = free_port(), free_port()
    processes = [
        _server(
            [
                binary,
                "--port",
                str(primary_port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "yes",
                "--dir",
                str(tmp_path),
            ],
            tmp_path / "primary.log",
        )
    ]
    _wait_answer(primary_port)
    replica_dir = tmp_path / "replica"
    replica_dir.mkdir()
    processes.append(
        _server(
            [
                binary,
                "--port",
                str(replica_port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "yes",
                "--dir",
                str(replica_dir),
                "--replicaof",
                "127.0.0.1",
                str(primary_port),
            ],
            tmp_path / "replica.log",
        )
    )
    _wait_answer(replica_port)
    sentinel_ports = [free_port() for _ in range(3)]
    for port in sentinel_ports:
        config = tmp_path / f"sentinel-{port}.conf"
        config.write_text(
            f"port {port}\nbind 127.0.0.1\n"
            f"sentinel monitor labvirt 127.0.0.1 {primary_port} 2\n"
            "sentinel down-after-milliseconds labvirt 1000\n"
            "sentinel failover-timeout labvirt 10000\n"
            "sentinel parallel-syncs labvirt 1\n"
        )
        processes.append(_server([binary, str(config), "--sentinel"], tmp_path / f"s{port}.log"))
        _wait_answer(port)
    url = "sentinel://" + ",".join(f"127.0.0.1:{p}" for p in sentinel_ports) + "/labvirt/0"
    system = start_recovering(url, tmp_path, seed=17)
    first = dict(system.procs)
    try:
        calls = KubeCalls(system)
        sessions = create_class(system, "failover", SESSIONS)
        time.sleep(random.Random(3).uniform(0.1, 1.0))
        processes[0].kill()  # the primary dies; the sentinels promote the replica
        processes[0].wait()
        back = promoted(sentinel_ports[0], replica_port)
        # What a failover may lose (replication is asynchronous) shows as a failed session
        # with a reason, never as one stuck or gone.
        run = settle_class_through_outages(system, sessions, "a Sentinel failover mid-run")
        vmis = calls.vmis()
        run.measure_recovery(vmis, back=back)
        check_ownership(system, sessions, vmis)
        check_still_running(system, first)
        leave(system, run.settled, wait=settle_through_outages)
        run.calls = calls.count()
        report(capsys, run, fault_free)
        run.check(fault_free)
    finally:
        system.stop()
        for process in processes:
            if process.poll() is None:
                process.terminate()
                process.wait(timeout=10)
