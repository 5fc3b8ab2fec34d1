"""Which sessions a browser is connected to, across gateways, on a real Redis (the Lua scripts
are the point): the last close disconnects, a reopen within the grace keeps the session, each
due session goes to exactly one reaper, and a dead gateway's leases run out.

Times are the callers' (``now=``); only the hash of a session's connections has a real TTL.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import redis
import redis.asyncio

from shared.adapters.connections import LEASE_SECONDS, Connections, ConnectionSweeper
from shared.adapters.session_events import SessionEvents
from shared.adapters.session_store import RedisSessionStore
from shared.domain.lifecycle import SessionClocks, Stage, start_session
from shared.domain.reasons import CloseReason
from shared.domain.sessions import Session, SessionState, VmView
from shared.jobs import TEARDOWN, TaskQueue
from shared.session_life import SessionLife
from tests.doubles import RecordingCelery

NOW = 1_700_000_000.0
GRACE = 30.0
SESSION = "s-" + "1" * 24
OTHER = "s-" + "2" * 24
CLOCKS = SessionClocks(
    max_lifetime_seconds=7200,
    idle_timeout_seconds=3600,
    startup_timeout_seconds=600,
    extend_step_seconds=1800,
    hard_deadline_seconds=14400,
)
VMS = [VmView(name="ubuntu", hostname="ubuntu", ip="10.0.0.2", phase="Running", ready=True)]


class Loop:
    """One event loop for the whole test: the async clients stay bound to it."""

    def __init__(self, redis_url: str) -> None:
        self._url = redis_url
        self._runner = asyncio.Runner()
        self._clients: list[redis.asyncio.Redis] = []

    def run(self, coroutine: Any) -> Any:
        return self._runner.run(coroutine)

    def gateway(self) -> Connections:
        """A gateway's side, with a Redis connection of its own."""
        client = redis.asyncio.Redis.from_url(self._url)
        self._clients.append(client)
        return Connections(client)

    def close(self) -> None:
        for client in self._clients:
            self._runner.run(client.aclose())
        self._runner.close()


@pytest.fixture
def client(connect: Callable[[], redis.Redis]) -> redis.Redis:
    return connect()


@pytest.fixture
def loop(redis_url: str, connect: Callable[[], redis.Redis]) -> Iterator[Loop]:
    made = Loop(redis_url)
    yield made
    made.close()


@pytest.fixture
def sweeper(client: redis.Redis) -> ConnectionSweeper:
    return ConnectionSweeper(client)


def disconnected_at(client: redis.Redis, session_id: str) -> float | None:
    return ConnectionSweeper(client).disconnected_since(session_id)


# -- the last close ---------------------------------------------------------------------------


def test_only_the_last_close_marks_the_session_disconnected(
    loop: Loop, client: redis.Redis, sweeper: ConnectionSweeper
) -> None:
    gateway = loop.gateway()
    loop.run(gateway.open(SESSION, "events-1", now=NOW))
    loop.run(gateway.open(SESSION, "terminal-1", now=NOW + 1))
    assert sweeper.connected(SESSION) == 2

    assert loop.run(gateway.close(SESSION, "events-1", now=NOW + 2)) is False
    assert disconnected_at(client, SESSION) is None
    assert sweeper.connected(SESSION) == 1

    assert loop.run(gateway.close(SESSION, "terminal-1", now=NOW + 3)) is True
    assert disconnected_at(client, SESSION) == NOW + 3
    assert sweeper.connected(SESSION) == 0


def test_closing_a_connection_twice_or_one_never_opened_changes_nothing(
    loop: Loop, client: redis.Redis
) -> None:
    gateway = loop.gateway()
    assert loop.run(gateway.close(SESSION, "never-opened", now=NOW)) is False
    assert disconnected_at(client, SESSION) is None

    loop.run(gateway.open(SESSION, "events-1", now=NOW))
    assert loop.run(gateway.close(SESSION, "events-1", now=NOW + 1)) is True
    assert loop.run(gateway.close(SESSION, "events-1", now=NOW + 50)) is False
    assert disconnected_at(client, SESSION) == NOW + 1


