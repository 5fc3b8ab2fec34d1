"""The reaper (``SessionLife.reap``) on a real Redis with a controlled clock: who expires, who
survives, who wins, and that what a reaper wins it queues for teardown, once.

Every test starts on an empty database of the suite's own Redis (``redis_url``); racing
reapers and API processes each get a connection of their own, as separate processes would.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest
import redis

from shared.adapters.hash_tags import session_tag
from shared.adapters.session_events import SessionEvents, events_key
from shared.adapters.session_indexes import deadline_key, session_key
from shared.adapters.session_store import RedisSessionStore
from shared.domain.reasons import CloseReason
from shared.domain.retries import with_environment_created
from shared.domain.sessions import Session, SessionId, SessionState, open_session
from shared.jobs import PROVISION, PROVISION_QUEUE, TEARDOWN, TEARDOWN_QUEUE, TaskQueue
from shared.session_life import SessionLife
from shared.session_results import Reaped
from tests.doubles import RecordingCelery, SentTask

NOW = 1_700_000_000.0
P, R, T, E = (
    SessionState.PROVISIONING,
    SessionState.READY,
    SessionState.TERMINATING,
    SessionState.ENDED,
)


def reap_tick(
    store: RedisSessionStore, *, now: float, batch: int, celery: RecordingCelery | None = None
) -> Reaped:
    """One reaper pass at ``now``; checks that it queued one teardown for each session it won,
    on the teardown queue, then one provision for each provision it asked again, and nothing
    else."""
    celery = celery if celery is not None else RecordingCelery()
    before = len(celery.sent)
    life = SessionLife(
        store=store,
        events=SessionEvents(store._redis),
        queue=TaskQueue(celery),  # type: ignore[arg-type]
        clock=lambda: now,
    )
    reaped = life.reap(batch=batch)
    assert celery.sent[before:] == [
        SentTask(TEARDOWN, {"session_id": session_id}, TEARDOWN_QUEUE)
        for session_id in reaped.teardowns
    ] + [
        SentTask(PROVISION, {"session_id": session_id}, PROVISION_QUEUE)
        for session_id in reaped.provisions
    ]
    return reaped


def reap_expired(store: RedisSessionStore, *, now: float, batch: int) -> list[str]:
    """The sessions this tick sent to teardown."""
    return reap_tick(store, now=now, batch=batch).teardowns


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
        session = session.mark_ready(vms=(), at=created)
    store.add(session)
    return session


@pytest.fixture
def client(connect: Callable[[], redis.Redis]) -> redis.Redis:
    return connect()


@pytest.fixture
def store(client: redis.Redis) -> RedisSessionStore:
    return RedisSessionStore(client)


def idle_deadline(client: redis.Redis, session_id: str) -> float | None:
    return client.zscore(deadline_key("idle", session_tag(session_id)), session_id)


def lifetime_deadline(client: redis.Redis, session_id: str) -> float | None:
    return client.zscore(deadline_key("lifetime", session_tag(session_id)), session_id)


# -- expiry ----------------------------------------------------------------------------------


@pytest.mark.parametrize("state", [P, R])
def test_expires_by_lifetime(
    store: RedisSessionStore, client: redis.Redis, state: SessionState
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


def test_live_sessions_are_left_alone(store: RedisSessionStore, client: redis.Redis) -> None:
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

    def __init__(self, client: redis.Redis, beat: Callable[[str], None]) -> None:
        super().__init__(client)
        self._beat = beat

    def due(self, kind: str, now: float, limit: int) -> list[SessionId]:
        ids = super().due(kind, now, limit)
        for session_id in ids:
            self._beat(session_id)
        return ids


class HeartbeatInsideSettle(RedisSessionStore):
    """A learner's heartbeat lands after this reaper read the session, before it commits."""

    def __init__(self, client: redis.Redis, beat: Callable[[str], None]) -> None:
        super().__init__(client)
        self._beat = beat

    def update(self, session_id: str, change: Callable[[Session], Session], **kw: Any) -> Session:
        beaten: list[bool] = []

        def racing(current: Session) -> Session:
            if not beaten:
                beaten.append(True)
                self._beat(session_id)  # another client writes: this EXEC will fail and retry
            return change(current)

        return super().update(session_id, racing, **kw)


