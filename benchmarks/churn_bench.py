"""Churn: many create + teardown cycles through the real API, and nothing left behind.

The whole system runs as its own processes (``labvirt sim``, ``api``, ``worker``, ``beat``) on
a private Redis. Each cycle creates an ``ubuntu`` session (straight to the API), waits until it
is ready, deletes it and waits until it is ended; ``--concurrency`` cycles run at once. The
session's own transition timestamps in Redis give create-to-ready (from sending the create)
and close-to-ended (from sending the delete).

Once every cycle is done, one reconcile pass runs (``labvirt.reconcile``, sent to the worker
as beat sends it) and the run is checked for leaks:

- the simulator holds no labvirt VMI, Service or NetworkPolicy;
- Redis holds no live session, and no key of the run's sessions outlives the ended retention:
  every key is scanned; one named after a session or user of the run, or holding one of the
  run's session ids (an index, a queue, a counter), must carry a TTL no longer than
  ``LABVIRT_ENDED_RETENTION_SECONDS``. Keys are counted by pattern.

    python -m benchmarks.churn_bench [--cycles 1000] [--concurrency 8]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
import requests

from benchmarks.percentiles import quantiles_ms
from benchmarks.process_logs import log_events
from shared.adapters.redis_server import EmbeddedRedis
from shared.adapters.session_store import FINISHED_RETENTION_SECONDS, RedisSessionStore
from shared.config import Settings
from shared.domain.manifests import ENVIRONMENT_LABEL
from shared.domain.sessions import Session, SessionState
from shared.jobs import RECONCILE, make_celery
from tests.e2e.harness import FRONTEND_TOKEN, System, start_system, wait_until

# A boot of about 0.2 s, and the ubuntu template's 5 s readiness-probe delay scaled to 0.5 s.
SIM_ARGS = ["--boot-seconds", "2", "--time-scale", "0.1", "--nodes", "6"]
POLL_SECONDS = 0.02
STATE_TIMEOUT_SECONDS = 60.0
SESSION_ID = re.compile(r"s-[0-9a-f]{24}")


@dataclass
class CycleResult:
    session_id: str
    create_to_ready: float | None  # None: never ready
    close_to_ended: float | None  # None: never ended
    final_state: str


class Churn:
    """Create, wait for ready, delete, wait for ended: one cycle, on a thread of its own."""

    def __init__(self, system: System, store: RedisSessionStore) -> None:
        self._system = system
        self._store = store
        self._local = threading.local()

    def _http(self) -> requests.Session:
        http = getattr(self._local, "http", None)
        if http is None:
            http = self._local.http = requests.Session()
            http.headers["Authorization"] = f"Bearer {FRONTEND_TOKEN}"
        return http

    def _wait(self, session_id: str, *states: SessionState) -> Session | None:
        deadline = time.monotonic() + STATE_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            session = self._store.get(session_id)
            if session is not None and session.state in states:
                return session
            time.sleep(POLL_SECONDS)
        return None

    def cycle(self, user: str) -> CycleResult:
        http, api = self._http(), self._system.api_url
        sent = time.time()
        created = http.post(
            f"{api}/v1/sessions", json={"template": "ubuntu", "user": user}, timeout=10
        )
        if created.status_code != 201:
            raise AssertionError(f"create answered {created.status_code}: {created.text}")
        session_id = created.json()["id"]
        ready = self._wait(session_id, SessionState.READY, SessionState.FAILED)
        ready_after = _since(ready, SessionState.READY, sent)
        closing = time.time()
        deleted = http.delete(f"{api}/v1/sessions/{session_id}", timeout=10)
        if deleted.status_code != 202:
            raise AssertionError(f"delete answered {deleted.status_code}: {deleted.text}")
        ended = self._wait(session_id, SessionState.ENDED, SessionState.FAILED)
        return CycleResult(
            session_id,
            ready_after,
            _since(ended, SessionState.ENDED, closing),
            ended.state.value if ended is not None else "stuck",
        )


def _since(session: Session | None, state: SessionState, start: float) -> float | None:
    if session is None:
        return None
    moments = [t.at for t in session.history if t.state is state]
    return moments[-1] - start if moments else None


# -- after the run ---------------------------------------------------------------------------


def reconcile_pass(system: System) -> str:
    """Run one reconcile pass on the system's worker now; what it did (its task's result)."""
    celery = make_celery(Settings.from_env(system.env))
    try:
        task_id = celery.send_task(RECONCILE, kwargs={}).id
    finally:
        celery.close()
    done = re.compile(rf"Task {re.escape(RECONCILE)}\[{task_id}\] succeeded in [0-9.e-]+s: (.*)$")

    def result() -> str | None:
        for event in log_events(system.procs["worker"].log):
            match = done.match(str(event.get("event", "")))
            if match:
                return match.group(1)
        return None

    found: str = wait_until(result, timeout=60, what="the reconcile pass", interval=0.2)
    return found


def sim_stats(system: System) -> dict[str, Any]:
    stats: dict[str, Any] = requests.get(f"{system.sim.url}/_sim/stats", timeout=10).json()
    return stats


def cluster_leftovers(system: System, environments: set[str] | None) -> dict[str, int]:
    """labvirt's objects left in the simulator: of ``environments``, or all (None)."""

    def counted(labels: dict[str, str] | None) -> bool:
        return environments is None or (labels or {}).get(ENVIRONMENT_LABEL) in environments

    return {
        "vmis": sum(counted(v["metadata"].get("labels")) for v in system.sim.vmis()),
        "services": sum(counted(s.metadata.labels) for s in system.sim.services()),
        "network_policies": sum(counted(p.metadata.labels) for p in system.sim.network_policies()),
    }


