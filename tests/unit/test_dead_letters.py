"""Tasks that failed for good, on the suite's real Redis: recorded once per task and payload,
history kept, requeued idempotently with who and when, resolved by a later success, bounded
in number and time; and the task wrapper records what escapes a task."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from celery import Celery

from shared import jobs
from shared.adapters.dead_letters import DeadLetters, Filter, Status, record_id, record_key
from shared.jobs import PROVISION, TEARDOWN, labvirt_task

NOW = 1_700_000_000.0


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    connection = redis.Redis.from_url(redis_url)
    connection.flushdb()
    yield connection
    connection.flushdb()
    connection.close()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def letters(client: redis.Redis, clock: Clock) -> DeadLetters:
    return DeadLetters(client, retention_seconds=3600, max_records=5, clock=clock)


def fail(letters: DeadLetters, session: str = "s-1", error: str = "boom") -> Any:
    return letters.record(
        task=PROVISION,
        payload={"session_id": session},
        task_id="t-1",
        error=RuntimeError(error),
        traceback="Traceback: boom",
        concerns={"session_id": session},
    )


def test_the_same_work_failing_again_updates_one_record(letters: DeadLetters, clock: Clock) -> None:
    first = fail(letters, error="first")
    clock.now += 10
    again = fail(letters, error="second")
    assert again.id == first.id == record_id(PROVISION, {"session_id": "s-1"})
    assert (again.attempts, again.first_failed_at, again.last_failed_at) == (2, NOW, NOW + 10)
    assert [h["error"] for h in again.history] == ["first", "second"]
    assert letters.count() == 1


def test_a_requeue_is_recorded_and_idempotent(letters: DeadLetters, clock: Clock) -> None:
    letter = fail(letters)
    sent: list[tuple[str, dict[str, str]]] = []

    def enqueue(name: str, payload: Any) -> None:
        sent.append((name, dict(payload)))

    clock.now += 5
    updated, queued = letters.requeue(letter.id, by="ops (admin ab12)", enqueue=enqueue)
    assert queued
    assert updated is not None
    assert updated.status == Status.REQUEUED
    assert updated.requeues == [{"at": NOW + 5, "by": "ops (admin ab12)"}]
    _, queued_again = letters.requeue(letter.id, by="someone else", enqueue=enqueue)
    assert not queued_again
    assert sent == [(PROVISION, {"session_id": "s-1"})]


def test_a_requeued_task_that_fails_again_keeps_its_history(letters: DeadLetters) -> None:
    letter = fail(letters, error="first")
    letters.requeue(letter.id, by="ops", enqueue=lambda *_: None)
    again = fail(letters, error="second")
    assert again.status == Status.FAILED
    assert again.attempts == 2
    assert len(again.requeues) == 1
    assert [h["error"] for h in again.history] == ["first", "second"]


def test_a_requeued_task_that_succeeds_is_resolved(letters: DeadLetters) -> None:
    letter = fail(letters)
    assert not letters.resolved(PROVISION, {"session_id": "s-1"})  # not requeued: unchanged
    letters.requeue(letter.id, by="ops", enqueue=lambda *_: None)
    assert letters.resolved(PROVISION, {"session_id": "s-1"})
    stored = letters.get(letter.id)
    assert stored is not None
    assert stored.status == Status.RESOLVED


def test_records_are_bounded_and_expire(
    letters: DeadLetters, client: redis.Redis, clock: Clock
) -> None:
    for i in range(8):
        clock.now += 1
        fail(letters, session=f"s-{i}")
    assert letters.count() == 5
    kept = {letter.concerns["session_id"] for letter in letters.list(limit=10)[0]}
    assert kept == {f"s-{i}" for i in range(3, 8)}  # the oldest went first
    key = record_key(record_id(PROVISION, {"session_id": "s-7"}))
    assert 0 < client.ttl(key) <= 3600


def test_listing_filters_and_pages_newest_first(letters: DeadLetters, clock: Clock) -> None:
    for i in range(4):
        clock.now += 1
        fail(letters, session=f"s-{i}")
    letters.record(
        task=TEARDOWN,
        payload={"session_id": "s-9"},
        task_id=None,
        error=OSError("gone"),
        traceback="",
    )
    page, cursor = letters.list(Filter(task=PROVISION), limit=3)
    assert [letter.concerns["session_id"] for letter in page] == ["s-3", "s-2", "s-1"]
    rest, end = letters.list(Filter(task=PROVISION), limit=3, before=cursor)
    assert [letter.concerns["session_id"] for letter in rest] == ["s-0"]
    assert end is None
    assert [letter.task for letter in letters.list(Filter(session_id="s-9"))[0]] == [TEARDOWN]


def test_the_task_wrapper_records_what_escapes_a_task(
    client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = Celery("dead-letter-test", broker="memory://", set_as_current=False)
    # Declared on this app alone, which is closed after: a shared task would stay registered
    # for every app made later in the run, in the real teardown's place.
    monkeypatch.setattr(jobs, "shared_task", functools.partial(app.task, shared=False))
    try:
        _record_what_escapes(app, client)
    finally:
        app.close()


def _record_what_escapes(app: Celery, client: redis.Redis) -> None:
    store = DeadLetters(client)
    app.labvirt_dead_letters = store  # what attach_runtime sets on a worker's app
    calls: list[str] = []

    @labvirt_task("labvirt.teardown")
    def failing(_task: Any, payload: dict[str, str]) -> dict[str, Any]:
        calls.append(payload["session_id"])
        raise ConnectionError("the cluster is gone")

    task = app.tasks["labvirt.teardown"]
    with pytest.raises(ConnectionError):
        task.apply(kwargs={"session_id": "s-42"}, throw=True)
    [letter] = store.list()[0]
    assert (letter.task, letter.payload, letter.status) == (
        "labvirt.teardown",
        {"session_id": "s-42"},
        Status.FAILED,
    )
    assert letter.error == "the cluster is gone"
    assert "ConnectionError" in letter.traceback
    assert calls == ["s-42"]
