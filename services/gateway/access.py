"""Who may open what at the gateway: tickets, tokens, and the session they reach.

A terminal opens only with a one-time ticket (``?ticket=``): a session token is never accepted
in a terminal URL. An event stream takes a ticket too, or a bearer token in a header; the old
``?token=`` still works for one release and is logged as deprecated. Errors are answered
before any upgrade, as ``application/problem+json`` of the same shape as the API's.
"""

from __future__ import annotations

import json
import re
from http import HTTPStatus
from typing import Any, Final

import redis.asyncio
import structlog
from aiohttp import web
from aiohttp.typedefs import Handler

from shared.adapters.session_store import session_key
from shared.adapters.tickets import redeem_ticket
from shared.config import Settings
from shared.credentials import Role, identify, is_well_formed, parse_bearer
from shared.domain.sessions import Session
from shared.problems import PROBLEM_MEDIA_TYPE, problem_body

log = structlog.get_logger(__name__)

_SESSION_ID: Final = re.compile(r"s-[0-9a-f]{24}")


def error(status: int, code: str, message: str, **context: Any) -> web.HTTPException:
    """An HTTP error with labvirt's problem body; ``context`` members join it."""
    exception = web.HTTPException(
        text=json.dumps(problem_body(status, code, message, context=context)),
        content_type=PROBLEM_MEDIA_TYPE,
        headers={"Cache-Control": "no-store"},
    )
    exception.set_status(status)
    return exception


@web.middleware
async def problem_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """aiohttp's own refusals (an unknown path, a wrong method, a body too large) in the same
    problem shape as labvirt's."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < HTTPStatus.BAD_REQUEST or exc.content_type == PROBLEM_MEDIA_TYPE:
            raise
        default_text = f"{exc.status}: {exc.reason}"
        detail = exc.text if exc.text and exc.text != default_text else exc.reason
        problem = error(exc.status, exc.reason.lower().replace(" ", "_"), detail)
        for name, value in exc.headers.items():  # a 405 keeps its Allow
            if name.lower() not in ("content-type", "content-length"):
                problem.headers.setdefault(name, value)
        raise problem from exc


def not_found() -> web.HTTPException:
    # The same answer whether the session does not exist or is someone else's.
    return error(404, "not_found", "no such session")


async def load_session(client: redis.asyncio.Redis, session_id: str) -> Session | None:
    if not _SESSION_ID.fullmatch(session_id):
        return None
    raw = await client.get(session_key(session_id))
    return None if raw is None else Session.from_dict(json.loads(raw))


async def admit(
    request: web.Request,
    *,
    client: redis.asyncio.Redis,
    settings: Settings,
    ticket_only: bool,
) -> Session:
    """The session the request may reach, or the HTTP error that says why not."""
    session_id = request.match_info["session_id"]
    query = request.query
    if ticket_only and "token" in query:
        raise error(
            400,
            "token_in_url",
            "a session token never goes into a URL: get a ticket from "
            "POST /v1/sessions/{id}/tickets and pass ?ticket=",
        )
    ticket = query.get("ticket")
    if ticket is not None:
        if not _SESSION_ID.fullmatch(session_id) or not await redeem_ticket(
            client, ticket, session_id
        ):
            raise error(
                401, "invalid_ticket", "the ticket is unknown, used, expired or not this session's"
            )
        session = await load_session(client, session_id)
        if session is None:
            raise not_found()
        return session
    if ticket_only:
        raise error(401, "unauthorized", "a ticket is required (?ticket=)")
    token = parse_bearer(request.headers.get("Authorization", ""))
    if token is None and "token" in query:
        token = query["token"]
        log.warning("events.token_in_url_deprecated", session_id=session_id)
    if not token or not is_well_formed(token):
        raise error(401, "unauthorized", "missing credentials: a ticket or a bearer token")
    caller = identify(token, frontend=settings.frontend_tokens, admin=settings.admin_tokens)
    session = await load_session(client, session_id)
    if session is None:
        raise not_found()
    if caller.role not in (Role.FRONTEND, Role.ADMIN) and not session.token_matches(token):
        raise not_found()
    return session
