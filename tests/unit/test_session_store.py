"""RedisSessionStore: documents, indexes, events, the user lock, optimistic updates.

Single-client logic runs on fakeredis; what several clients or threads race on (the user lock,
optimistic transactions, a key's expiry) runs on the suite's own real Redis (``redis_url``),
emptied before and after each such test."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import replace

import fakeredis
import pytest
import redis

from shared.adapters.hash_tags import SESSION_TAGS, session_tag
from shared.adapters.session_events import events_key
from shared.adapters.session_indexes import deadline_key, region_key, session_key, user_key
from shared.adapters.session_store import (
    FINISHED_RETENTION_SECONDS,
    RedisSessionStore,
    SessionNotFound,
    UserBusy,
)
from shared.domain.sessions import (
    IllegalTransition,
    Session,
    SessionState,
    VmView,
    open_session,
)

NOW = 1_700_000_000.0
LIFETIME = 7200
IDLE = 300
P, R, T, E, F = (
    SessionState.PROVISIONING,
    SessionState.READY,
    SessionState.TERMINATING,
    SessionState.ENDED,
    SessionState.FAILED,
)
# The shortest legal path from provisioning to each state.
PATH_TO = {P: (), R: (R,), T: (T,), E: (T, E), F: (F,)}


def new_session(
    *,
    user: str = "alice",
    now: float = NOW,
    lifetime: int = LIFETIME,
    idle: int = IDLE,
    state: SessionState = P,
) -> Session:
    session, _ = open_session(
        user=user,
        template="ubuntu",
        region="local",
        max_lifetime_seconds=lifetime,
        idle_timeout_seconds=idle,
        now=now,
    )
    for step in PATH_TO[state]:
        session = session.transition(step, at=now)
    return session


def deadline(client: fakeredis.FakeRedis, kind: str, session_id: str) -> float | None:
    return client.zscore(deadline_key(kind, session_tag(session_id)), session_id)


def user_index(client: fakeredis.FakeRedis, user: str) -> set[str]:
    return {m.decode() for tag in SESSION_TAGS for m in client.smembers(user_key(user, tag))}


@pytest.fixture
def client() -> fakeredis.FakeRedis:
    return fakeredis.FakeRedis()


@pytest.fixture
def store(client: fakeredis.FakeRedis) -> RedisSessionStore:
    return RedisSessionStore(client)


# -- documents -------------------------------------------------------------------------------


def test_add_then_get_and_require(store: RedisSessionStore) -> None:
    session = new_session()

    store.add(session)

    assert store.get(session.id) == session
    assert store.require(session.id) == session


def test_get_of_an_absent_session_is_none_and_require_raises(store: RedisSessionStore) -> None:
    assert store.get("s-" + "0" * 24) is None
    with pytest.raises(SessionNotFound):
        store.require("s-" + "0" * 24)


def test_sessions_are_visible_to_another_client_of_the_same_server(
    connect: Callable[[], redis.Redis],
) -> None:
    session = new_session()

    RedisSessionStore(connect()).add(session)

    assert RedisSessionStore(connect()).get(session.id) == session


def test_duplicate_add_fails_and_leaves_the_first_untouched(
    store: RedisSessionStore, client: fakeredis.FakeRedis
) -> None:
    first = new_session()
    store.add(first)
    impostor = replace(first, user="mallory", expires_at=NOW + 1, last_seen_at=NOW - IDLE)

    with pytest.raises(ValueError, match="already exists"):
        store.add(impostor)

    assert store.get(first.id) == first
    assert deadline(client, "lifetime", first.id) == first.expires_at
    assert deadline(client, "idle", first.id) == first.idle_expires_at
    assert user_index(client, "mallory") == set()
    assert user_index(client, "alice") == {first.id}


# -- update ----------------------------------------------------------------------------------


def test_update_applies_and_persists(store: RedisSessionStore, client: fakeredis.FakeRedis) -> None:
    session = new_session()
    store.add(session)
    vm = VmView(name="ubuntu", hostname="ubuntu", ip="10.0.0.9", phase="Running", ready=True)

    updated = store.update(session.id, lambda s: s.transition(R, at=NOW + 30).with_vms([vm]))

    assert updated.state is R
    assert updated.vms == (vm,)
    assert store.get(session.id) == updated
    assert RedisSessionStore(client).get(session.id) == updated


def test_update_of_an_absent_session_raises(store: RedisSessionStore) -> None:
    with pytest.raises(SessionNotFound):
        store.update("s-" + "0" * 24, lambda s: s)


@pytest.mark.parametrize(
    "failure",
    [
        RuntimeError("boom"),
        IllegalTransition(E, R),
    ],
)
def test_an_exception_in_change_aborts_without_writing(
    store: RedisSessionStore, client: fakeredis.FakeRedis, failure: Exception
) -> None:
    session = new_session()
    store.add(session)
    raw_before = client.get(session_key(session.id))

    def change(current: Session) -> Session:
        current.transition(R, at=NOW)  # work that would have been written...
        raise failure

    with pytest.raises(type(failure)):
        store.update(session.id, change)

    assert client.get(session_key(session.id)) == raw_before
    assert deadline(client, "idle", session.id) == session.idle_expires_at
    # The connection is usable afterwards: no half-open MULTI left behind.
    assert store.update(session.id, lambda s: s.transition(R, at=NOW)).state is R


def test_a_change_that_returns_the_same_object_writes_nothing(
    store: RedisSessionStore, client: fakeredis.FakeRedis
) -> None:
    ended = new_session()
    store.add(ended)
    store.update(ended.id, lambda s: s.transition(T, at=NOW).transition(E, at=NOW))
    client.persist(session_key(ended.id))  # would be set again by any write

    assert store.update(ended.id, lambda s: s).state is E
    assert client.ttl(session_key(ended.id)) == -1


def test_illegal_transitions_surface_from_update(store: RedisSessionStore) -> None:
    session = new_session()
    store.add(session)

    with pytest.raises(IllegalTransition):
        store.update(session.id, lambda s: s.transition(E, at=NOW))
    assert store.require(session.id).state is P


# -- indexes ---------------------------------------------------------------------------------


@pytest.mark.parametrize("state", [P, R])
def test_live_sessions_have_both_deadlines(
    store: RedisSessionStore, client: fakeredis.FakeRedis, state: SessionState
) -> None:
    session = new_session(state=state)

    store.add(session)

    assert deadline(client, "lifetime", session.id) == NOW + LIFETIME
    assert deadline(client, "idle", session.id) == NOW + IDLE
    assert store.count_deadlines("lifetime") == store.count_deadlines("idle") == 1


@pytest.mark.parametrize("state", [T, E, F])
def test_terminating_and_final_sessions_lose_their_deadlines(
    store: RedisSessionStore, client: fakeredis.FakeRedis, state: SessionState
) -> None:
    session = new_session()
    store.add(session)

    for step in PATH_TO[state]:
        store.update(session.id, lambda s, step=step: s.transition(step, at=NOW))

    assert store.require(session.id).state is state
    assert deadline(client, "lifetime", session.id) is None
    assert deadline(client, "idle", session.id) is None
    assert store.due("lifetime", NOW + 10 * LIFETIME, 10) == []


@pytest.mark.parametrize("state", [T, E, F])
def test_adding_an_unclocked_session_indexes_no_deadline(
    store: RedisSessionStore, state: SessionState
) -> None:
    store.add(new_session(state=state))

    assert store.count_deadlines("lifetime") == store.count_deadlines("idle") == 0


def test_a_heartbeat_moves_the_idle_deadline_only(
    store: RedisSessionStore, client: fakeredis.FakeRedis
) -> None:
    session = new_session(state=R)
    store.add(session)

    store.update(session.id, lambda s: s.seen(NOW + 100))

    assert deadline(client, "idle", session.id) == NOW + 100 + IDLE
    assert deadline(client, "lifetime", session.id) == NOW + LIFETIME


def test_user_index_follows_the_session_life(
    store: RedisSessionStore, client: fakeredis.FakeRedis
) -> None:
    first, second = new_session(), new_session()
    other = new_session(user="bob")
    for session in (first, second, other):
        store.add(session)

    assert store.user_sessions("alice") == sorted([first, second], key=lambda s: s.id)
    assert store.user_sessions("bob") == [other]
    assert store.user_sessions("carol") == []

    store.update(first.id, lambda s: s.transition(T, at=NOW))
    assert {s.id for s in store.user_sessions("alice")} == {first.id, second.id}

    store.update(first.id, lambda s: s.transition(E, at=NOW))
    assert store.user_sessions("alice") == [second]
    assert user_index(client, "alice") == {second.id}


def test_final_sessions_are_kept_for_a_while_then_expire(
    store: RedisSessionStore, client: fakeredis.FakeRedis
) -> None:
    session = new_session()
    store.add(session)
    assert client.ttl(session_key(session.id)) == -1  # live: no expiry

    store.update(session.id, lambda s: s.transition(F, at=NOW, reason="boot failed"))

    ttl = client.ttl(session_key(session.id))
    assert 0 < ttl <= FINISHED_RETENTION_SECONDS
    assert store.require(session.id).reason == "boot failed"


def test_the_ended_retention_bounds_the_document_and_the_events(
    client: fakeredis.FakeRedis,
) -> None:
    store = RedisSessionStore(client, ended_retention_seconds=90)
    session = new_session()
    store.add(session)
    live_stream_ttl = client.ttl(events_key(session.id))
    assert live_stream_ttl > 90  # a live session's events outlast any pause between them

    store.update(session.id, lambda s: s.transition(T, at=NOW))
    store.update(session.id, lambda s: s.transition(E, at=NOW))

    assert 0 < client.ttl(session_key(session.id)) <= 90
    assert 0 < client.ttl(events_key(session.id)) <= 90  # the final event's append included


def test_user_sessions_skips_ids_whose_document_is_gone(
    store: RedisSessionStore, client: fakeredis.FakeRedis
) -> None:
    session = new_session()
    store.add(session)
    client.delete(session_key(session.id))

    assert store.user_sessions("alice") == []


# -- due deadlines ---------------------------------------------------------------------------


def test_due_lists_expired_sessions_oldest_first_up_to_the_limit(
    store: RedisSessionStore,
) -> None:
    lifetimes = [500, 100, 300, 200, 400, 10_000]
    sessions = {life: new_session(lifetime=life, idle=100_000) for life in lifetimes}
    for session in sessions.values():
        store.add(session)
    by_age = [sessions[life].id for life in sorted(lifetimes)]

    assert store.due("lifetime", NOW + 400, 10) == by_age[:4]  # the deadline itself is due
    assert store.due("lifetime", NOW + 400, 2) == by_age[:2]
    assert store.due("lifetime", NOW + 99, 10) == []
    assert store.due("lifetime", NOW + 10_000, 100) == by_age
    assert store.due("idle", NOW + 10_000, 100) == []


def test_forget_deadline_drops_one_kind_only(store: RedisSessionStore) -> None:
    session = new_session()
    store.add(session)

    store.forget_deadline("idle", session.id)
    store.forget_deadline("idle", "s-" + "0" * 24)  # absent: nothing happens

    assert store.due("idle", NOW + IDLE, 10) == []
    assert store.due("lifetime", NOW + LIFETIME, 10) == [session.id]


def test_the_next_write_of_a_live_session_indexes_it_again(store: RedisSessionStore) -> None:
    session = new_session()
    store.add(session)
    store.forget_deadline("idle", session.id)

    store.update(session.id, replace)  # a fresh copy: written back, so re-indexed

    assert store.due("idle", NOW + IDLE, 10) == [session.id]


def test_reindex_rewrites_the_deadlines_of_an_unchanged_session(
    store: RedisSessionStore, client: fakeredis.FakeRedis
) -> None:
    session = new_session()
    store.add(session)
    stale = {session.id: NOW}  # as a crashed writer left it
    client.zadd(deadline_key("idle", session_tag(session.id)), stale)

    store.update(session.id, lambda s: s, reindex=True)

    assert deadline(client, "idle", session.id) == NOW + IDLE


# -- regions, restores, events and the user lock ---------------------------------------------


def test_region_sessions_are_the_live_ones_and_forget_lost_documents(
    store: RedisSessionStore, client: fakeredis.FakeRedis
) -> None:
    live = new_session(state=R)
    ending = new_session(user="bob", state=T)
    done = new_session(user="carol", state=E)
    lost = new_session(user="dave")
    for session in (live, ending, done, lost):
        store.add(session)
    client.delete(session_key(lost.id))

    assert set(store.region_sessions("local")) == {live.id, ending.id}
    assert store.region_sessions("elsewhere") == {}
    assert client.sismember(region_key("local", session_tag(lost.id)), lost.id) == 0


def test_restore_stores_once_and_announces_nothing(
    store: RedisSessionStore, client: fakeredis.FakeRedis
) -> None:
    session = new_session(state=R)

    assert store.restore(session) is True
    assert store.restore(replace(session, user="mallory")) is False

    assert store.require(session.id) == session
    assert deadline(client, "idle", session.id) == NOW + IDLE
    assert client.exists(events_key(session.id)) == 0


def test_each_state_change_appends_one_event_in_the_same_transaction(
    store: RedisSessionStore, client: fakeredis.FakeRedis
) -> None:
    session = new_session()
    store.add(session)
    store.update(session.id, lambda s: s.seen(NOW + 5))  # no state change: no event
    store.update(session.id, lambda s: s.transition(R, at=NOW + 10))
    store.update(session.id, lambda s: s.transition(T, at=NOW + 20, reason="closed"))
    store.update(session.id, lambda s: s.transition(E, at=NOW + 30))  # nothing new for learners

    entries = client.xrange(events_key(session.id))
    stages = [fields[b"stage"].decode() for _, fields in entries]
    assert stages == ["queued", "ready", "ended"]
    assert b'"reason":"closed"' in entries[-1][1][b"detail"]


def test_a_failed_change_appends_no_event(
    store: RedisSessionStore, client: fakeredis.FakeRedis
) -> None:
    session = new_session()
    store.add(session)

    def broken(current: Session) -> Session:
        current.transition(R, at=NOW)
        raise RuntimeError("the writer died before committing")

    with pytest.raises(RuntimeError):
        store.update(session.id, broken)

    assert client.xlen(events_key(session.id)) == 1  # queued only


def test_the_user_lock_admits_one_holder_at_a_time(
    connect: Callable[[], redis.Redis],
) -> None:
    store = RedisSessionStore(connect())
    order: list[str] = []
    inside = threading.Event()
    release = threading.Event()

    def first() -> None:
        with store.user_lock("alice"):
            order.append("first in")
            inside.set()
            release.wait(5)
            order.append("first out")

    thread = threading.Thread(target=first)
    thread.start()
    inside.wait(5)
    with pytest.raises(UserBusy), store.user_lock("alice", wait_seconds=0.05):
        pass
    with store.user_lock("bob", wait_seconds=0.05):  # another user is not held up
        order.append("bob")
    release.set()
    with store.user_lock("alice", wait_seconds=5):
        order.append("second in")
    thread.join(5)

    assert order == ["first in", "bob", "first out", "second in"]


def test_the_user_lock_expires_if_its_holder_dies(
    connect: Callable[[], redis.Redis],
) -> None:
    client = connect()
    store = RedisSessionStore(client)
    client.set("labvirt:user-lock:alice", "a dead holder", px=50)

    with store.user_lock("alice", wait_seconds=2):
        assert client.get("labvirt:user-lock:alice") != b"a dead holder"
    assert client.exists("labvirt:user-lock:alice") == 0


# -- concurrency -----------------------------------------------------------------------------


def test_concurrent_read_modify_write_never_loses_an_update(
    connect: Callable[[], redis.Redis],
) -> None:
    """Two threads append to the same session through two clients; every append survives.

    A barrier inside the first change of each thread makes both read the same version before
    either writes, so at least one WATCH conflict (and retry) is certain, not left to luck.
    """
    session = new_session()
    RedisSessionStore(connect()).add(session)
    rounds = 25
    barrier = threading.Barrier(2, timeout=10)
    calls = {"a": 0, "b": 0}
    errors: list[BaseException] = []

    def worker(name: str) -> None:
        store = RedisSessionStore(connect())

        def append(i: int) -> None:
            def change(current: Session) -> Session:
                calls[name] += 1
                if calls[name] == 1:
                    barrier.wait()
                vm = VmView(name=f"{name}{i}", hostname=f"{name}{i}")
                return current.with_vms([*current.vms, vm])

            store.update(session.id, change)

        try:
            for i in range(rounds):
                append(i)
        except BaseException as exc:  # surfaced below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(name,)) for name in calls]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)

    assert not any(t.is_alive() for t in threads)
    assert errors == []
    names = [vm.name for vm in RedisSessionStore(connect()).require(session.id).vms]
    assert sorted(names) == sorted(f"{n}{i}" for n in "ab" for i in range(rounds))
    # Each thread's own appends land in its order.
    for name in calls:
        assert [n for n in names if n.startswith(name)] == [f"{name}{i}" for i in range(rounds)]
    assert sum(calls.values()) > 2 * rounds  # at least one conflict was retried


def test_concurrent_transitions_have_one_winner(connect: Callable[[], redis.Redis]) -> None:
    """Reaper and API race to end a session: exactly one moves it, the other sees it moved."""
    session = new_session(state=R)
    RedisSessionStore(connect()).add(session)
    barrier = threading.Barrier(2, timeout=10)
    moved: list[str] = []
    errors: list[BaseException] = []

    def worker(reason: str) -> None:
        store = RedisSessionStore(connect())
        first = [True]

        def change(current: Session) -> Session:
            if first:
                first.clear()
                barrier.wait()
            if current.state is not R:
                return current
            return current.transition(T, at=NOW, reason=reason)

        try:
            if store.update(session.id, change).reason == reason:
                moved.append(reason)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(r,)) for r in ("deleted", "idle timeout")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)

    assert errors == []
    assert len(moved) == 1
    final = RedisSessionStore(connect()).require(session.id)
    assert final.state is T
    assert final.reason == moved[0]
    assert [t.state for t in final.history] == [P, R, T]