def _pattern(key: str, users: set[str]) -> str:
    pattern = SESSION_ID.sub("<session>", key)
    pattern = re.sub(r"\{s\d\d\}", "{sNN}", pattern)
    pattern = re.sub(r"\b[0-9a-f]{32}\b", "<hash>", pattern)  # hashed users, tokens
    pattern = re.sub(r":\d{6,}$", ":<minute>", pattern)  # per-minute counters
    parts = pattern.split(":")
    return ":".join("<user>" if part in users else part for part in parts)


def _members(client: redis.Redis, key: str, kind: str) -> list[str]:
    """What a container key holds, as text (strings and streams are named, not searched)."""
    if kind == "set":
        raw: list[Any] = list(client.smembers(key))
    elif kind == "zset":
        raw = list(client.zrange(key, 0, -1))
    elif kind == "list":
        raw = list(client.lrange(key, 0, -1))
    elif kind == "hash":
        raw = [item for pair in client.hgetall(key).items() for item in pair]
    else:
        return []
    return [item.decode(errors="replace") if isinstance(item, bytes) else str(item) for item in raw]


def redis_leftovers(
    client: redis.Redis, session_ids: set[str], users: set[str], retention: int
) -> dict[str, Any]:
    """Keys by pattern, and every key of the run's sessions that could outlive the retention."""
    by_pattern: dict[str, dict[str, int]] = {}
    holding: dict[str, dict[str, Any]] = {}
    problems: list[str] = []
    for raw_key in client.scan_iter(count=1000):
        key = raw_key.decode()
        ttl = int(client.ttl(key))
        if ttl == -2:
            continue  # expired between the scan and the TTL
        pattern = _pattern(key, users)
        counts = by_pattern.setdefault(pattern, {"keys": 0, "persistent": 0, "max_ttl": -1})
        counts["keys"] += 1
        counts["persistent"] += ttl == -1
        counts["max_ttl"] = max(counts["max_ttl"], ttl)
        outlives = ttl == -1 or ttl > retention
        named = set(SESSION_ID.findall(key)) & session_ids or set(key.split(":")) & users
        if named:
            if outlives:
                problems.append(f"{key}: TTL {ttl}")
            continue
        kind = client.type(key).decode()
        held = {sid for item in _members(client, key, kind) for sid in SESSION_ID.findall(item)}
        held &= session_ids
        if held:
            holding[key] = {"type": kind, "sessions": len(held), "ttl": ttl}
            if outlives:
                problems.append(f"{key} ({kind}, TTL {ttl}) still holds {len(held)} of them")
    return {
        "keys_by_pattern": dict(sorted(by_pattern.items())),
        "keys_holding_run_sessions": holding,
        "problems": len(problems),
        "problem_examples": problems[:20],
    }


