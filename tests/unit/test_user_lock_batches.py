"""The user's lock on a Redis that runs Lua: what its taking reads and its release writes.

A create takes the user's lock reading the user's sessions and more in the same round trip,
and stores the new session in the round trip that releases it (``user_locks``,
``guarded_writes``). Those writes must be the very ones ``add`` makes on its own, only ever for
a new id; a refusal read beside the lock must let go of it. Real Redis: the point is the Lua.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from shared.adapters.hash_tags import SESSION_TAGS, session_tag
from shared.adapters.session_indexes import deadline_key, user_key
from shared.adapters.session_store import RedisSessionStore, UserBusy
from shared.adapters.user_locks import user_lock_key
from shared.domain.sessions import EnvironmentId, Session, SessionState, VmView, open_session

NOW = 1_700_000_000.0
VMS = (VmView(name="ubuntu", hostname="ubuntu", ip="10.244.1.2", phase="Running", ready=True),)


def new_session(user: str = "alice", *, warm: bool = False) -> Session:
    session, _ = open_session(
        user=user,
        template="ubuntu",
        region="local",
        max_lifetime_seconds=7200,
        idle_timeout_seconds=300,
        now=NOW,
    )
    if warm:
        session = session.warm_start(environment_id=EnvironmentId("abc123"), vms=VMS, at=NOW)
    return session


def footprint(client: redis.Redis) -> dict[str, Any]:
    """Every key with its type, content and whether it expires (stream entry ids left out)."""
    found: dict[str, Any] = {}
    for raw in client.scan_iter(count=1000):
        key = raw.decode()
        kind = client.type(key).decode()
        if kind == "string":
            value: Any = client.get(key)
        elif kind == "set":
            value = sorted(client.smembers(key))
        elif kind == "zset":
            value = client.zrange(key, 0, -1, withscores=True)
        elif kind == "stream":
            value = [fields for _, fields in client.xrange(key)]
        else:
            value = kind
        found[key] = (kind, value, client.ttl(key) > 0)
    return found


@pytest.fixture
def client(connect: Callable[[], redis.Redis]) -> redis.Redis:
    return connect()


@pytest.fixture
def store(client: redis.Redis) -> RedisSessionStore:
    return RedisSessionStore(client, scripted=True)


@pytest.mark.parametrize("warm", [False, True])
def test_a_session_stored_with_the_release_is_what_add_stores(
    client: redis.Redis, store: RedisSessionStore, warm: bool
) -> None:
    session = new_session(warm=warm)
    RedisSessionStore(client).add(session)  # on its own: WATCH, EXISTS, MULTI
    alone = footprint(client)
    client.flushdb()

    with store.user_lock("alice") as held:
        assert held.lock.batch is not None
        store.add(session, held=held)
        assert store.get(session.id) is None  # not yet: it goes with the release
    with_release = footprint(client)

    assert with_release == alone
    assert store.get(session.id) == session
    assert client.exists(user_lock_key("alice")) == 0


def test_a_duplicate_stored_with_the_release_leaves_the_first_untouched(
    client: redis.Redis, store: RedisSessionStore
) -> None:
    first = new_session()
    store.add(first)
    before = footprint(client)
    impostor = Session.from_dict({**first.to_dict(), "user": "mallory", "expires_at": NOW + 1})

    with pytest.raises(ValueError, match="already exists"), store.user_lock("mallory") as held:
        store.add(impostor, held=held)

    assert footprint(client) == before  # the lock is gone too: it was taken after ``before``
    assert store.get(first.id) == first
    score = client.zscore(deadline_key("lifetime", session_tag(first.id)), first.id)
    assert score == first.expires_at
    assert not any(client.exists(user_key("mallory", tag)) for tag in SESSION_TAGS)


def test_what_was_queued_for_the_release_is_dropped_when_the_create_fails(
    client: redis.Redis, store: RedisSessionStore
) -> None:
    session = new_session()

    def create_that_fails() -> None:
        with store.user_lock("alice") as held:
            store.add(session, held=held)
            raise RuntimeError("the create failed after queueing the session")

    with pytest.raises(RuntimeError, match="failed after queueing"):
        create_that_fails()

    assert store.get(session.id) is None
    assert client.exists(user_lock_key("alice")) == 0


def test_taking_the_lock_reads_the_users_sessions_and_what_else_was_asked(
    client: redis.Redis, store: RedisSessionStore
) -> None:
    mine = new_session()
    store.add(mine)
    store.add(new_session("bob"))
    client.set("probe", "42")

    def probe(pipe: Any) -> Callable[[Iterator[Any]], int]:
        pipe.get("probe")
        return lambda answers: int(next(answers))

    with store.user_lock("alice", along={"probe": probe}) as held:
        assert held.sessions == [mine]
        assert held.read == {"probe": 42}
        assert client.get(user_lock_key("alice")) is not None


def test_a_refusal_sent_once_beside_the_lock_lets_go_of_it(
    client: redis.Redis, store: RedisSessionStore
) -> None:
    sent: list[str] = []

    def refusing(pipe: Any) -> Callable[[Iterator[Any]], None]:
        pipe.incr("counted")
        sent.append("counted")

        def read(answers: Iterator[Any]) -> None:
            raise PermissionError(f"refused after {next(answers)} count")

        return read

    with pytest.raises(PermissionError), store.user_lock("alice", once=refusing):
        pytest.fail("a refused hold runs nothing inside")

    assert sent == ["counted"]
    assert client.get("counted") == b"1"
    assert client.exists(user_lock_key("alice")) == 0


def test_what_is_sent_once_is_not_sent_again_while_the_lock_is_busy(
    client: redis.Redis, store: RedisSessionStore
) -> None:
    client.set(user_lock_key("alice"), "someone else", px=150)

    def counting(pipe: Any) -> Callable[[Iterator[Any]], int]:
        pipe.incr("counted")
        return lambda answers: int(next(answers))

    with store.user_lock("alice", once=counting, wait_seconds=5):
        assert client.get("counted") == b"1"


def test_the_scripted_release_frees_the_lock_for_the_next_holder_only(
    store: RedisSessionStore, connect: Callable[[], redis.Redis]
) -> None:
    inside = threading.Event()
    release = threading.Event()

    def first() -> None:
        with store.user_lock("alice"):
            inside.set()
            release.wait(5)

    thread = threading.Thread(target=first)
    thread.start()
    inside.wait(5)
    other = RedisSessionStore(connect(), scripted=True)
    with pytest.raises(UserBusy), other.user_lock("alice", wait_seconds=0.05):
        pass
    release.set()
    thread.join(5)
    with other.user_lock("alice", wait_seconds=1) as held:
        assert held.sessions == []


def test_a_ready_warm_session_written_with_the_release_is_indexed_as_ready(
    client: redis.Redis, store: RedisSessionStore
) -> None:
    warm = new_session(warm=True)
    assert warm.state is SessionState.READY
    with store.user_lock("alice") as held:
        store.add(warm, held=held)
    with store.user_lock("alice") as held:
        assert held.sessions == [warm]
