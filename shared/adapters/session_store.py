"""Sessions in Redis: one JSON document per session, deadlines in sorted sets.

Updates are optimistic (WATCH/MULTI): a function maps the current session to the next one and
is retried when another process changed the session in between, so concurrent API requests,
workers and reapers never lose each other's writes. The same MULTI re-indexes the session's
deadlines (``shared.domain.lifecycle.deadlines``) and appends the progress event of a state
change to the session's stream: a document, its deadlines and its event log never disagree, and
a process that dies mid-update leaves all three as they were. Every key that MULTI names is in
the session's hash slot (``session_indexes``), so it runs on a Redis Cluster too.

An ended or failed session leaves nothing behind for long: the transaction that makes it final
drops it from every live index and gives its document and its event stream the ended retention
(``LABVIRT_ENDED_RETENTION_SECONDS``) as TTL, and so does the record of the warm environment it
claimed, right after.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, cast

import redis
import structlog

from shared.adapters import session_events
from shared.adapters.connections import disconnected_key
from shared.adapters.guarded_writes import GUARDED_WRITE, WriteRecorder
from shared.adapters.hash_tags import session_tag
from shared.adapters.pool_records import environment_key
from shared.adapters.script_batches import ScriptBatch
from shared.adapters.session_indexes import (
    LiveCount,
    SessionIndexes,
    deadline_key,
    region_booting_key,
    region_key,
    region_template_key,
    session_key,
    user_key,
)
from shared.adapters.user_locks import HeldLock, ReadAlong, UserBusy, UserLocks
from shared.domain.lifecycle import (
    DEADLINE_KINDS,
    DeadlineKind,
    DeadlinePolicy,
    ProgressEvent,
    deadlines,
    transition_event,
)
from shared.domain.pools.config import PoolKey
from shared.domain.sessions import Session, SessionId, SessionState
from shared.metrics.sessions import record_transition

log = structlog.get_logger(__name__)

PREFIX = "labvirt"
# The default of LABVIRT_ENDED_RETENTION_SECONDS: long enough for the learner's page to read
# how its session ended, short enough that a busy day's ended sessions do not fill Redis.
FINISHED_RETENTION_SECONDS = 3600
# How long a new session may wait for its replica before the create answers anyway.
REPLICA_WAIT_MS = 1000


class SessionNotFound(LookupError):
    pass


@dataclass(frozen=True)
class HeldUser:
    """Inside the user's lock: the user's sessions and the reads asked for ``along``, from the
    round trip that took it, and the batch its release sends (``user_locks.HeldLock``)."""

    lock: HeldLock
    sessions: list[Session] = field(default_factory=list)

    @property
    def read(self) -> Mapping[str, Any]:
        return self.lock.read


class RedisSessionStore:
    def __init__(
        self,
        client: redis.Redis,
        *,
        policy: DeadlinePolicy | None = None,
        replicas_to_wait_for: int = 0,
        ended_retention_seconds: int = FINISHED_RETENTION_SECONDS,
        scripted: bool = False,
    ) -> None:
        """``replicas_to_wait_for``: with replicas (Sentinel), a new session is on that many
        of them before ``add`` returns, so a failover right after cannot lose a session the
        frontend was already told about (replication is otherwise asynchronous).

        ``ended_retention_seconds``: how long what an ended or failed session wrote stays.

        ``scripted``: Redis runs Lua (a real server): a new session can be stored by a script
        in the round trip that releases the user's lock, which a script releases (fakeredis,
        in tests, runs none)."""
        self._redis = client
        self._policy = policy or DeadlinePolicy()
        self._replicas = replicas_to_wait_for
        self._ended_retention = ended_retention_seconds
        self._indexes = SessionIndexes(client)
        self._locks = UserLocks(client, scripted=scripted)

    @property
    def policy(self) -> DeadlinePolicy:
        return self._policy

    @property
    def client(self) -> redis.Redis:
        return self._redis

    def add(self, session: Session, *, held: HeldUser | None = None) -> None:
        """Store a new session; its first progress event (``queued``, or ``ready`` if warm).

        ``held``: its user's lock. Where its release can carry them (``held.lock.batch``),
        the same writes go in the release's round trip, as one script that makes them only if
        the id is new (``guarded_writes``); not when replicas must have a new session before
        the answer (``replicas_to_wait_for``)."""
        if held is not None and held.lock.batch is not None and not self._replicas:
            self._queue_insert(held.lock.batch, session)
            return
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

    def _queue_insert(self, batch: ScriptBatch, session: Session) -> None:
        key = session_key(session.id)
        writes = WriteRecorder(guard=key)
        writes.set(key, _encode(session))
        event = transition_event(None, session)
        if event is not None:  # a new session always has one: queued, or ready if warm
            session_events.append(writes, session.id, event)
        self._index(writes, session)

        def stored(answer: Any) -> None:
            if not int(answer):
                raise ValueError(f"session {session.id} already exists")
            _log_transition(None, session)

        batch.script(GUARDED_WRITE, keys=writes.keys, args=writes.args, check=stored)
        session_events.notify(batch.pipe, session.id)  # after it: a notice for a stored session

    def _insert(self, session: Session, *, announce: bool) -> bool:
        key = session_key(session.id)
        event = transition_event(None, session) if announce else None

        def attempt(pipe: Any) -> bool:
            # Check before queueing anything: a refused add must leave the existing session's
            # deadlines and user index alone (SET NX in the same MULTI would not).
            if pipe.exists(key):
                pipe.multi()
                return False
            pipe.multi()
            pipe.set(key, _encode(session))
            if event is not None:
                session_events.append(pipe, session.id, event)
            self._index(pipe, session)  # after the append: a final session's TTLs win
            return True

        stored = bool(self._redis.transaction(attempt, key, value_from_callable=True))  # type: ignore[arg-type]
        if stored:
            self._after_commit(session, notify=event is not None)
        return stored

    def get(self, session_id: str) -> Session | None:
        raw = self._redis.get(session_key(session_id))
        return None if raw is None else _decode(raw)

    def get_many(self, session_ids: list[str]) -> dict[str, Session]:
        """The documents that exist among ``session_ids`` (one round trip)."""
        found = self._indexes.documents(session_ids)
        return {i: _decode(found[i]) for i in session_ids if i in found}

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
        appended: list[ProgressEvent] = []

        def attempt(pipe: Any) -> Session:
            committed.clear()
            appended.clear()
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
            # ``announce``'s event first: it tells what led to the state change, if any.
            events = [announce(current, updated) if announce is not None else None]
            events.append(transition_event(current, updated))
            for event in events:
                if event is not None:
                    session_events.append(pipe, updated.id, event)
                    appended.append(event)
            self._index(pipe, updated)  # after the appends: a final session's TTLs win
            committed.append((current, updated))
            return updated

        result = self._redis.transaction(attempt, key, value_from_callable=True)  # type: ignore[arg-type]
        if committed:
            self._after_commit(committed[0][1], notify=bool(appended))
        if committed and committed[0][0].state is not committed[0][1].state:
            _log_transition(*committed[0])
        return cast(Session, result)

    def user_sessions(self, user: str) -> list[Session]:
        return list(self.get_many(self._indexes.user_ids(user)).values())

    def region_sessions(self, region: str) -> dict[str, Session]:
        """Every session not yet final in ``region``, by id; forgets ids whose document is gone."""
        ids = self._indexes.region_ids(region)
        found = self.get_many(ids)
        missing = [i for i in ids if i not in found]
        if missing:
            self._indexes.forget_region_ids(region, missing)
        return found

    def live_sessions(self) -> list[Session]:
        """Every live session of every region (operators' listings, not hot paths)."""
        return [s for s in self.get_many(self._indexes.live_ids()).values() if s.is_live]

    def finished_sessions(self, *, limit: int) -> list[Session]:
        """Up to ``limit`` sessions still kept after their end (scanned, for operators)."""
        found: list[Session] = []
        batch: list[str] = []
        for key in self._redis.scan_iter(match=f"{PREFIX}:session:*", count=1000):
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
        return self._indexes.live_counts(regions, templates)

    def due(self, kind: str, now: float, limit: int) -> list[SessionId]:
        """Sessions whose ``kind`` deadline has passed, oldest first, at most ``limit``."""
        return self._indexes.due(kind, now, limit)

    def forget_deadline(self, kind: str, session_id: str) -> None:
        """Drop a deadline whose session document is gone (nothing is left to act on)."""
        self._indexes.forget_deadline(kind, session_id)

    def count_deadlines(self, kind: str) -> int:
        return self._indexes.count_deadlines(kind)

    def deadline(self, kind: str, session_id: str) -> float | None:
        return self._indexes.deadline(kind, session_id)

    @contextmanager
    def user_lock(
        self,
        user: str,
        *,
        ttl_seconds: float = 10.0,
        wait_seconds: float = 5.0,
        along: Mapping[str, ReadAlong] | None = None,
        once: ReadAlong | None = None,
    ) -> Iterator[HeldUser]:
        """Hold the user's lock (``user_locks``): one create at a time per user, across API
        processes. Inside, the user's sessions as they were when it was taken, and what the
        reads ``along`` found in the same round trip (``once``: sent on the first attempt
        only, and its reader may refuse the hold)."""
        hold = self._locks.hold(
            user, ttl_seconds=ttl_seconds, wait_seconds=wait_seconds, along=along, once=once
        )
        with hold as lock:
            sessions = self.get_many(lock.session_ids)
            yield HeldUser(lock, [sessions[i] for i in lock.session_ids if i in sessions])

    def _index(self, pipe: Any, session: Session) -> None:
        """Queue the session's index entries: all in its shard, the slot of its document."""
        tag = session_tag(session.id)
        due = deadlines(session, self._policy)
        for kind in DEADLINE_KINDS:
            score = due.get(kind)
            if score is None:
                pipe.zrem(deadline_key(kind, tag), session.id)
            else:
                pipe.zadd(deadline_key(kind, tag), {session.id: score})
        booting = pipe.sadd if session.state is SessionState.PROVISIONING else pipe.srem
        booting(region_booting_key(session.region, tag), session.id)
        if session.is_final:
            pipe.srem(user_key(session.user, tag), session.id)
            pipe.srem(region_key(session.region, tag), session.id)
            pipe.srem(region_template_key(session.region, session.template, tag), session.id)
            # No reaper needs to close it as disconnected any more.
            pipe.zrem(disconnected_key(tag), session.id)
            retention = self._ended_retention
            pipe.expire(session_key(session.id), retention)
            pipe.expire(session_events.events_key(session.id), retention)
            return
        pipe.sadd(user_key(session.user, tag), session.id)
        pipe.sadd(region_key(session.region, tag), session.id)
        pipe.sadd(region_template_key(session.region, session.template, tag), session.id)

    def _after_commit(self, session: Session, *, notify: bool) -> None:
        """What stays out of the session's MULTI, which keeps to the session's hash slot: the
        gateways' wake-up notice (``session_events.notify``), and the ended retention for the
        pool's record of the environment an ended warm session claimed (the record is in its
        pool's slot). Should this step be lost, streams read anyway and the record's own TTL
        still ends it."""
        if notify:
            session_events.notify(self._redis, session.id)
        if session.is_final and session.warm:
            pool = PoolKey(session.region, session.template)
            self._redis.expire(environment_key(pool, session.environment_id), self._ended_retention)


def _log_transition(before: Session | None, after: Session) -> None:
    record_transition(before, after)
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
    "session_key",
]
