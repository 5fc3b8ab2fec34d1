"""One-time tickets: how a browser opens a terminal or an event stream without its session
token in a URL (URLs end up in logs, proxies and browser history).

The frontend asks for a ticket with the session token in a header (``POST
/v1/sessions/{id}/tickets``) and puts the ticket in the URL. A ticket is random, lives 30 s,
opens one connection of one session, and is stored only as a hash; redeeming it deletes it in
the same step (``GETDEL``), so it can never be used twice.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from typing import Any, Final

import redis
import redis.asyncio

TICKET_SECONDS: Final = 30
PREFIX: Final = "labvirt:ticket"


def _key(ticket: str) -> str:
    return f"{PREFIX}:{hashlib.sha256(ticket.encode()).hexdigest()}"


def issue_ticket(client: redis.Redis, session_id: str, *, now: float) -> tuple[str, float]:
    """A new ticket for ``session_id`` and when it expires."""
    ticket = secrets.token_urlsafe(24)
    client.set(_key(ticket), session_id, ex=TICKET_SECONDS)
    return ticket, now + TICKET_SECONDS


async def redeem_ticket(client: redis.asyncio.Redis, ticket: str, session_id: str) -> bool:
    """True once for a live ticket of ``session_id``; a ticket tried on another session is
    spent all the same (whoever holds it is not to be trusted with a second try)."""
    if not ticket or len(ticket) > 128:
        return False
    raw: Any = await client.getdel(_key(ticket))
    if raw is None:
        return False
    bound = raw.decode() if isinstance(raw, bytes) else str(raw)
    return hmac.compare_digest(bound.encode(), session_id.encode())
