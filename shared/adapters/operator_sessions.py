"""Operators signed in to the dashboard (``/ui/ops``), held in Redis.

Signing in with an admin token opens a record here and hands the browser a random id in a
cookie; the token itself goes nowhere: neither into the cookie nor into Redis, which keeps its
SHA-256 (so a token removed from the configuration stops opening the dashboard, and requeues
are recorded with the same fingerprint the API gives). The record's key is a hash of the id,
so a reader of Redis cannot sign in with what it finds. Each record carries the CSRF token its
forms must send back, and expires on its own after ``lifetime_seconds``; signing out deletes
it. A one-time notice (what the last action did) lives next to it for a minute.

Every operation touches one key (no Lua, no transaction across keys): Redis Cluster safe.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

import redis

PREFIX: Final = "labvirt:ops-ui"
LIFETIME_SECONDS: Final = 8 * 3600
NOTICE_SECONDS: Final = 60
# What ``secrets.token_urlsafe(32)`` makes; anything else is no sign-in at all.
_SESSION_ID: Final = re.compile(r"[A-Za-z0-9_-]{43}")


def token_digest(token: str) -> str:
    """SHA-256 of a token, hex: what is kept of it (its first 8 characters name it in logs)."""
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class OperatorSession:
    token_digest: str  # of the admin token signed in with
    operator: str  # the name the operator gave, "" when none
    csrf_token: str
    signed_in_at: float

    def token_still_configured(self, admin_tokens: Iterable[str]) -> bool:
        """Whether the token signed in with is still an admin token (compared in constant
        time against every one)."""
        found = False
        for token in admin_tokens:
            found |= hmac.compare_digest(self.token_digest, token_digest(token))
        return found

    def csrf_matches(self, given: str) -> bool:
        return hmac.compare_digest(self.csrf_token.encode(), given.encode())


@dataclass(frozen=True)
class Notice:
    text: str
    error: bool


class OperatorSessions:
    def __init__(self, client: redis.Redis, *, lifetime_seconds: int = LIFETIME_SECONDS) -> None:
        self._redis = client
        self.lifetime_seconds = lifetime_seconds

    def open(self, *, admin_token: str, operator: str, now: float) -> tuple[str, OperatorSession]:
        """A new record for a checked admin token: (the id for the cookie, the record)."""
        session_id = secrets.token_urlsafe(32)
        session = OperatorSession(
            token_digest=token_digest(admin_token),
            operator=operator,
            csrf_token=secrets.token_urlsafe(32),
            signed_in_at=now,
        )
        key = _key(session_id)
        pipe = self._redis.pipeline(transaction=True)
        pipe.hset(
            key,
            mapping={
                "token_digest": session.token_digest,
                "operator": session.operator,
                "csrf_token": session.csrf_token,
                "signed_in_at": repr(now),
            },
        )
        pipe.expire(key, self.lifetime_seconds)
        pipe.execute()
        return session_id, session

    def get(self, session_id: str) -> OperatorSession | None:
        if not _SESSION_ID.fullmatch(session_id):
            return None
        raw = self._redis.hgetall(_key(session_id))
        if not raw:
            return None
        fields = {_text(k): _text(v) for k, v in raw.items()}
        try:
            return OperatorSession(
                token_digest=fields["token_digest"],
                operator=fields.get("operator", ""),
                csrf_token=fields["csrf_token"],
                signed_in_at=float(fields["signed_in_at"]),
            )
        except (KeyError, ValueError):
            return None  # not a record this code wrote: no sign-in

    def close(self, session_id: str) -> None:
        if _SESSION_ID.fullmatch(session_id):
            self._redis.delete(_key(session_id), _notice_key(session_id))

    def leave_notice(self, session_id: str, notice: Notice) -> None:
        """What the next page shows once (the outcome of the action that redirected to it)."""
        value = ("!" if notice.error else "-") + notice.text
        self._redis.set(_notice_key(session_id), value, ex=NOTICE_SECONDS)

    def take_notice(self, session_id: str) -> Notice | None:
        if not _SESSION_ID.fullmatch(session_id):
            return None
        pipe = self._redis.pipeline(transaction=True)
        pipe.get(_notice_key(session_id))
        pipe.delete(_notice_key(session_id))
        raw, _ = pipe.execute()
        if raw is None:
            return None
        value = _text(raw)
        return Notice(text=value[1:], error=value.startswith("!"))


def _key(session_id: str) -> str:
    # One hash tag per sign-in: the record and its notice live in one slot.
    return f"{PREFIX}:{{{hashlib.sha256(session_id.encode()).hexdigest()[:32]}}}"


def _notice_key(session_id: str) -> str:
    return _key(session_id) + ":notice"


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
