"""reap_expired on fakeredis with a controlled ``now``: who expires, who survives, who wins."""

from __future__ import annotations

import threading
from collections.abc import Callable

import fakeredis
import pytest

from services.reaper.tasks import reap_expired
from shared.adapters.session_store import RedisSessionStore
from shared.domain.sessions import Session, SessionId, SessionState, open_session

NOW = 1_700_000_000.0
P, R, T, E = (
    SessionState.PROVISIONING,
    SessionState.READY,
    SessionState.TERMINATING,
    SessionState.ENDED,
)


def add_session(
    store: RedisSessionStore,
    *,
    lifetime: int = 7200,
    idle: int = 300,
    created: float = NOW,
    state: SessionState = R,
    user: str = "alice",
) -> Session:
    session, _ = open_session(
        user=user,
        template="ubuntu",
        region="local",
        max_lifetime_seconds=lifetime,
        idle_timeout_seconds=idle,
        now=created,
    )
    if state is not P:
        session = session.transition(R, at=created)
    store.add(session)
    return session


@pytest.fixture
def server() -> fakeredis.FakeServer:
    return fakeredis.FakeServer()


@pytest.fixture
def client(server: fakeredis.FakeServer) -> fakeredis.FakeRedis:
    return fakeredis.FakeRedis(server=server)


@pytest.fixture
def store(client: fakeredis.FakeRedis) -> RedisSessionStore:
    return RedisSessionStore(client)


def idle_deadline(client: fakeredis.FakeRedis, session_id: str) -> float | None:
    return client.zscore("labvirt:deadline:idle", session_id)


def lifetime_deadline(client: fakeredis.FakeRedis, session_id: str) -> float | None:
    return client.zscore("labvirt:deadline:lifetime", session_id)


# -- expiry ----------------------------------------------------------------------------------


@pytest.mark.parametrize("state", [P, R])
def test_expires_by_lifetime(
    store: RedisSessionStore, client: fakeredis.FakeRedis, state: SessionState
) -> None:
    session = add_session(store, lifetime=600, idle=3600, state=state)

    assert reap_expired(store, now=NOW + 599.9, batch=10) == []
    assert reap_expired(store, now=NOW + 600, batch=10) == [session.id]

    reaped = store.require(session.id)
    assert reaped.state is T
    assert reaped.reason == "maximum lifetime reached"
    assert reaped.history[-1].at == NOW + 600
    assert lifetime_deadline(client, session.id) is None
    assert idle_deadline(client, session.id) is None


def test_expires_by_idle(store: RedisSessionStore) -> None:
    session = add_session(store, lifetime=7200, idle=300)

    assert reap_expired(store, now=NOW + 299, batch=10) == []
    assert reap_expired(store, now=NOW + 300, batch=10) == [session.id]

    reaped = store.require(session.id)
    assert reaped.state is T
    assert reaped.reason == "idle timeout"
    assert store.count_deadlines("lifetime") == store.count_deadlines("idle") == 0


def test_a_session_past_both_deadlines_is_reaped_once(store: RedisSessionStore) -> None:
    session = add_session(store, lifetime=600, idle=300)

    assert reap_expired(store, now=NOW + 10_000, batch=10) == [session.id]

    reaped = store.require(session.id)
    assert reaped.reason == "maximum lifetime reached"
    assert [t.state for t in reaped.history].count(T) == 1


def test_live_sessions_are_left_alone(
    store: RedisSessionStore, client: fakeredis.FakeRedis
) -> None:
    young = add_session(store, lifetime=7200, idle=300, created=NOW + 1000)
    old = add_session(store, lifetime=7200, idle=300, created=NOW)

    assert reap_expired(store, now=NOW + 500, batch=10) == [old.id]
    assert store.require(young.id).state is R
    assert idle_deadline(client, young.id) == NOW + 1300
    assert lifetime_deadline(client, young.id) == NOW + 1000 + 7200


def test_nothing_to_do_is_cheap_and_harmless(store: RedisSessionStore) -> None:
    assert reap_expired(store, now=NOW, batch=10) == []


# -- heartbeats racing the reaper ------------------------------------------------------------


