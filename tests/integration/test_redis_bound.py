"""What ended sessions leave in Redis is bounded, and nothing of theirs outlives the retention.

Sessions live their whole life in-process, through the runtime every process builds
(``build_runtime``, on the suite's own Redis; the Celery port only records): opened as
``POST /v1/sessions`` opens them (``SessionLife.open``), reported creating and ready as the
provisioner and its observer report them, closed as ``DELETE`` closes them and finished as the
teardown finishes them.

- 10,000 ended sessions cost Redis less than 80 MB (``MEMORY_BOUND_BYTES`` for as many as run)
  while the retention keeps them (measured: about 6 KB each, most of it the event stream, which
  Redis allocates 4 KB at a time; the README's configuration section states the bound), and
  every key left is a session's own with a TTL no longer than the retention, or one of the few
  per-pool keys whose size does not grow with sessions.
- With a one-second retention, sessions (a cold one, a warm one, one whose browser was
  connected) leave nothing at all once Redis has expired their keys.
"""

from __future__ import annotations

import asyncio
import dataclasses
import fnmatch
import logging
import os
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import redis
import redis.asyncio
import structlog

from shared.adapters.connections import Connections
from shared.adapters.tickets import issue_ticket
from shared.config import Settings
from shared.domain.lifecycle import DEADLINE_KINDS, Stage, clocks_for
from shared.domain.pools.config import PoolKey
from shared.domain.pools.environments import new_warm_environment
from shared.domain.reasons import CloseReason
from shared.domain.sessions import SessionState, VmView
from shared.runtime import Runtime, build_runtime, clock_overrides
from tests.conftest import claim_redis_database
from tests.doubles import RecordingCelery

# `make redis-bound` runs the stated 10,000; `make test` a fifth of them (the same bound per
# session), which keeps the suite fast.
SESSIONS = int(os.environ.get("LABVIRT_REDIS_BOUND_SESSIONS", "2000"))
# The stated bound: < 80 MB for 10,000 ended sessions within the retention. One costs about
# 6 KB (Redis 6.2 and 7.0): its JSON document (~1.1 KB), its event stream (~4.7 KB: a stream's
# first node is allocated 4 KB at once), their expiry entries and its place in the pool's hour
# of arrivals; 8 KB each leaves room for the allocator's rounding.
MEMORY_BOUND_BYTES = 80 * 1024 * 1024 * SESSIONS // 10_000
TEMPLATE = "ubuntu"
# Keys of a pool or of the whole system: one each whatever the number of sessions, or
# (outcomes, arrivals) bounded by their own time windows with a TTL of their own.
SHARED_KEYS = {
    "labvirt:pool:*:totals": "hits and misses since the pool began: two counters",
    "labvirt:pool:*:outcomes:*": "one per pool per minute, expiring after two hours",
    "labvirt:pool:*:arrivals": "the last hour's claims for sizing, trimmed and expiring",
    "labvirt:pool:*:claimed": "claims not yet bound (empty once each is bound)",
    "labvirt:pool:*:ready": "the pool's ready environments",
    "labvirt:pool:*:inflight": "the pool's booting environments",
    "labvirt:pools:known": "the pools that ever held an environment",
}


@pytest.fixture
def redis_db() -> Iterator[str]:
    with claim_redis_database() as url:
        yield url


@pytest.fixture(autouse=True)
def quiet_logs() -> Iterator[None]:
    """Tens of thousands of transitions: log warnings only, as the default level would not."""
    saved = structlog.get_config()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    yield
    structlog.configure(**saved)


def runtime_on(url: str, *, retention: int | None = None) -> Runtime:
    settings = Settings.from_env({"LABVIRT_MODE": "dev", "REDIS_URL": url})
    if retention is not None:  # below the variable's minimum: tests wait for Redis's expiry
        settings = dataclasses.replace(settings, ended_retention_seconds=retention)
    return build_runtime(settings, celery=RecordingCelery())  # type: ignore[arg-type]


def open_session(runtime: Runtime, user: str) -> str:
    template = runtime.templates[TEMPLATE]
    opened = runtime.life.open(
        user=user,
        template=TEMPLATE,
        clocks=clocks_for(template, clock_overrides(runtime.settings)),
        replace=False,
    )
    return opened.session.id


def serve_and_end(runtime: Runtime, session_id: str) -> None:
    """The rest of a session's life, as the worker and the API move it."""
    session = runtime.life.get(session_id)
    assert session is not None
    if not session.warm:
        runtime.life.emit(session_id, Stage.CREATING, {"vms": 1})
        vms = [VmView("vm", "vm", ip="10.0.0.7", phase="Running", ready=True)]
        assert runtime.life.mark_ready(session_id, vms)
    runtime.life.close(session_id, CloseReason.DELETED)
    assert runtime.life.finish(session_id)


def used_memory(client: redis.Redis) -> int:
    return int(client.info("memory")["used_memory"])


def pattern_of(key: str) -> str | None:
    return next((p for p in SHARED_KEYS if fnmatch.fnmatchcase(key, p)), None)