def test_sessions_are_counted_apart(loop: Loop, client: redis.Redis) -> None:
    gateway = loop.gateway()
    loop.run(gateway.open(SESSION, "events-1", now=NOW))
    loop.run(gateway.open(OTHER, "events-1", now=NOW))

    assert loop.run(gateway.close(SESSION, "events-1", now=NOW + 1)) is True
    assert disconnected_at(client, OTHER) is None


# -- the grace --------------------------------------------------------------------------------


def test_a_session_is_due_only_once_the_grace_has_passed_and_is_taken_once(
    loop: Loop, sweeper: ConnectionSweeper
) -> None:
    gateway = loop.gateway()
    loop.run(gateway.open(SESSION, "events-1", now=NOW))
    loop.run(gateway.close(SESSION, "events-1", now=NOW + 10))

    assert sweeper.take_due(now=NOW + 10 + GRACE - 1, grace=GRACE) == []
    assert sweeper.take_due(now=NOW + 10 + GRACE, grace=GRACE) == [SESSION]
    assert sweeper.take_due(now=NOW + 10 + GRACE * 10, grace=GRACE) == []


def test_a_reopen_within_the_grace_keeps_the_session(
    loop: Loop, client: redis.Redis, sweeper: ConnectionSweeper
) -> None:
    gateway = loop.gateway()
    loop.run(gateway.open(SESSION, "events-1", now=NOW))
    loop.run(gateway.close(SESSION, "events-1", now=NOW + 1))
    loop.run(gateway.open(SESSION, "events-2", now=NOW + 5))  # the reload came back

    assert disconnected_at(client, SESSION) is None
    assert sweeper.take_due(now=NOW + 1000, grace=GRACE) == []


def test_a_later_disconnect_restarts_the_grace(loop: Loop, sweeper: ConnectionSweeper) -> None:
    gateway = loop.gateway()
    loop.run(gateway.open(SESSION, "events-1", now=NOW))
    loop.run(gateway.close(SESSION, "events-1", now=NOW + 1))
    loop.run(gateway.open(SESSION, "events-2", now=NOW + 20))
    loop.run(gateway.close(SESSION, "events-2", now=NOW + 25))

    assert sweeper.take_due(now=NOW + 1 + GRACE, grace=GRACE) == []
    assert sweeper.take_due(now=NOW + 25 + GRACE, grace=GRACE) == [SESSION]


class _ReconnectsAfterTheListing(redis.Redis):
    """A sweeper's Redis connection that runs ``between`` after the due sessions were listed,
    right before the first is taken (its script runs): another gateway's doing in the race
    window."""

    between: Callable[[], None] | None = None

    def evalsha(self, *args: Any, **kwargs: Any) -> Any:
        if self.between is not None:
            between, self.between = self.between, None
            between()
        return super().evalsha(*args, **kwargs)


def test_a_session_found_due_but_reconnected_before_the_take_is_not_taken(
    loop: Loop, redis_url: str, connect: Callable[[], redis.Redis]
) -> None:
    gateway = loop.gateway()
    loop.run(gateway.open(SESSION, "events-1", now=NOW))
    loop.run(gateway.close(SESSION, "events-1", now=NOW + 1))
    reaper = _ReconnectsAfterTheListing.from_url(redis_url)
    assert isinstance(reaper, _ReconnectsAfterTheListing)
    try:
        # It was due when the reaper listed it, and came back before the reaper took it.
        reaper.between = lambda: loop.run(gateway.open(SESSION, "events-2", now=NOW + 99))
        taken = ConnectionSweeper(reaper).take_due(now=NOW + 100, grace=GRACE)
    finally:
        reaper.close()

    assert reaper.between is None  # the reconnect did happen inside the window
    assert taken == []
    assert disconnected_at(connect(), SESSION) is None
    assert ConnectionSweeper(connect()).connected(SESSION) == 1


