"""Who is calling: the learning frontend or an operator (platform tokens), or a browser holding
one session's token. Shared by the API and the gateway, so both judge a token alike.

Platform tokens come from configuration; a session token is handed out once, at creation, and
stored only as a hash. Comparisons are constant-time. A token is printable ASCII (what an
HTTP header carries portably); anything else is no credential at all, never an encoding error.
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import Final

# Printable ASCII without the space; bounded so that hashing a token costs next to nothing.
_WELL_FORMED_TOKEN: Final = re.compile(r"[!-~]{1,1024}")


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
    if scheme.lower() == "bearer" and is_well_formed(value.strip()):
        return value.strip()
    return None


def is_well_formed(token: str) -> bool:
    """Whether ``token`` can be a credential at all: 1-1024 printable ASCII characters."""
    return _WELL_FORMED_TOKEN.fullmatch(token) is not None


def matches_any(token: str, candidates: Iterable[str]) -> bool:
    if not is_well_formed(token):
        return False
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