@pytest.mark.parametrize("racing_store", [HeartbeatAfterDue, HeartbeatInsideSettle])
def test_a_heartbeat_after_due_was_read_keeps_the_session_and_its_deadline(
    connect: Callable[[], redis.Redis], racing_store: type[RedisSessionStore]
) -> None:
    api_client = connect()
    api = RedisSessionStore(api_client)  # another process
    session = add_session(api, lifetime=7200, idle=300)
    tick = NOW + 301  # idle deadline (NOW + 300) has passed
    beat_at = NOW + 300.5

    def beat(session_id: str) -> None:
        api.update(session_id, lambda s: s.heartbeat(beat_at))

    reaper = racing_store(connect(), beat)  # type: ignore[call-arg]

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
    connect: Callable[[], redis.Redis],
) -> None:
    api = RedisSessionStore(connect())
    session = add_session(api, lifetime=600, idle=300)

    def beat(session_id: str) -> None:
        api.update(session_id, lambda s: s.heartbeat(NOW + 600))

    reaper = HeartbeatAfterDue(connect(), beat)

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
    store: RedisSessionStore, client: redis.Redis
) -> None:
    closed = add_session(store, idle=300)
    store.update(closed.id, lambda s: s.close(CloseReason.DELETED, at=NOW + 10))
    # Even with a stale deadline left behind (say, by a crashed writer), it is not reaped again.
    client.zadd(deadline_key("idle", session_tag(closed.id)), {closed.id: NOW + 300})
    ended = add_session(store, idle=300)
    store.update(ended.id, lambda s: s.close(CloseReason.CLOSED, at=NOW).finish(at=NOW))

    # (Before its teardown is due for a retry: see the stuck-teardown tests.)
    assert reap_expired(store, now=NOW + 305, batch=10) == []

    still = store.require(closed.id)
    assert still.reason == "deleted"
    assert still.history[-1].at == NOW + 10
    assert store.require(ended.id).state is E
    assert store.count_deadlines("idle") == 0


def test_a_session_closed_after_the_tick_read_it_is_not_won(
    connect: Callable[[], redis.Redis],
) -> None:
    api = RedisSessionStore(connect())
    closed = add_session(api, idle=300)
    free = add_session(api, idle=300)

    def close(session_id: str) -> None:
        if session_id == closed.id:  # the learner closed it: the API queued its teardown
            api.update(session_id, lambda s: s.close(CloseReason.CLOSED, at=NOW + 299))

    reaper = HeartbeatAfterDue(connect(), close)

    assert reap_expired(reaper, now=NOW + 300, batch=10) == [free.id]
    assert api.require(closed.id).reason == "closed"


def test_a_deadline_whose_session_is_gone_is_skipped(
    store: RedisSessionStore, client: redis.Redis
) -> None:
    gone = add_session(store, idle=300)
    kept = add_session(store, idle=300)
    client.delete(session_key(gone.id))

    assert reap_expired(store, now=NOW + 300, batch=10) == [kept.id]
    assert store.count_deadlines("idle") == 0


def test_two_reapers_that_read_the_same_due_set_never_both_win(
    connect: Callable[[], redis.Redis],
) -> None:
    """Both reapers read every due list before either takes anything: the worst interleaving."""
    setup = RedisSessionStore(connect())
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
            reaper = InLockstep(connect())
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


def test_sequential_reapers_over_one_server_never_both_win(
    connect: Callable[[], redis.Redis],
) -> None:
    first = RedisSessionStore(connect())
    second = RedisSessionStore(connect())
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


