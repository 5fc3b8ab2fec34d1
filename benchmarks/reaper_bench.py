"""Reaper tick cost against the number of live sessions: 1,000, 10,000 and 100,000, 10 expired.

A tick must cost what is due, not what is alive: it reads each deadline sorted set with
``ZRANGEBYSCORE ... LIMIT`` and settles only what it got. This runs the real tick
(``shared.session_life.SessionLife.reap``, what ``labvirt.reap`` calls, teardowns queued
included, on a Celery port that sends nothing) against a real, private redis-server (never the
machine's Redis), loads N live sessions with the store's own encoding and indexes, then times
repeated ticks that each find 10 freshly expired sessions. Every size lives in one Redis (one
database each) and their ticks alternate, so drift on the machine hits all alike; the report
gives medians and the ratio of the largest to the smallest. Log lines below WARNING are
dropped (they cost the same per expired session whatever the number of live ones).

    python -m benchmarks.reaper_bench [--live 1000 10000 100000] [--expired 10] [--repeats 40]
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import time
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import redis
import structlog

from shared.adapters.redis_server import EmbeddedRedis
from shared.adapters.session_events import SessionEvents
from shared.adapters.session_store import RedisSessionStore, _encode, session_key
from shared.domain.sessions import Session, open_session
from shared.jobs import TEARDOWN, TaskQueue
from shared.session_life import SessionLife

NOW = 1_700_000_000.0
BATCH = 500
LOAD_CHUNK = 2_000


def _session(user: str, *, lifetime: int, now: float) -> Session:
    session, _ = open_session(
        user=user,
        template="ubuntu",
        region="local",
        max_lifetime_seconds=lifetime,
        idle_timeout_seconds=lifetime,
        now=now,
    )
    return session.mark_ready(vms=(), at=now)


class _CountingCelery:
    """The Celery port the tick queues its teardowns on: counts them, sends nothing."""

    conf = SimpleNamespace(task_routes={})  # no routes: every task goes through send_task

    def __init__(self) -> None:
        self.teardowns = 0

    def send_task(self, name: str, **_: Any) -> None:
        if name == TEARDOWN:
            self.teardowns += 1


@dataclass
class Reaper:
    """The session service a reaper runs, on a clock the benchmark sets."""

    life: SessionLife
    clock: _Clock
    celery: _CountingCelery

    @classmethod
    def over(cls, client: redis.Redis, store: RedisSessionStore) -> Reaper:
        clock, celery = _Clock(), _CountingCelery()
        life = SessionLife(
            store=store,
            events=SessionEvents(client),
            queue=TaskQueue(celery),  # type: ignore[arg-type]
            clock=clock,
        )
        return cls(life, clock, celery)


class _Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


def load_live(client: redis.Redis, store: RedisSessionStore, count: int) -> None:
    """``count`` live sessions, far from any deadline, written as the store writes them."""
    for start in range(0, count, LOAD_CHUNK):
        pipe = client.pipeline(transaction=False)
        for i in range(start, min(count, start + LOAD_CHUNK)):
            session = _session(f"live{i}", lifetime=86_400, now=NOW)
            pipe.set(session_key(session.id), _encode(session))
            store._index(pipe, session)  # a bulk load: the store has no public API for it
        pipe.execute()


def tick_once(reaper: Reaper, *, run: int, expired: int) -> float:
    """Seconds for one tick that finds ``expired`` sessions whose lifetime just ended."""
    now = NOW + 3600 + run
    for i in range(expired):
        reaper.life.store.add(_session(f"due{run}-{i}", lifetime=3600, now=now - 3600))
    reaper.clock.now = now
    queued = reaper.celery.teardowns
    started = time.perf_counter()
    reaped = reaper.life.reap(batch=BATCH)
    elapsed = time.perf_counter() - started
    if len(reaped.teardowns) != expired or reaper.celery.teardowns - queued != expired:
        raise AssertionError(
            f"tick settled {len(reaped.teardowns)} of {expired} and queued "
            f"{reaper.celery.teardowns - queued} teardowns"
        )
    return elapsed


def run(live_sizes: list[int], *, expired: int, repeats: int) -> dict[str, Any]:
    server = EmbeddedRedis().start()
    clients = []
    try:
        reapers = {}
        loaded = {}
        for db, live in enumerate(live_sizes):
            client = redis.Redis.from_url(server.url.rsplit("/", 1)[0] + f"/{db}")
            clients.append(client)
            store = RedisSessionStore(client)
            reapers[live] = Reaper.over(client, store)
            started = time.perf_counter()
            load_live(client, store, live)
            loaded[live] = time.perf_counter() - started
        samples: dict[int, list[float]] = {live: [] for live in live_sizes}
        for tick in range(repeats + 3):  # three warm-up rounds, not counted
            for live in live_sizes:
                elapsed = tick_once(reapers[live], run=tick, expired=expired)
                if tick >= 3:
                    samples[live].append(elapsed)
        results = [
            {
                "live_sessions": live,
                "expired_per_tick": expired,
                "ticks": len(samples[live]),
                "median_ms": round(statistics.median(samples[live]) * 1000, 3),
                "p90_ms": round(statistics.quantiles(samples[live], n=10)[-1] * 1000, 3),
                "min_ms": round(min(samples[live]) * 1000, 3),
                "load_seconds": round(loaded[live], 1),
                "deadline_entries": sum(
                    int(client.zcard(key)) for key in client.scan_iter("labvirt:deadline:*")
                ),
            }
            for live, client in zip(live_sizes, clients, strict=True)
        ]
    finally:
        for client in clients:
            client.close()
        server.stop()
    smallest, largest = results[0], results[-1]
    return {
        "benchmark": "reaper tick vs live sessions",
        "python": platform.python_version(),
        "results": results,
        "ratio_median_largest_to_smallest": round(largest["median_ms"] / smallest["median_ms"], 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--live", type=int, nargs="+", default=[1_000, 10_000, 100_000])
    parser.add_argument("--expired", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=40)
    args = parser.parse_args(argv)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    report = run(sorted(args.live), expired=args.expired, repeats=args.repeats)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
