"""Sessions in Redis: one JSON document per session, deadlines in sorted sets.

Updates are optimistic (WATCH/MULTI): a function maps the current session to the next one and
is retried when another process changed the session in between, so concurrent API requests,
workers and reapers never lose each other's writes. The same MULTI re-indexes the session's
deadlines (``shared.domain.lifecycle.deadlines``) and appends the progress event of a state
change to the session's stream: a document, its deadlines and its event log never disagree, and
a process that dies mid-update leaves all three as they were.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, cast

import redis
import structlog

from shared.adapters import session_events
from shared.domain.lifecycle import (
    DEADLINE_KINDS,
    DeadlineKind,
    DeadlinePolicy,
    ProgressEvent,
    deadlines,
    transition_event,
)
from shared.domain.sessions import Session, SessionId

log = structlog.get_logger(__name__)

PREFIX = "labvirt"
FINISHED_RETENTION_SECONDS = 24 * 3600
_MGET_CHUNK = 1000
# How long a new session may wait for its replica before the create answers anyway.
REPLICA_WAIT_MS = 1000


class SessionNotFound(LookupError):
    pass


class UserBusy(RuntimeError):
    """Another request holds this user's lock for longer than a request should wait."""


def session_key(session_id: str) -> str:
    return f"{PREFIX}:session:{session_id}"


def _deadline_key(kind: str) -> str:
    return f"{PREFIX}:deadline:{kind}"


def _user_key(user: str) -> str:
    return f"{PREFIX}:user:{user}"


def _region_key(region: str) -> str:
    return f"{PREFIX}:live:{region}"


def _region_template_key(region: str, template: str) -> str:
    """The live sessions of one template in one region: what a region's load is counted from."""
    return f"{PREFIX}:live-template:{region}:{template}"


def _user_lock_key(user: str) -> str:
    return f"{PREFIX}:user-lock:{user}"


@dataclass(frozen=True)
class LiveCount:
    """Sessions not yet final in one region: all of them, and those indexed by template."""

    total: int
    by_template: Mapping[str, int]

    @property
    def unindexed(self) -> int:
        """Sessions of no template asked about (stored before the per-template index, or of
        a template no longer configured)."""
        return max(0, self.total - sum(self.by_template.values()))


