"""Tasks that failed for good, kept in Redis for operators to see, requeue or purge.

Celery on Redis has no dead-letter queue: a task that gives up leaves a log line and nothing
else. Here every task that ends in an exception (its retry budget spent, or a permanent
error) is recorded: task, payload, error, traceback, attempts, first and last failure, and
the session, environment or region it concerns. The record's id is derived from the task and
its payload, so the same work failing again (after a requeue, or a redelivery) updates its
record, history kept, instead of adding a second one. A requeue records who asked and when,
and is idempotent: a record already requeued and not failed since is not queued again. A
requeued task that then succeeds marks its record resolved.

Records expire after the retention time, and at most ``max_records`` are kept (the oldest go
first), so a failure storm cannot grow Redis without bound.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, cast

import redis

from shared.metrics.series import series

# One hash tag for every record and the index: an update writes both in one transaction, and
# the index orders all records (operators page through them), so the set is global by nature.
# Failures for good are few and capped (``max_records``): one hash slot holds them easily.
PREFIX: Final = "labvirt:dead:{records}"
INDEX_KEY: Final = f"{PREFIX}:index"
# The records waiting for an operator (status failed), scored by when they expire: counting
# them is one ZCOUNT, and a record that expired stops counting by itself.
FAILED_KEY: Final = f"{PREFIX}:failed"
HISTORY_LIMIT: Final = 20
TRACEBACK_LIMIT: Final = 8000


class Status:
    FAILED: Final = "failed"  # failed for good, waiting for an operator
    REQUEUED: Final = "requeued"  # queued again, outcome not known yet
    RESOLVED: Final = "resolved"  # a requeue succeeded


def record_id(task: str, payload: Mapping[str, str]) -> str:
    digest = hashlib.sha256(json.dumps([task, dict(sorted(payload.items()))]).encode())
    return "f-" + digest.hexdigest()[:20]


def record_key(failure_id: str) -> str:
    return f"{PREFIX}:{failure_id}"


@dataclass
class DeadLetter:
    id: str
    task: str
    payload: dict[str, str]
    error: str
    error_type: str
    traceback: str
    status: str
    attempts: int
    first_failed_at: float
    last_failed_at: float
    concerns: dict[str, str] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    requeues: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DeadLetter:
        return cls(**{key: data[key] for key in cls.__dataclass_fields__ if key in data})


@dataclass(frozen=True)
class Filter:
    """Which records an operator means (every given field must match)."""

    task: str | None = None
    status: str | None = None
    session_id: str | None = None
    region: str | None = None

    def matches(self, letter: DeadLetter) -> bool:
        return (
            (self.task is None or letter.task == self.task)
            and (self.status is None or letter.status == self.status)
            and (self.session_id is None or letter.concerns.get("session_id") == self.session_id)
            and (self.region is None or letter.concerns.get("region") == self.region)
        )


class DeadLetters:
    def __init__(
        self,
        client: redis.Redis,
        *,
        retention_seconds: float = 7 * 24 * 3600,
        max_records: int = 10_000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._redis = client
        self._retention = retention_seconds
        self._max = max_records
        self._clock = clock

    def record(
        self,
        *,
        task: str,
        payload: Mapping[str, str],
        task_id: str | None,
        error: BaseException,
        traceback: str,
        concerns: Mapping[str, str] | None = None,
    ) -> DeadLetter:
        """Record a failure for good: a new record, or the next attempt of an existing one."""
        failure_id = record_id(task, payload)
        now = self._clock()
        attempt = {"at": now, "error": str(error), "type": type(error).__name__, "task_id": task_id}

        def change(current: DeadLetter | None) -> DeadLetter:
            if current is None:
                return DeadLetter(
                    id=failure_id,
                    task=task,
                    payload=dict(payload),
                    error=str(error),
                    error_type=type(error).__name__,
                    traceback=traceback[-TRACEBACK_LIMIT:],
                    status=Status.FAILED,
                    attempts=1,
                    first_failed_at=now,
                    last_failed_at=now,
                    concerns={**payload, **(concerns or {})},
                    history=[attempt],
                )
            current.error, current.error_type = str(error), type(error).__name__
            current.traceback = traceback[-TRACEBACK_LIMIT:]
            current.status = Status.FAILED
            current.attempts += 1
            current.last_failed_at = now
            current.concerns.update(concerns or {})
            current.history = [*current.history, attempt][-HISTORY_LIMIT:]
            return current

        letter: DeadLetter = self._update(failure_id, change)
        self._trim()
        series().dead_letters_recorded.labels(task=task).inc()
        return letter

    def resolved(self, task: str, payload: Mapping[str, str]) -> bool:
        """A task succeeded: if it was a requeued failure, its record says so now."""
        failure_id = record_id(task, payload)
        if not self._redis.exists(record_key(failure_id)):
            return False
        now = self._clock()
        changed: list[bool] = []

        def change(current: DeadLetter | None) -> DeadLetter | None:
            changed.clear()
            if current is None or current.status != Status.REQUEUED:
                return current
            current.status = Status.RESOLVED
            current.history = [*current.history, {"at": now, "resolved": True}][-HISTORY_LIMIT:]
            changed.append(True)
            return current

        self._update(failure_id, change)
        return bool(changed)

    def requeue(
        self, failure_id: str, *, by: str, enqueue: Callable[[str, Mapping[str, str]], None]
    ) -> tuple[DeadLetter | None, bool]:
        """Queue the task again unless it already is; (record, whether it was queued now)."""
        now = self._clock()
        queued: list[bool] = []

        def change(current: DeadLetter | None) -> DeadLetter | None:
            queued.clear()
            if current is None or current.status == Status.REQUEUED:
                return current
            current.status = Status.REQUEUED
            current.requeues = [*current.requeues, {"at": now, "by": by}][-HISTORY_LIMIT:]
            queued.append(True)
            return current

        letter = self._update(failure_id, change)
        if letter is not None and queued:
            enqueue(letter.task, letter.payload)
        return letter, bool(queued)

    def get(self, failure_id: str) -> DeadLetter | None:
        raw = self._redis.get(record_key(failure_id))
        return None if raw is None else DeadLetter.from_dict(json.loads(raw))

    def purge(self, failure_id: str) -> bool:
        pipe = self._redis.pipeline()
        pipe.delete(record_key(failure_id))
        pipe.zrem(INDEX_KEY, failure_id)
        pipe.zrem(FAILED_KEY, failure_id)
        deleted, *_ = pipe.execute()
        return bool(deleted)

    def list(
        self, where: Filter = Filter(), *, limit: int = 50, before: float | None = None
    ) -> tuple[list[DeadLetter], float | None]:
        """Matching records, newest failure first, and the cursor for the next page."""
        found: list[DeadLetter] = []
        cursor: float | None = None
        for letter in self._newest_first(before):
            if not where.matches(letter):
                continue
            if len(found) == limit:
                cursor = found[-1].last_failed_at
                break
            found.append(letter)
        return found, cursor

    def count(self) -> int:
        return int(self._redis.zcard(INDEX_KEY))

    def failed_count(self) -> int:
        """Records failed and not requeued since: what waits for an operator."""
        return int(self._redis.zcount(FAILED_KEY, self._clock(), "+inf"))

    def _newest_first(self, before: float | None) -> Iterator[DeadLetter]:
        top: str | float = "+inf" if before is None else f"({before}"
        while True:
            ids = cast(
                list[Any],
                self._redis.zrevrangebyscore(INDEX_KEY, top, "-inf", start=0, num=200),
            )
            if not ids:
                return
            raws = cast(list[Any], self._redis.mget([record_key(_text(i)) for i in ids]))
            last = None
            for raw_id, raw in zip(ids, raws, strict=True):
                if raw is None:
                    self._redis.zrem(INDEX_KEY, _text(raw_id))  # expired: drop from the index
                    continue
                letter = DeadLetter.from_dict(json.loads(raw))
                last = letter.last_failed_at
                yield letter
            if last is None or len(ids) < 200:
                return
            top = f"({last}"

    def _update(
        self, failure_id: str, change: Callable[[DeadLetter | None], DeadLetter | None]
    ) -> Any:
        key = record_key(failure_id)

        def attempt(pipe: Any) -> DeadLetter | None:
            raw = pipe.get(key)
            current = None if raw is None else DeadLetter.from_dict(json.loads(raw))
            updated = change(current)
            pipe.multi()
            if updated is not None:
                pipe.set(key, json.dumps(updated.to_dict()), ex=int(self._retention))
                pipe.zadd(INDEX_KEY, {failure_id: updated.last_failed_at})
                if updated.status == Status.FAILED:
                    pipe.zadd(FAILED_KEY, {failure_id: self._clock() + int(self._retention)})
                else:
                    pipe.zrem(FAILED_KEY, failure_id)
            return updated

        return self._redis.transaction(attempt, key, value_from_callable=True)  # type: ignore[arg-type]

    def _trim(self) -> None:
        excess = self.count() - self._max
        if excess > 0:
            oldest = cast(list[Any], self._redis.zrange(INDEX_KEY, 0, excess - 1))
            pipe = self._redis.pipeline()
            for raw_id in oldest:
                pipe.delete(record_key(_text(raw_id)))
                pipe.zrem(INDEX_KEY, _text(raw_id))
                pipe.zrem(FAILED_KEY, _text(raw_id))
            pipe.execute()
        # Expired records: their index entries go as listings meet them, these go here.
        self._redis.zremrangebyscore(FAILED_KEY, "-inf", self._clock())


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