class HeartbeatAfterDue(RedisSessionStore):
    """A learner's heartbeat lands just after this reaper read what is due."""

    def __init__(self, client: fakeredis.FakeRedis, beat: Callable[[str], None]) -> None:
        super().__init__(client)
        self._beat = beat

    def due(self, kind: str, now: float, limit: int) -> list[SessionId]:
        ids = super().due(kind, now, limit)
        for session_id in ids:
            self._beat(session_id)
        return ids


class HeartbeatAfterTake(RedisSessionStore):
    """A learner's heartbeat lands after this reaper won the gate, before it updates."""

    def __init__(self, client: fakeredis.FakeRedis, beat: Callable[[str], None]) -> None:
        super().__init__(client)
        self._beat = beat

    def take_due(self, kind: str, session_id: str) -> bool:
        won = super().take_due(kind, session_id)
        self._beat(session_id)
        return won


@pytest.mark.parametrize("racing_store", [HeartbeatAfterDue, HeartbeatAfterTake])
def test_a_heartbeat_after_due_was_read_keeps_the_session_and_its_deadline(
    server: fakeredis.FakeServer, racing_store: type[RedisSessionStore]
) -> None:
    api_client = fakeredis.FakeRedis(server=server)
    api = RedisSessionStore(api_client)  # another process
    session = add_session(api, lifetime=7200, idle=300)
    tick = NOW + 301  # idle deadline (NOW + 300) has passed
    beat_at = NOW + 300.5

    def beat(session_id: str) -> None:
        api.update(session_id, lambda s: s.seen(beat_at))

    reaper = racing_store(fakeredis.FakeRedis(server=server), beat)  # type: ignore[call-arg]

    assert reap_expired(reaper, now=tick, batch=10) == []

    alive = api.require(session.id)
    assert alive.state is R
    assert alive.idle_expires_at == beat_at + 300
    assert idle_deadline(api_client, session.id) == beat_at + 300  # still watched...
    assert lifetime_deadline(api_client, session.id) == NOW + 7200
    # ...so the next silence is still noticed.
    assert reap_expired(api, now=beat_at + 299, batch=10) == []
    assert reap_expired(api, now=beat_at + 300, batch=10) == [session.id]
    assert api.require(session.id).reason == "idle timeout"


def test_a_heartbeat_does_not_save_a_session_past_its_lifetime(
    server: fakeredis.FakeServer,
) -> None:
    api = RedisSessionStore(fakeredis.FakeRedis(server=server))
    session = add_session(api, lifetime=600, idle=300)

    def beat(session_id: str) -> None:
        api.update(session_id, lambda s: s.seen(NOW + 600))

    reaper = HeartbeatAfterDue(fakeredis.FakeRedis(server=server), beat)

    assert reap_expired(reaper, now=NOW + 600, batch=10) == [session.id]
    assert api.require(session.id).reason == "maximum lifetime reached"


# -- never twice -----------------------------------------------------------------------------


def test_a_second_tick_finds_nothing_more(store: RedisSessionStore) -> None:
    sessions = [add_session(store, idle=300) for _ in range(3)]

    first = reap_expired(store, now=NOW + 300, batch=10)
    second = reap_expired(store, now=NOW + 300, batch=10)

    assert sorted(first) == sorted(s.id for s in sessions)
    assert second == []
    for session in sessions:
        assert [t.state for t in store.require(session.id).history] == [P, R, T]


def test_sessions_already_terminating_are_not_counted(
    store: RedisSessionStore, client: fakeredis.FakeRedis
) -> None:
    closed = add_session(store, idle=300)
    store.update(closed.id, lambda s: s.transition(T, at=NOW + 10, reason="deleted"))
    # Even with a stale deadline left behind (say, by a crashed writer), it is not reaped again.
    client.zadd("labvirt:deadline:idle", {closed.id: NOW + 300})
    ended = add_session(store, idle=300)
    store.update(ended.id, lambda s: s.transition(T, at=NOW).transition(E, at=NOW))

    assert reap_expired(store, now=NOW + 1000, batch=10) == []

    still = store.require(closed.id)
    assert still.reason == "deleted"
    assert still.history[-1].at == NOW + 10
    assert store.require(ended.id).state is E
    assert store.count_deadlines("idle") == 0


