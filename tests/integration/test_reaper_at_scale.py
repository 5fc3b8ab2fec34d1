"""1,000 sessions expiring at once, three reapers ticking together against a real Redis.

Each reaper is a thread with its own connection running the real tick (``SessionLife.reap``, as
the ``labvirt.reap`` task does), which queues the teardowns it won on a recording Celery port; the
teardowns sent are counted per session. All 1,000 must be asked to go within two ticks, each
exactly once.
"""

from __future__ import annotations

import random
import threading
from collections import Counter
from collections.abc import Iterator

import pytest
import redis

from shared.adapters.session_events import SessionEvents
from shared.adapters.session_store import RedisSessionStore
from shared.config import Settings
from shared.domain.sessions import SessionState, open_session
from shared.jobs import TEARDOWN, TEARDOWN_QUEUE, TaskQueue
from shared.session_life import SessionLife
from tests.conftest import claim_redis_database
from tests.doubles import RecordingCelery

EXPIRING = 1000
LIVE = 200
REAPERS = 3
NOW = 1_700_000_000.0
BATCH = Settings().reaper_batch  # the production default: 500 per deadline kind per tick
INTERVAL = Settings().reaper_interval_seconds


@pytest.fixture
def redis_db() -> Iterator[str]:
    with claim_redis_database() as url:
        yield url


def seed(store: RedisSessionStore) -> list[str]:
    expiring = []
    for i in range(EXPIRING + LIVE):
        lifetime = 100 if i < EXPIRING else 100_000
        session, _ = open_session(
            user=f"user{i}",
            template="ubuntu",
            region="local",
            max_lifetime_seconds=lifetime,
            idle_timeout_seconds=100_000,
            now=NOW,
        )
        store.add(session.mark_ready(vms=(), at=NOW))
        if i < EXPIRING:
            expiring.append(session.id)
    return expiring


def tick(url: str, now: float, enqueued: Counter[str], lock: threading.Lock) -> None:
    """Three reapers at once, each with its own connection."""
    barrier = threading.Barrier(REAPERS, timeout=30)
    errors: list[BaseException] = []

    def reaper(seed_: int) -> None:
        client = redis.Redis.from_url(url)
        celery = RecordingCelery()
        try:
            life = SessionLife(
                store=RedisSessionStore(client),
                events=SessionEvents(client),
                queue=TaskQueue(celery),  # type: ignore[arg-type]
                clock=lambda: now,
            )
            barrier.wait()
            won = life.reap(batch=BATCH, rng=random.Random(seed_))
            sent = [(task.name, task.queue) for task in celery.sent]
            assert sent == [(TEARDOWN, TEARDOWN_QUEUE)] * len(won.teardowns)
            teardowns = [task.payload["session_id"] for task in celery.sent]
            assert teardowns == won.teardowns
            with lock:
                enqueued.update(teardowns)
        except BaseException as exc:
            errors.append(exc)
        finally:
            client.close()

    threads = [threading.Thread(target=reaper, args=(n,)) for n in range(REAPERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []


def test_a_thousand_sessions_expiring_at_once_are_torn_down_once_within_two_ticks(
    redis_db: str,
) -> None:
    store = RedisSessionStore(redis.Redis.from_url(redis_db))
    expiring = seed(store)
    location = redis_db
    enqueued: Counter[str] = Counter()
    lock = threading.Lock()

    tick(location, NOW + 100, enqueued, lock)
    tick(location, NOW + 100 + INTERVAL, enqueued, lock)

    assert set(enqueued) == set(expiring)  # every one of them within two ticks...
    assert set(enqueued.values()) == {1}  # ...exactly once
    tick(location, NOW + 100 + 2 * INTERVAL, enqueued, lock)
    assert set(enqueued.values()) == {1}  # and a later tick asks for no teardown again
    assert store.count_deadlines("lifetime") == LIVE
    states = Counter(s.state for s in store.get_many(expiring).values())
    assert states == {SessionState.TERMINATING: EXPIRING}
