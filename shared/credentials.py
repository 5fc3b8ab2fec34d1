"""Who is calling: the learning frontend or an operator (platform tokens), or a browser holding
one session's token. Shared by the API and the gateway, so both judge a token alike.

Platform tokens come from configuration; a session token is handed out once, at creation, and
stored only as a hash. Comparisons are constant-time.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum


class Role(StrEnum):
    FRONTEND = "frontend"
    ADMIN = "admin"


@dataclass(frozen=True)
class Caller:
    role: Role | None  # None: only a bearer token we have yet to match to a session
    token: str


def parse_bearer(header: str) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, if that is what it is."""
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return None


def matches_any(token: str, candidates: Iterable[str]) -> bool:
    # Compare against every candidate, so timing reveals neither which nor how many matched.
    found = False
    for candidate in candidates:
        found |= hmac.compare_digest(token.encode(), candidate.encode())
    return found


def identify(token: str, *, frontend: Iterable[str], admin: Iterable[str]) -> Caller:
    if matches_any(token, admin):
        return Caller(Role.ADMIN, token)
    if matches_any(token, frontend):
        return Caller(Role.FRONTEND, token)
    return Caller(None, token)