def test_a_session_taken_by_another_reaper_is_not_won(store: RedisSessionStore) -> None:
    taken = add_session(store, idle=300)
    free = add_session(store, idle=300)
    assert store.take_due("idle", taken.id)  # another reaper won this gate first

    assert reap_expired(store, now=NOW + 300, batch=10) == [free.id]
    # The winner, not this reaper, moves it: this one leaves it alone.
    assert store.require(taken.id).state is R


def test_a_deadline_whose_session_is_gone_is_skipped(
    store: RedisSessionStore, client: fakeredis.FakeRedis
) -> None:
    gone = add_session(store, idle=300)
    kept = add_session(store, idle=300)
    client.delete(f"labvirt:session:{gone.id}")

    assert reap_expired(store, now=NOW + 300, batch=10) == [kept.id]
    assert store.count_deadlines("idle") == 0


def test_two_reapers_that_read_the_same_due_set_never_both_win(
    server: fakeredis.FakeServer,
) -> None:
    """Both reapers read every due list before either takes anything: the worst interleaving."""
    setup = RedisSessionStore(fakeredis.FakeRedis(server=server))
    by_lifetime = [add_session(setup, lifetime=100, idle=10_000) for _ in range(10)]
    by_idle = [add_session(setup, lifetime=10_000, idle=100) for _ in range(10)]
    alive = add_session(setup, lifetime=10_000, idle=10_000)
    barrier = threading.Barrier(2, timeout=10)

    class InLockstep(RedisSessionStore):
        def due(self, kind: str, now: float, limit: int) -> list[SessionId]:
            ids = super().due(kind, now, limit)
            barrier.wait()
            return ids

    won: dict[str, list[str]] = {}
    errors: list[BaseException] = []

    def run(name: str) -> None:
        try:
            reaper = InLockstep(fakeredis.FakeRedis(server=server))
            won[name] = reap_expired(reaper, now=NOW + 100, batch=100)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(name,)) for name in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)

    assert errors == []
    expired = {s.id for s in by_lifetime + by_idle}
    assert set(won["a"]).isdisjoint(won["b"])
    assert set(won["a"]) | set(won["b"]) == expired
    assert len(won["a"]) + len(won["b"]) == len(expired)
    for session_id in expired:
        history = setup.require(session_id).history
        assert [t.state for t in history].count(T) == 1
    assert setup.require(alive.id).state is R


def test_sequential_reapers_over_one_server_never_both_win(server: fakeredis.FakeServer) -> None:
    first = RedisSessionStore(fakeredis.FakeRedis(server=server))
    second = RedisSessionStore(fakeredis.FakeRedis(server=server))
    sessions = [add_session(first, idle=100) for _ in range(5)]

    won_first = reap_expired(first, now=NOW + 100, batch=3)
    won_second = reap_expired(second, now=NOW + 100, batch=10)

    assert len(won_first) == 3
    assert set(won_first).isdisjoint(won_second)
    assert set(won_first) | set(won_second) == {s.id for s in sessions}


# -- batches ---------------------------------------------------------------------------------


def test_batch_limits_each_tick_and_the_rest_wait_their_turn(store: RedisSessionStore) -> None:
    # Lifetimes 100..500: oldest deadlines first.
    sessions = [add_session(store, lifetime=100 * (i + 1), idle=10_000) for i in range(5)]
    ids = [s.id for s in sessions]
    now = NOW + 1000

    assert reap_expired(store, now=now, batch=2) == ids[:2]
    assert store.count_deadlines("lifetime") == 3
    assert store.require(ids[2]).state is R
    assert reap_expired(store, now=now, batch=2) == ids[2:4]
    assert reap_expired(store, now=now, batch=2) == ids[4:]
    assert reap_expired(store, now=now, batch=2) == []


def test_batch_applies_to_each_deadline_kind(store: RedisSessionStore) -> None:
    by_lifetime = [add_session(store, lifetime=100 + i, idle=10_000) for i in range(3)]
    by_idle = [add_session(store, lifetime=10_000, idle=100 + i) for i in range(3)]

    won = reap_expired(store, now=NOW + 1000, batch=1)

    assert won == [by_lifetime[0].id, by_idle[0].id]