def churn(
    system: System,
    client: redis.Redis,
    *,
    cycles: int,
    concurrency: int,
    user_prefix: str = "churn",
    whole_system: bool = True,
) -> dict[str, Any]:
    """The cycles on a running system, one reconcile pass, then what is left.

    ``whole_system``: the system runs nothing else, so every labvirt object in the cluster and
    every live session counts as left behind; otherwise only the run's own.
    """
    # Both workers' informers watch (the provision and the prewarm worker): none of the first
    # cycles waits for a worker still starting.
    wait_until(
        lambda: sim_stats(system)["watchStreams"] >= 2,
        timeout=60,
        what="the workers' informers to watch",
    )
    store = RedisSessionStore(client)
    runner = Churn(system, store)
    users = [f"{user_prefix}-{i}" for i in range(cycles)]
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        results = list(pool.map(runner.cycle, users))
    elapsed = time.monotonic() - started
    reconciled = reconcile_pass(system)
    session_ids = {r.session_id for r in results}
    sessions = store.get_many(sorted(session_ids))
    live = store.live_sessions() if whole_system else list(sessions.values())
    environments = None if whole_system else {s.environment_id for s in sessions.values()}
    retention = int(
        system.env.get("LABVIRT_ENDED_RETENTION_SECONDS", str(FINISHED_RETENTION_SECONDS))
    )
    ready = [r.create_to_ready for r in results if r.create_to_ready is not None]
    ended = [r.close_to_ended for r in results if r.close_to_ended is not None]
    states: dict[str, int] = {}
    for result in results:
        states[result.final_state] = states.get(result.final_state, 0) + 1
    return {
        "cycles": cycles,
        "concurrency": concurrency,
        "seconds": round(elapsed, 1),
        "cycles_per_second": round(cycles / elapsed, 2),
        "final_states": states,
        "create_to_ready_ms": quantiles_ms(ready),
        "close_to_ended_ms": quantiles_ms(ended),
        "create_to_ready_median_s": round(statistics.median(ready), 3) if ready else None,
        "reconcile_pass_after_the_run": reconciled,
        "leftovers": {
            "cluster": cluster_leftovers(system, environments),
            "live_sessions": sum(1 for s in live if not s.is_final),
            "redis": redis_leftovers(client, session_ids, set(users), retention),
        },
    }


def leak_free(report: dict[str, Any]) -> bool:
    leftovers = report["leftovers"]
    return (
        not any(leftovers["cluster"].values())
        and leftovers["live_sessions"] == 0
        and leftovers["redis"]["problems"] == 0
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cycles", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args(argv)
    server = EmbeddedRedis().start()
    client = redis.Redis.from_url(server.url)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            system = start_system(
                server.url,
                Path(tmp),
                sim_args=SIM_ARGS,
            )
            try:
                report = churn(system, client, cycles=args.cycles, concurrency=args.concurrency)
            finally:
                system.stop()
    finally:
        client.close()
        server.stop()
    report["sim_args"] = SIM_ARGS
    report["leak_free"] = leak_free(report)
    print(json.dumps(report, indent=2))
    return 0 if report["leak_free"] and report["final_states"] == {"ended": args.cycles} else 1


if __name__ == "__main__":
    raise SystemExit(main())