def test_a_session_that_left_again_after_the_listing_gets_its_full_grace(
    loop: Loop, redis_url: str, connect: Callable[[], redis.Redis]
) -> None:
    gateway = loop.gateway()
    loop.run(gateway.open(SESSION, "events-1", now=NOW))
    loop.run(gateway.close(SESSION, "events-1", now=NOW + 1))
    reaper = _ReconnectsAfterTheListing.from_url(redis_url)
    assert isinstance(reaper, _ReconnectsAfterTheListing)
    try:

        def reload_page() -> None:
            loop.run(gateway.open(SESSION, "events-2", now=NOW + 99))
            loop.run(gateway.close(SESSION, "events-2", now=NOW + 99.5))

        reaper.between = reload_page
        taken = ConnectionSweeper(reaper).take_due(now=NOW + 100, grace=GRACE)
    finally:
        reaper.close()

    assert reaper.between is None  # the reload did happen inside the window
    # It disconnected at NOW + 99.5: at NOW + 100 it is not due.
    assert taken == []
    assert disconnected_at(connect(), SESSION) == NOW + 99.5


# -- several gateways, several reapers ---------------------------------------------------------


def test_two_gateways_one_connection_each_disconnect_the_session_once(
    loop: Loop, client: redis.Redis, sweeper: ConnectionSweeper
) -> None:
    east, west = loop.gateway(), loop.gateway()
    loop.run(east.open(SESSION, "events-east", now=NOW))
    loop.run(west.open(SESSION, "terminal-west", now=NOW))

    async def close_both() -> list[bool]:
        return list(
            await asyncio.gather(
                east.close(SESSION, "events-east", now=NOW + 1),
                west.close(SESSION, "terminal-west", now=NOW + 1),
            )
        )

    assert sorted(loop.run(close_both())) == [False, True]
    assert disconnected_at(client, SESSION) == NOW + 1
    assert sweeper.take_due(now=NOW + 1 + GRACE, grace=GRACE) == [SESSION]
    assert sweeper.take_due(now=NOW + 1 + GRACE, grace=GRACE) == []


def test_one_gateway_closing_leaves_the_session_connected_through_the_other(
    loop: Loop, client: redis.Redis, sweeper: ConnectionSweeper
) -> None:
    east, west = loop.gateway(), loop.gateway()
    loop.run(east.open(SESSION, "events-east", now=NOW))
    loop.run(west.open(SESSION, "events-west", now=NOW))

    assert loop.run(east.close(SESSION, "events-east", now=NOW + 1)) is False
    assert disconnected_at(client, SESSION) is None
    assert sweeper.take_due(now=NOW + 1000, grace=GRACE) == []


def test_concurrent_reapers_take_each_due_session_exactly_once(
    loop: Loop, connect: Callable[[], redis.Redis]
) -> None:
    gateway = loop.gateway()
    sessions = [f"s-{n:024x}" for n in range(60)]

    async def connect_and_leave() -> None:
        for session_id in sessions:
            await gateway.open(session_id, "events-1", now=NOW)
            await gateway.close(session_id, "events-1", now=NOW + 1)

    loop.run(connect_and_leave())
    reapers = [ConnectionSweeper(connect()) for _ in range(4)]
    start = threading.Barrier(len(reapers))

    def reap(reaper: ConnectionSweeper) -> list[str]:
        start.wait()
        return reaper.take_due(now=NOW + 1 + GRACE, grace=GRACE)

    with ThreadPoolExecutor(len(reapers)) as pool:
        taken = [s for batch in pool.map(reap, reapers) for s in batch]

    assert sorted(taken) == sorted(sessions)  # every one, and none twice


# -- leases -----------------------------------------------------------------------------------