# -- the gate is the transaction -------------------------------------------------------------


class DiesBeforeCommitting(RedisSessionStore):
    """A reaper process killed after it decided, before its transaction committed."""

    def update(self, session_id: str, change: Callable[[Session], Session], **kw: Any) -> Session:
        def dying(current: Session) -> Session:
            change(current)
            raise SystemExit("killed")

        return super().update(session_id, dying, **kw)


def test_a_reaper_that_dies_before_committing_loses_no_deadline(
    connect: Callable[[], redis.Redis],
) -> None:
    """The known gap of a separate ZREM gate: the winner died, the deadline was gone for good."""
    store = RedisSessionStore(connect())
    session = add_session(store, idle=300)

    with pytest.raises(SystemExit):
        reap_expired(DiesBeforeCommitting(connect()), now=NOW + 300, batch=10)

    assert store.require(session.id).state is R
    assert store.due("idle", NOW + 300, 10) == [session.id]
    assert reap_expired(store, now=NOW + 301, batch=10) == [session.id]


def test_a_reaper_that_dies_before_enqueueing_has_its_teardown_asked_for_again(
    store: RedisSessionStore,
) -> None:
    retry = store.policy.teardown_retry_seconds
    session = add_session(store, idle=300)
    # The reaper commits, then cannot send the teardown (the broker is gone, or so is the
    # process): the session sits in terminating with nobody working on it.
    with pytest.raises(ConnectionError):
        reap_tick(
            store,
            now=NOW + 300,
            batch=10,
            celery=RecordingCelery(fail_with=ConnectionError("broker unreachable")),
        )
    assert store.require(session.id).state is T

    assert reap_expired(store, now=NOW + 300 + retry - 1, batch=10) == []
    assert reap_expired(store, now=NOW + 300 + retry, batch=10) == [session.id]
    assert reap_expired(store, now=NOW + 300 + retry, batch=10) == []  # once per interval
    assert store.require(session.id).teardown_requested_at == NOW + 300 + retry
    assert reap_expired(store, now=NOW + 300 + 2 * retry, batch=10) == [session.id]
    # The session's state and history are untouched by retries.
    again = store.require(session.id)
    assert again.state is T
    assert [t.state for t in again.history] == [P, R, T]


def test_a_teardown_that_finished_is_not_asked_for_again(store: RedisSessionStore) -> None:
    retry = store.policy.teardown_retry_seconds
    session = add_session(store, idle=300)
    store.update(session.id, lambda s: s.close(CloseReason.CLOSED, at=NOW))
    store.update(session.id, lambda s: s.finish(at=NOW + 2))

    assert reap_expired(store, now=NOW + 10 * retry, batch=10) == []
    assert store.count_deadlines("teardown") == 0


# -- startup timeout -------------------------------------------------------------------------


def add_booting(store: RedisSessionStore, *, startup: int = 600) -> Session:
    session, _ = open_session(
        user="bob",
        template="ubuntu",
        region="local",
        max_lifetime_seconds=7200,
        idle_timeout_seconds=3600,
        now=NOW,
        startup_timeout_seconds=startup,
    )
    store.add(session)
    return session


def test_provisioning_past_the_startup_timeout_fails_and_is_torn_down(
    store: RedisSessionStore,
) -> None:
    session = add_booting(store, startup=600)

    assert reap_expired(store, now=NOW + 599, batch=10) == []
    assert reap_expired(store, now=NOW + 600, batch=10) == [session.id]

    failed = store.require(session.id)
    assert failed.state is SessionState.FAILED
    assert failed.reason == "environment did not become ready within 600 s (startup timeout)"
    assert reap_expired(store, now=NOW + 10_000, batch=10) == []  # final: nothing more


# -- provisions lost with their worker -------------------------------------------------------