class RedisSessionStore:
    def __init__(
        self,
        client: redis.Redis,
        *,
        policy: DeadlinePolicy | None = None,
        replicas_to_wait_for: int = 0,
    ) -> None:
        """``replicas_to_wait_for``: with replicas (Sentinel), a new session is on that many
        of them before ``add`` returns, so a failover right after cannot lose a session the
        frontend was already told about (replication is otherwise asynchronous)."""
        self._redis = client
        self._policy = policy or DeadlinePolicy()
        self._replicas = replicas_to_wait_for

    @property
    def policy(self) -> DeadlinePolicy:
        return self._policy

    def add(self, session: Session) -> None:
        """Store a new session; its first progress event (``queued``, or ``ready`` if warm)."""
        if not self._insert(session, announce=True):
            raise ValueError(f"session {session.id} already exists")
        if self._replicas:
            acknowledged = int(self._redis.wait(self._replicas, REPLICA_WAIT_MS))
            if acknowledged < self._replicas:
                log.warning("session.not_replicated", session_id=session.id, replicas=acknowledged)
        _log_transition(None, session)

    def restore(self, session: Session) -> bool:
        """Store a session rebuilt from the cluster unless it exists; True if it was stored."""
        stored = self._insert(session, announce=False)
        if stored:
            log.info(
                "session.restored",
                session_id=session.id,
                template=session.template,
                state=session.state.value,
            )
        return stored

    def _insert(self, session: Session, *, announce: bool) -> bool:
        key = session_key(session.id)

        def attempt(pipe: Any) -> bool:
            # Check before queueing anything: a refused add must leave the existing session's
            # deadlines and user index alone (SET NX in the same MULTI would not).
            if pipe.exists(key):
                pipe.multi()
                return False
            pipe.multi()
            pipe.set(key, _encode(session))
            self._index(pipe, session)
            event = transition_event(None, session) if announce else None
            if event is not None:
                session_events.append(pipe, session.id, event)
            return True

        return bool(self._redis.transaction(attempt, key, value_from_callable=True))  # type: ignore[arg-type]

    def get(self, session_id: str) -> Session | None:
        raw = self._redis.get(session_key(session_id))
        return None if raw is None else _decode(raw)

    def get_many(self, session_ids: list[str]) -> dict[str, Session]:
        """The documents that exist among ``session_ids`` (one round trip per thousand)."""
        found: dict[str, Session] = {}
        for start in range(0, len(session_ids), _MGET_CHUNK):
            chunk = session_ids[start : start + _MGET_CHUNK]
            raws = cast(list[Any], self._redis.mget([session_key(i) for i in chunk]))
            for session_id, raw in zip(chunk, raws, strict=True):
                if raw is not None:
                    found[session_id] = _decode(raw)
        return found

    def require(self, session_id: str) -> Session:
        session = self.get(session_id)
        if session is None:
            raise SessionNotFound(session_id)
        return session

    def update(
        self,
        session_id: str,
        change: Callable[[Session], Session],
        *,
        reindex: bool = False,
        announce: Callable[[Session, Session], ProgressEvent | None] | None = None,
    ) -> Session:
        """Apply ``change`` atomically; exceptions from ``change`` abort and propagate.

        A change that returns the session it was given writes nothing, unless ``reindex``
        asks for the deadlines to be indexed again (the reaper's way to drop stale ones).
        ``announce`` may add a progress event of its own to the same transaction.
        """
        key = session_key(session_id)
        committed: list[tuple[Session, Session]] = []

        def attempt(pipe: Any) -> Session:
            committed.clear()
            raw = pipe.get(key)
            if raw is None:
                raise SessionNotFound(session_id)
            current = _decode(raw)
            updated = change(current)
            pipe.multi()
            if updated is current and not reindex:
                return current
            if updated is not current:
                pipe.set(key, _encode(updated))
            self._index(pipe, updated)
            # ``announce``'s event first: it tells what led to the state change, if any.
            events = [announce(current, updated) if announce is not None else None]
            events.append(transition_event(current, updated))
            for event in events:
                if event is not None:
                    session_events.append(pipe, updated.id, event)
            committed.append((current, updated))
            return updated

        result = self._redis.transaction(attempt, key, value_from_callable=True)  # type: ignore[arg-type]
        if committed and committed[0][0].state is not committed[0][1].state:
            _log_transition(*committed[0])
        return cast(Session, result)

    def user_sessions(self, user: str) -> list[Session]:
        ids = sorted(_text(i) for i in cast(set[Any], self._redis.smembers(_user_key(user))))
        return list(self.get_many(ids).values())

    def region_sessions(self, region: str) -> dict[str, Session]:
        """Every session not yet final in ``region``, by id; forgets ids whose document is gone."""
        ids = sorted(_text(i) for i in cast(set[Any], self._redis.smembers(_region_key(region))))
        found = self.get_many(ids)
        missing = [i for i in ids if i not in found]
        if missing:
            self._redis.srem(_region_key(region), *missing)
        return found

    def live_sessions(self) -> list[Session]:
        """Every live session of every region (operators' listings, not hot paths)."""
        ids: set[str] = set()
        for key in self._redis.scan_iter(match=_region_key("*"), count=1000):
            ids.update(_text(i) for i in cast(set[Any], self._redis.smembers(key)))
        return [s for s in self.get_many(sorted(ids)).values() if s.is_live]

    def finished_sessions(self, *, limit: int) -> list[Session]:
        """Up to ``limit`` sessions still kept after their end (scanned, for operators)."""
        found: list[Session] = []
        batch: list[str] = []
        for key in self._redis.scan_iter(match=session_key("*"), count=1000):
            batch.append(_text(key).rsplit(":", 1)[-1])
            if len(batch) >= 500:
                found += [s for s in self.get_many(batch).values() if s.is_final]
                batch = []
            if len(found) >= limit:
                break
        if batch:
            found += [s for s in self.get_many(batch).values() if s.is_final]
        return found[:limit]

    def live_counts(self, regions: Sequence[str], templates: Sequence[str]) -> dict[str, LiveCount]:
        """How many sessions not yet final each region holds, in all and per template (one
        round trip; the counts come from the indexes the session's own transactions keep)."""
        pipe = self._redis.pipeline(transaction=False)
        for region in regions:
            pipe.scard(_region_key(region))
            for template in templates:
                pipe.scard(_region_template_key(region, template))
        counts = iter(int(n) for n in pipe.execute())
        found: dict[str, LiveCount] = {}
        for region in regions:
            total = next(counts)
            found[region] = LiveCount(total, {t: next(counts) for t in templates})
        return found

    def due(self, kind: str, now: float, limit: int) -> list[SessionId]:
        """Sessions whose ``kind`` deadline has passed, oldest first, at most ``limit``."""
        ids = self._redis.zrangebyscore(_deadline_key(kind), "-inf", now, start=0, num=limit)
        return [SessionId(_text(i)) for i in cast(list[bytes], ids)]

    def forget_deadline(self, kind: str, session_id: str) -> None:
        """Drop a deadline whose session document is gone (nothing is left to act on)."""
        self._redis.zrem(_deadline_key(kind), session_id)

    def count_deadlines(self, kind: str) -> int:
        return int(self._redis.zcard(_deadline_key(kind)))

    def deadline(self, kind: str, session_id: str) -> float | None:
        score = self._redis.zscore(_deadline_key(kind), session_id)
        return None if score is None else float(score)

    @contextmanager
    def user_lock(
        self, user: str, *, ttl_seconds: float = 10.0, wait_seconds: float = 5.0
    ) -> Iterator[None]:
        """Hold the user's lock: one create at a time per user, across API processes.

        A plain ``SET NX PX`` with a random value; released only by its holder (compared under
        WATCH, no Lua needed), and expiring by itself if the holder dies.
        """
        key = _user_lock_key(user)
        token = secrets.token_hex(16)
        deadline = time.monotonic() + wait_seconds
        pause = 0.005
        while not self._redis.set(key, token, nx=True, px=int(ttl_seconds * 1000)):
            if time.monotonic() >= deadline:
                raise UserBusy(user)
            time.sleep(pause)
            pause = min(pause * 2, 0.05)
        try:
            yield
        finally:

            def release(pipe: Any) -> None:
                held = pipe.get(key)
                pipe.multi()
                if held is not None and _text(held) == token:
                    pipe.delete(key)

            self._redis.transaction(release, key)

    def _index(self, pipe: Any, session: Session) -> None:
        due = deadlines(session, self._policy)
        for kind in DEADLINE_KINDS:
            score = due.get(kind)
            if score is None:
                pipe.zrem(_deadline_key(kind), session.id)
            else:
                pipe.zadd(_deadline_key(kind), {session.id: score})
        if session.is_final:
            pipe.srem(_user_key(session.user), session.id)
            pipe.srem(_region_key(session.region), session.id)
            pipe.srem(_region_template_key(session.region, session.template), session.id)
            pipe.expire(session_key(session.id), FINISHED_RETENTION_SECONDS)
            return
        pipe.sadd(_user_key(session.user), session.id)
        pipe.sadd(_region_key(session.region), session.id)
        pipe.sadd(_region_template_key(session.region, session.template), session.id)


def _log_transition(before: Session | None, after: Session) -> None:
    last = after.history[-1] if after.history else None
    log.info(
        "session.transition",
        session_id=after.id,
        template=after.template,
        user=after.user,
        region=after.region,
        from_state=None if before is None else before.state.value,
        to_state=after.state.value,
        reason=last.reason if last is not None and last.state is after.state else None,
    )


def _encode(session: Session) -> str:
    return json.dumps(session.to_dict(), separators=(",", ":"))


def _decode(raw: bytes | str) -> Session:
    return Session.from_dict(json.loads(raw))


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


__all__ = [
    "DEADLINE_KINDS",
    "FINISHED_RETENTION_SECONDS",
    "DeadlineKind",
    "LiveCount",
    "RedisSessionStore",
    "SessionNotFound",
    "UserBusy",
]