def test_a_dead_gateways_connection_is_a_disconnect_at_its_lease_expiry(
    loop: Loop, client: redis.Redis, sweeper: ConnectionSweeper
) -> None:
    gateway = loop.gateway()
    loop.run(gateway.open(SESSION, "events-1", now=NOW))
    # ... and the gateway dies: no renewal, no close.

    assert sweeper.expire_leases(now=NOW + LEASE_SECONDS - 1) == 0
    assert sweeper.connected(SESSION) == 1

    assert sweeper.expire_leases(now=NOW + LEASE_SECONDS + 5) == 1
    assert sweeper.connected(SESSION) == 0
    assert disconnected_at(client, SESSION) == NOW + LEASE_SECONDS
    assert sweeper.expire_leases(now=NOW + LEASE_SECONDS + 6) == 0

    assert sweeper.take_due(now=NOW + LEASE_SECONDS + GRACE - 1, grace=GRACE) == []
    assert sweeper.take_due(now=NOW + LEASE_SECONDS + GRACE, grace=GRACE) == [SESSION]


def test_a_renewed_lease_does_not_expire(
    loop: Loop, client: redis.Redis, sweeper: ConnectionSweeper
) -> None:
    gateway = loop.gateway()
    loop.run(gateway.open(SESSION, "events-1", now=NOW))
    loop.run(gateway.open(SESSION, "terminal-1", now=NOW))
    loop.run(gateway.renew(SESSION, ["events-1", "terminal-1"], now=NOW + 20))

    assert sweeper.expire_leases(now=NOW + LEASE_SECONDS + 5) == 0
    assert sweeper.connected(SESSION) == 2
    assert disconnected_at(client, SESSION) is None
    assert sweeper.expire_leases(now=NOW + 20 + LEASE_SECONDS) == 2
    assert disconnected_at(client, SESSION) == NOW + 20 + LEASE_SECONDS


def test_a_dead_gateways_lease_leaves_a_live_gateways_connection_alone(
    loop: Loop, client: redis.Redis, sweeper: ConnectionSweeper
) -> None:
    dead, alive = loop.gateway(), loop.gateway()
    loop.run(dead.open(SESSION, "events-dead", now=NOW))
    loop.run(alive.open(SESSION, "events-alive", now=NOW))
    loop.run(alive.renew(SESSION, ["events-alive"], now=NOW + 20))

    assert sweeper.expire_leases(now=NOW + LEASE_SECONDS + 1) == 1
    assert sweeper.connected(SESSION) == 1
    assert disconnected_at(client, SESSION) is None


# -- SessionLife.close_disconnected -----------------------------------------------------------


class FakeClock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Reaper:
    """A ``SessionLife`` as the reaper builds it, over its own Redis connection."""

    def __init__(self, client: redis.Redis, clock: FakeClock) -> None:
        self.celery = RecordingCelery()
        self.store = RedisSessionStore(client)
        self.events = SessionEvents(client)
        self.life = SessionLife(
            store=self.store,
            events=self.events,
            queue=TaskQueue(self.celery),
            clock=clock,
            connections=ConnectionSweeper(client),
        )

    def teardowns(self) -> list[str]:
        return [p["session_id"] for p in self.celery.payloads(TEARDOWN)]


def add_session(store: RedisSessionStore, *, user: str, ready: bool = True) -> Session:
    session, _ = start_session(user=user, template="ubuntu", region="local", clocks=CLOCKS, now=NOW)
    store.add(session)
    if ready:
        session = store.update(session.id, lambda s: s.mark_ready(vms=VMS, at=NOW + 5))
    return session


