"""Sessions in Redis: one JSON document per session, deadlines in sorted sets.

Updates are optimistic (WATCH/MULTI): a function maps the current session to the next one and
is retried when another process changed the session in between, so concurrent API requests,
workers and reapers never lose each other's writes.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, cast

import redis

from shared.domain.sessions import Session, SessionId, SessionState

PREFIX = "labvirt"
FINISHED_RETENTION_SECONDS = 24 * 3600
DEADLINE_KINDS = ("lifetime", "idle")
CLOCKED_STATES = frozenset({SessionState.PROVISIONING, SessionState.READY})


class SessionNotFound(LookupError):
    pass


def _session_key(session_id: str) -> str:
    return f"{PREFIX}:session:{session_id}"


def _deadline_key(kind: str) -> str:
    return f"{PREFIX}:deadline:{kind}"


def _user_key(user: str) -> str:
    return f"{PREFIX}:user:{user}"


class RedisSessionStore:
    def __init__(self, client: redis.Redis) -> None:
        self._redis = client

    def add(self, session: Session) -> None:
        key = _session_key(session.id)

        def attempt(pipe: Any) -> None:
            # Check before queueing anything: a refused add must leave the existing session's
            # deadlines and user index alone (SET NX in the same MULTI would not).
            if pipe.exists(key):
                raise ValueError(f"session {session.id} already exists")
            pipe.multi()
            pipe.set(key, _encode(session))
            self._index(pipe, session)

        self._redis.transaction(attempt, key)

    def get(self, session_id: str) -> Session | None:
        raw = self._redis.get(_session_key(session_id))
        return None if raw is None else _decode(raw)

    def require(self, session_id: str) -> Session:
        session = self.get(session_id)
        if session is None:
            raise SessionNotFound(session_id)
        return session

    def update(self, session_id: str, change: Callable[[Session], Session]) -> Session:
        """Apply ``change`` atomically; exceptions from ``change`` abort and propagate."""
        key = _session_key(session_id)

        def attempt(pipe: Any) -> Session:
            raw = pipe.get(key)
            if raw is None:
                raise SessionNotFound(session_id)
            current = _decode(raw)
            updated = change(current)
            pipe.multi()
            if updated is current:
                return current
            pipe.set(key, _encode(updated))
            self._index(pipe, updated)
            return updated

        result = self._redis.transaction(attempt, key, value_from_callable=True)  # type: ignore[arg-type]
        return cast(Session, result)

    def user_sessions(self, user: str) -> list[Session]:
        ids = self._redis.smembers(_user_key(user))
        sessions = []
        for session_id in sorted(ids):
            session = self.get(_text(session_id))
            if session is not None:
                sessions.append(session)
        return sessions

    def due(self, kind: str, now: float, limit: int) -> list[SessionId]:
        """Sessions whose ``kind`` deadline has passed, oldest first, at most ``limit``."""
        ids = self._redis.zrangebyscore(_deadline_key(kind), "-inf", now, start=0, num=limit)
        return [SessionId(_text(i)) for i in cast(list[bytes], ids)]

    def take_due(self, kind: str, session_id: str) -> bool:
        """True for exactly one caller: the gate that keeps reapers from acting twice."""
        return bool(self._redis.zrem(_deadline_key(kind), session_id))

    def count_deadlines(self, kind: str) -> int:
        return int(self._redis.zcard(_deadline_key(kind)))

    @staticmethod
    def _index(pipe: Any, session: Session) -> None:
        if session.state not in CLOCKED_STATES:
            # Only live sessions have deadlines: a terminating one is already on its way out.
            for kind in DEADLINE_KINDS:
                pipe.zrem(_deadline_key(kind), session.id)
        if session.is_final:
            pipe.srem(_user_key(session.user), session.id)
            pipe.expire(_session_key(session.id), FINISHED_RETENTION_SECONDS)
            return
        pipe.sadd(_user_key(session.user), session.id)
        if session.state in CLOCKED_STATES:
            pipe.zadd(_deadline_key("lifetime"), {session.id: session.expires_at})
            pipe.zadd(_deadline_key("idle"), {session.id: session.idle_expires_at})


def _encode(session: Session) -> str:
    return json.dumps(session.to_dict(), separators=(",", ":"))


def _decode(raw: bytes | str) -> Session:
    return Session.from_dict(json.loads(raw))


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