def test_a_provision_lost_with_its_worker_is_asked_again_once_per_delay(
    store: RedisSessionStore,
) -> None:
    """The default delay (15 s) from the open, then from each ask; never twice for one due
    entry, however many ticks run meanwhile."""
    session = add_booting(store)

    assert reap_tick(store, now=NOW + 14.9, batch=10).provisions == []
    assert reap_tick(store, now=NOW + 15, batch=10).provisions == [session.id]
    assert reap_tick(store, now=NOW + 15, batch=10).provisions == []
    assert reap_tick(store, now=NOW + 29.9, batch=10).provisions == []
    assert reap_tick(store, now=NOW + 30, batch=10).provisions == [session.id]
    assert store.require(session.id).state is P
    assert store.require(session.id).provision_requested_at == NOW + 30


def test_sequential_reapers_ask_for_a_lost_provision_once(
    connect: Callable[[], redis.Redis],
) -> None:
    first = RedisSessionStore(connect())
    second = RedisSessionStore(connect())
    sessions = [add_booting(first) for _ in range(4)]

    asked_first = reap_tick(first, now=NOW + 20, batch=2).provisions
    asked_second = reap_tick(second, now=NOW + 20, batch=10).provisions

    assert len(asked_first) == 2
    assert set(asked_first).isdisjoint(asked_second)
    assert set(asked_first) | set(asked_second) == {s.id for s in sessions}


def test_a_created_environment_or_a_ready_session_is_not_provisioned_again(
    store: RedisSessionStore,
) -> None:
    created = add_booting(store)
    store.update(created.id, lambda s: with_environment_created(s, environment_id=s.environment_id))
    ready = add_booting(store)
    store.update(ready.id, lambda s: s.mark_ready(vms=(), at=NOW + 5))

    assert store.count_deadlines("provision") == 0
    assert reap_tick(store, now=NOW + 100, batch=10).provisions == []


def test_a_session_that_became_ready_has_no_startup_deadline(store: RedisSessionStore) -> None:
    session = add_booting(store, startup=600)
    store.update(session.id, lambda s: s.mark_ready(vms=(), at=NOW + 30))

    assert store.count_deadlines("startup") == 0
    assert reap_expired(store, now=NOW + 601, batch=10) == []
    assert store.require(session.id).state is R


# -- expiring-soon ---------------------------------------------------------------------------


def stages(client: redis.Redis, session_id: str) -> list[str]:
    return [f[b"stage"].decode() for _, f in client.xrange(events_key(session_id))]


def test_expiring_soon_is_sent_once_per_deadline(
    store: RedisSessionStore, client: redis.Redis
) -> None:
    # Lifetime 600 s, lead 300 s (the default warning): the warning falls due at NOW + 300.
    session = add_session(store, lifetime=600, idle=10_000)

    assert reap_tick(store, now=NOW + 299, batch=10).warnings == []
    tick = reap_tick(store, now=NOW + 300, batch=10)
    assert tick.warnings == [session.id]
    assert tick.teardowns == []
    assert reap_tick(store, now=NOW + 400, batch=10).warnings == []
    assert stages(client, session.id) == ["ready", "expiring-soon"]  # stored ready
    assert store.require(session.id).warned_for == NOW + 600

    assert reap_expired(store, now=NOW + 600, batch=10) == [session.id]
    assert stages(client, session.id)[-1] == "ended"


def test_a_heartbeat_re_arms_the_idle_warning(
    store: RedisSessionStore, client: redis.Redis
) -> None:
    # Idle 100 s: the lead is capped at half of it, 50 s.
    session = add_session(store, lifetime=10_000, idle=100)
    assert reap_tick(store, now=NOW + 50, batch=10).warnings == [session.id]
    store.update(session.id, lambda s: s.heartbeat(NOW + 60))

    assert reap_tick(store, now=NOW + 109, batch=10).warnings == []
    assert reap_tick(store, now=NOW + 110, batch=10).warnings == [session.id]
    assert stages(client, session.id).count("expiring-soon") == 2