def test_close_disconnected_closes_only_live_sessions_that_connected_and_left(
    loop: Loop, client: redis.Redis
) -> None:
    clock = FakeClock()
    reaper = Reaper(client, clock)
    left = add_session(reaper.store, user="left")
    booting_left = add_session(reaper.store, user="booting", ready=False)
    never = add_session(reaper.store, user="never")
    still = add_session(reaper.store, user="still")
    deleted = add_session(reaper.store, user="deleted")
    gateway = loop.gateway()

    async def connections() -> None:
        for session in (left, booting_left, still, deleted):
            await gateway.open(session.id, "events-1", now=NOW + 10)
        for session in (left, booting_left, deleted):
            await gateway.close(session.id, "events-1", now=NOW + 20)
        await gateway.renew(still.id, ["events-1"], now=NOW + 30)  # its gateway lives on

    loop.run(connections())
    reaper.store.update(deleted.id, lambda s: s.close(CloseReason.DELETED, at=NOW + 21))

    clock.now = NOW + 20 + GRACE - 1
    assert reaper.life.close_disconnected(grace=GRACE) == []
    clock.now = NOW + 20 + GRACE
    closed = reaper.life.close_disconnected(grace=GRACE)

    assert sorted(closed) == sorted([left.id, booting_left.id])
    assert sorted(reaper.teardowns()) == sorted([left.id, booting_left.id])
    for session_id in closed:
        session = reaper.store.require(session_id)
        assert session.state is SessionState.TERMINATING
        assert session.ended_by == CloseReason.DISCONNECTED.value
        assert session.reason == "disconnected"
        _, ended = reaper.events.history(session_id)[-1]
        assert ended.stage is Stage.ENDED
        assert ended.detail["reason"] == "disconnected"
    assert reaper.store.require(never.id).state is SessionState.READY
    assert reaper.store.require(still.id).state is SessionState.READY
    # Closed before: neither closed again nor torn down a second time.
    assert reaper.store.require(deleted.id).ended_by == CloseReason.DELETED.value

    # Again, and much later (the open connection still renewed): nothing more is closed.
    clock.now = NOW + 100_000
    loop.run(gateway.renew(still.id, ["events-1"], now=clock.now))
    assert reaper.life.close_disconnected(grace=GRACE) == []
    assert sorted(reaper.teardowns()) == sorted([left.id, booting_left.id])
    assert reaper.store.require(never.id).state is SessionState.READY
    assert reaper.store.require(still.id).state is SessionState.READY


def test_a_session_that_never_connected_is_never_closed_as_disconnected(
    client: redis.Redis,
) -> None:
    clock = FakeClock()
    reaper = Reaper(client, clock)
    session = add_session(reaper.store, user="alice")

    for later in (GRACE, LEASE_SECONDS + GRACE, 10_000.0):
        clock.now = NOW + later
        assert reaper.life.close_disconnected(grace=GRACE) == []

    assert reaper.store.require(session.id).state is SessionState.READY
    assert reaper.teardowns() == []


def test_close_disconnected_closes_a_dead_gateways_session_after_lease_and_grace(
    loop: Loop, client: redis.Redis
) -> None:
    clock = FakeClock()
    reaper = Reaper(client, clock)
    session = add_session(reaper.store, user="alice")
    loop.run(loop.gateway().open(session.id, "terminal-1", now=NOW + 10))

    clock.now = NOW + 10 + LEASE_SECONDS + GRACE - 1
    assert reaper.life.close_disconnected(grace=GRACE) == []
    clock.now = NOW + 10 + LEASE_SECONDS + GRACE
    assert reaper.life.close_disconnected(grace=GRACE) == [session.id]
    assert reaper.teardowns() == [session.id]


def test_concurrent_reapers_close_a_disconnected_session_once(
    loop: Loop, connect: Callable[[], redis.Redis]
) -> None:
    clock = FakeClock(NOW + 20 + GRACE)
    reapers = [Reaper(connect(), clock) for _ in range(4)]
    sessions = [add_session(reapers[0].store, user=f"user{n}") for n in range(10)]
    gateway = loop.gateway()

    async def connect_and_leave() -> None:
        for session in sessions:
            await gateway.open(session.id, "events-1", now=NOW + 10)
            await gateway.close(session.id, "events-1", now=NOW + 20)

    loop.run(connect_and_leave())
    start = threading.Barrier(len(reapers))

    def reap(reaper: Reaper) -> list[str]:
        start.wait()
        return reaper.life.close_disconnected(grace=GRACE)

    with ThreadPoolExecutor(len(reapers)) as pool:
        closed = [s for batch in pool.map(reap, reapers) for s in batch]

    expected = sorted(s.id for s in sessions)
    assert sorted(closed) == expected
    assert sorted(s for r in reapers for s in r.teardowns()) == expected