def every_key(client: redis.Redis) -> list[str]:
    return [k.decode() for k in client.scan_iter(count=1000)]


# About 9 ms of client CPU per session (some 38 round trips: the user lock, the region's load,
# the pool claim, four transactions): 10,000 took 135 s on a busy two-core machine.
@pytest.mark.timeout(900)
def test_ended_sessions_stay_within_the_bound_and_all_expire(
    redis_db: str,
) -> None:
    runtime = runtime_on(redis_db)
    retention = runtime.settings.ended_retention_seconds
    client = runtime.redis
    before = used_memory(client)
    started = time.monotonic()

    ended = []
    for i in range(SESSIONS):
        session_id = open_session(runtime, f"learner-{i}")
        if i % 100 == 0:  # some browsers open a terminal and never use the ticket
            issue_ticket(client, session_id, now=runtime.clock())
        serve_and_end(runtime, session_id)
        ended.append(session_id)
    seconds = time.monotonic() - started

    grown = used_memory(client) - before
    print(  # noqa: T201 - the measurement the bound in the docs comes from
        f"\n{SESSIONS} ended sessions in {seconds:.1f} s: Redis grew by "
        f"{grown / 2**20:.1f} MB, {grown / SESSIONS:.0f} bytes per session"
    )
    assert grown < MEMORY_BOUND_BYTES
    assert {s.state for s in runtime.sessions.get_many(ended).values()} == {SessionState.ENDED}

    unbounded: dict[str, Any] = {}
    shared: Counter[str] = Counter()
    for key in every_key(client):
        pattern = pattern_of(key)
        if pattern is not None:
            shared[pattern] += 1
            continue
        ttl = client.ttl(key)
        if ttl == -2:
            continue  # expired since the scan (a ticket's 30 s)
        if not 0 <= ttl <= retention:  # -1: no expiry at all
            unbounded[key] = ttl
    assert unbounded == {}
    # One of each per pool, but for the minute counters: one per minute the run took.
    minutes = shared.pop("labvirt:pool:*:outcomes:*")
    assert minutes <= seconds // 60 + 2
    assert set(shared.values()) == {1}
    # The live indexes no longer hold them.
    assert runtime.sessions.live_sessions() == []
    assert runtime.sessions.user_sessions("learner-0") == []
    assert all(runtime.sessions.count_deadlines(kind) == 0 for kind in DEADLINE_KINDS)


def test_with_a_short_retention_nothing_of_ended_sessions_is_left(redis_db: str) -> None:
    runtime = runtime_on(redis_db, retention=1)
    client = runtime.redis
    assert runtime.pools is not None
    pool = PoolKey(runtime.settings.default_region, TEMPLATE)
    warm = new_warm_environment(key=pool, now=runtime.clock())
    assert runtime.pools.reserve(pool, [warm], ceiling=1, max_in_flight=1)
    assert runtime.pools.mark_ready(pool, warm.id, vms=[VmView("vm", "vm")], at=runtime.clock())

    warm_session = open_session(runtime, "warm-learner")
    assert runtime.sessions.require(warm_session).environment_id == warm.id
    runtime.pools.forget_claim(pool, warm.id)  # as the bind does
    cold_session = open_session(runtime, "cold-learner")
    connected_session = open_session(runtime, "connected-learner")
    asyncio.run(connect(redis_db, connected_session, runtime.clock()))
    for session_id in (warm_session, cold_session, connected_session):
        serve_and_end(runtime, session_id)
    # The gateway drops the terminal once the session ended; the reaper's sweep follows.
    asyncio.run(disconnect(redis_db, connected_session, runtime.clock()))
    assert runtime.life.close_disconnected(grace=0) == []

    ended = (warm_session, cold_session, connected_session)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and leftovers(client, ended, warm.id):
        time.sleep(0.1)
    assert leftovers(client, ended, warm.id) == []


async def connect(url: str, session_id: str, now: float) -> None:
    client = redis.asyncio.Redis.from_url(url)
    try:
        await Connections(client).open(session_id, "tab-1", now=now)
    finally:
        await client.aclose()


async def disconnect(url: str, session_id: str, now: float) -> None:
    client = redis.asyncio.Redis.from_url(url)
    try:
        assert await Connections(client).close(session_id, "tab-1", now=now)
    finally:
        await client.aclose()


def leftovers(client: redis.Redis, session_ids: tuple[str, ...], env_id: str) -> list[str]:
    """Keys or index entries still naming one of the sessions or the warm environment."""
    names = (*session_ids, env_id)
    found = []
    for key in every_key(client):
        kind = client.type(key).decode()
        if kind == "none":  # expired between the scan and this look
            continue
        members: list[Any] = []
        if kind == "set":
            members = list(client.smembers(key))
        elif kind == "zset":
            members = client.zrange(key, 0, -1)
        elif kind == "hash":
            members = list(client.hkeys(key))
        texts = [m.decode() for m in members]
        if pattern_of(key) == "labvirt:pool:*:arrivals":
            continue  # the pool's demand window: its own hour, see SHARED_KEYS
        if any(n in key for n in names) or any(n in t for n in names for t in texts):
            found.append(key)
    return found
