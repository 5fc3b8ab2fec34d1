"""Session, template and health endpoints: validate, call one domain function, enqueue, answer."""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Final

import redis
import structlog
from flask import Blueprint, Response, jsonify

from services.api.context import (
    body,
    caller,
    platform_caller,
    runtime,
    schema_of,
    session_for,
)
from services.api.errors import ApiError, invalid_request, problem_response, session_not_found
from services.api.idempotency import idempotent
from services.api.limits import create_counting, refuse_rate_limited
from services.api.metrics import counted_create
from services.api.openapi import (
    FORM,
    JSON,
    PLATFORM,
    SESSION_HOLDERS,
    documented,
    header,
    link_to,
)
from services.api.schemas import (
    CreateSessionRequest,
    HealthAnswer,
    OpenedSessionAnswer,
    SessionAnswer,
    TemplatesAnswer,
    TicketAnswer,
    TokenBody,
)
from shared.adapters.rate_limits import RateLimited
from shared.adapters.session_store import SessionNotFound, UserBusy
from shared.adapters.tickets import issue_ticket
from shared.domain.lifecycle import ExtensionRefused, clocks_for
from shared.domain.reasons import CloseReason
from shared.domain.regions import (
    InvalidHint,
    Location,
    NoRegion,
    RegionHint,
    UnknownCountry,
    UnknownRegion,
)
from shared.domain.sessions import InvalidUser, NotLive, Session, check_user
from shared.runtime import clock_overrides
from shared.session_results import NotQueued, SessionLimitReached

log = structlog.get_logger(__name__)

blueprint = Blueprint("sessions", __name__)

# Where a new session's routes are: what stateful clients follow from a create's answer.
SESSION_LINKS: Final = {
    name: link_to(f"sessions.{endpoint}", session_id="$response.body#/id")
    for name, endpoint in (
        ("GetSession", "get_session"),
        ("HeartbeatSession", "heartbeat"),
        ("ExtendSession", "extend_session"),
        ("CreateTicket", "create_ticket"),
        ("CloseSession", "close_session"),
        ("DeleteSession", "delete_session"),
    )
}
IDEMPOTENCY_KEY: Final = header(
    "Idempotency-Key",
    "Retries with the same key and body get the first answer, not a second session.",
    type="string",
    pattern=r"^[\x20-\x7e]{1,255}$",
)
# Beacon-friendly calls: the session token may come in the body instead of the header.
BEACON: Final = {
    "security": SESSION_HOLDERS,
    "body": TokenBody,
    "body_media": (JSON, FORM),
    "body_required": False,
}


@blueprint.get("/healthz")
@documented(summary="The process is alive", answers={200: HealthAnswer}, uses_storage=False)
def healthz() -> Response:
    return jsonify(HealthAnswer().dump({"status": "ok"}))


@blueprint.get("/readyz")
@documented(
    summary="Ready: Redis answers",
    answers={200: HealthAnswer},
    errors={503: "`unavailable`: Redis does not answer."},
    uses_storage=False,
)
def readyz() -> tuple[Response, int]:
    try:
        runtime().redis.ping()
    except redis.RedisError as exc:
        # The cause goes to the log, not to whoever asks (it can name hosts and addresses).
        log.warning("api.not_ready", error=str(exc))
        unready = problem_response(
            503, "unavailable", "session storage is unavailable", headers={"Retry-After": "2"}
        )
        return unready, 503
    return jsonify(HealthAnswer().dump({"status": "ok"})), 200


@blueprint.get("/v1/templates")
@documented(summary="The templates and regions", answers={200: TemplatesAnswer}, security=PLATFORM)
def list_templates() -> Response:
    platform_caller()
    rt = runtime()
    settings = rt.settings
    overrides = clock_overrides(settings)
    templates = []
    for template in sorted(rt.templates.values(), key=lambda t: t.name):
        clocks = clocks_for(template, overrides)
        # As this deployment runs it: with the operator's clock overrides.
        templates.append(
            replace(
                template,
                max_lifetime_seconds=clocks.max_lifetime_seconds,
                idle_timeout_seconds=clocks.idle_timeout_seconds,
            )
        )
    answer = {
        "templates": templates,
        "regions": list(settings.regions),
        "default_region": settings.default_region,
    }
    return jsonify(TemplatesAnswer().dump(answer))


@blueprint.post("/v1/sessions")
@documented(
    summary="Open a session (or reconnect to the user's own)",
    answers={201: OpenedSessionAnswer, 200: OpenedSessionAnswer},
    security=PLATFORM,
    body=CreateSessionRequest,
    headers=(IDEMPOTENCY_KEY,),
    answer_headers={"Location": {"schema": {"type": "string"}}},
    links=SESSION_LINKS,
    errors={
        409: "`session_limit`: the user has a session of another template (send `replace`);"
        " `idempotency_key_in_flight`: the same key is still being handled.",
        422: "`unknown_template`, `unknown_region`, `unknown_country`, `invalid_region_hint`,"
        " `conflicting_region_hints`; `idempotency_key_reused`: the key came with another body.",
        429: "",
        503: "`region_full`, `region_session_cap`, `region_booting_cap`, `region_down`,"
        " `region_drained`, `no_region_available`, `user_busy`, `unavailable`: retry, after"
        " `Retry-After` seconds when given.",
    },
)
@idempotent(CreateSessionRequest)
@counted_create
def create_session() -> tuple[Response, int, dict[str, str]]:
    platform_caller()
    rt = runtime()
    data = body(CreateSessionRequest, require_json=True)
    template = rt.templates.get(data["template"])
    if template is None:
        raise ApiError(
            422,
            "unknown_template",
            f"no template named {data['template']!r}",
            details={"templates": sorted(rt.templates)},
        )
    hint = _region_hint(data)
    try:
        user = check_user(data["user"])
    except InvalidUser as exc:
        raise invalid_request({"user": [str(exc)]}) from exc
    try:
        opened = rt.life.open(
            user=user,
            template=template.name,
            hint=hint,
            clocks=clocks_for(template, clock_overrides(rt.settings)),
            replace=data["replace"],
            counting=create_counting(user),  # in the round trip that takes the user's lock
        )
    except RateLimited as exc:
        refuse_rate_limited(exc)
    except UnknownRegion as exc:
        raise ApiError(
            422,
            "unknown_region",
            f"no cluster serves region {exc.region!r}",
            details={"regions": list(rt.settings.regions)},
        ) from exc
    except NoRegion as exc:
        raise _no_region_error(exc) from exc
    except UserBusy as exc:
        raise ApiError(
            503,
            "user_busy",
            "another request for this user is still being handled; try again",
            headers={"Retry-After": "1"},
        ) from exc
    except SessionLimitReached as exc:
        raise _limit_error(exc, template.name) from exc
    except NotQueued as exc:
        raise ApiError(
            503,
            "unavailable",
            "could not queue the environment; try again",
            headers={"Retry-After": "2"},
        ) from exc
    location = {"Location": f"/v1/sessions/{opened.session.id}"}
    # A reconnect (a page reload) answers the session as it is, without a token, which only
    # the first answer carried (labvirt keeps its hash, not the token).
    status = 200 if opened.reconnected else 201
    return jsonify(schema_of(OpenedSessionAnswer).dump(opened)), status, location


def _region_hint(data: dict[str, Any]) -> RegionHint:
    """At most one of ``region``, ``location`` and ``country``; 422 for two or an unknown
    country (the choice itself is ``SessionLife.open``'s)."""
    given = [key for key in ("region", "location", "country") if data[key] is not None]
    if len(given) > 1:
        raise ApiError(
            422,
            "conflicting_region_hints",
            f"give at most one of region, location and country, not {' and '.join(given)}",
            details={"given": given},
        )
    try:
        location = data["location"]
        return RegionHint(
            region=data["region"],
            location=None if location is None else Location(location["lat"], location["lon"]),
            country=data["country"],
        )
    except UnknownCountry as exc:
        raise ApiError(
            422,
            "unknown_country",
            f"{exc.code!r} is not a country code labvirt knows (ISO 3166 alpha-2)",
            details={"country": exc.code},
        ) from exc
    except InvalidHint as exc:
        raise ApiError(422, "invalid_region_hint", str(exc)) from exc


def _no_region_error(exc: NoRegion) -> ApiError:
    """503: the explicit region cannot take the session (full, down, drained), or none can."""
    details = {
        "region": exc.region,
        "regions": [{"region": name, "why": why.value} for name, why in exc.passed],
    }
    headers = {} if exc.retry_after is None else {"Retry-After": str(exc.retry_after)}
    code = f"region_{exc.why.value}" if exc.region is not None else "no_region_available"
    return ApiError(503, code, exc.message, details=details, headers=headers)


def _limit_error(exc: SessionLimitReached, template: str) -> ApiError:
    others = ", ".join(f"{s.id} ({s.template})" for s in exc.conflicting)
    return ApiError(
        409,
        "session_limit",
        f"user {exc.user!r} already has {len(exc.conflicting)} active session(s): "
        f'{others}; close it or send "replace": true to close it and start {template!r}',
        details={
            "max_sessions_per_user": exc.limit,
            "sessions": [
                {"id": s.id, "template": s.template, "region": s.region, "state": s.state.value}
                for s in exc.conflicting
            ],
        },
    )


@blueprint.get("/v1/sessions/<session_id>")
@documented(
    summary="The session", answers={200: SessionAnswer}, security=SESSION_HOLDERS, errors={404: ""}
)
def get_session(session_id: str) -> Response:
    return jsonify(schema_of(SessionAnswer).dump(session_for(session_id, caller())))


@blueprint.delete("/v1/sessions/<session_id>")
@documented(
    summary="End the session: its environment is torn down",
    answers={202: SessionAnswer},
    security=SESSION_HOLDERS,
    errors={404: ""},
)
def delete_session(session_id: str) -> tuple[Response, int]:
    return _close(session_id, CloseReason.DELETED, allow_body_token=False)


@blueprint.post("/v1/sessions/<session_id>/close")
@documented(
    summary="End the session, beacon-friendly (the token may come in the body)",
    answers={202: SessionAnswer},
    errors={404: "", 429: ""},
    **BEACON,
)
def close_session(session_id: str) -> tuple[Response, int]:
    return _close(session_id, CloseReason.CLOSED, allow_body_token=True)


@blueprint.post("/v1/sessions/<session_id>/heartbeat")
@documented(
    summary="Restart the idle clock",
    answers={200: SessionAnswer},
    errors={404: "", 409: "`session_closed`: the session is no longer live.", 429: ""},
    **BEACON,
)
def heartbeat(session_id: str) -> Response:
    session = session_for(session_id, caller(allow_body_token=True))
    try:
        session = runtime().life.heartbeat(session.id)
    except SessionNotFound as exc:
        raise session_not_found() from exc
    except NotLive as exc:
        raise ApiError(409, "session_closed", str(exc)) from exc
    return jsonify(schema_of(SessionAnswer).dump(session))


@blueprint.post("/v1/sessions/<session_id>/extend")
@documented(
    summary="Move the end by the template's step",
    answers={200: SessionAnswer},
    errors={404: "", 409: "`hard_deadline_reached` and the other rules of extension.", 429: ""},
    **BEACON,
)
def extend_session(session_id: str) -> Response:
    """Move the end by the template's step, up to its hard deadline; 409 past it."""
    session = session_for(session_id, caller(allow_body_token=True))
    body(TokenBody)  # nothing but an optional token is accepted
    try:
        session = runtime().life.extend(session.id)
    except SessionNotFound as exc:
        raise session_not_found() from exc
    except ExtensionRefused as exc:
        raise ApiError(409, exc.code, exc.message, details=_deadlines(session)) from exc
    return jsonify(schema_of(SessionAnswer).dump(session))


@blueprint.post("/v1/sessions/<session_id>/tickets")
@documented(
    summary="A one-time ticket for a terminal or event stream",
    answers={201: TicketAnswer},
    security=SESSION_HOLDERS,
    errors={404: "", 409: "`session_closed`: the session is no longer live.", 429: ""},
)
def create_ticket(session_id: str) -> tuple[Response, int]:
    """A one-time, 30-second ticket that opens one terminal or event stream of this session.

    The session token (or a frontend token) travels in the header here, so that only the
    ticket ever appears in a URL.
    """
    session = session_for(session_id, caller())
    if not session.is_live:
        raise ApiError(409, "session_closed", f"the session is {session.state.value}")
    rt = runtime()
    ticket, expires_at = issue_ticket(rt.redis, session.id, now=rt.clock())
    return jsonify(TicketAnswer().dump({"ticket": ticket, "expires_at": expires_at})), 201


def _deadlines(session: Session) -> dict[str, Any]:
    answer: dict[str, Any] = SessionAnswer(only=("state", "expires_at", "hard_expires_at")).dump(
        session
    )
    return answer


def _close(session_id: str, reason: CloseReason, *, allow_body_token: bool) -> tuple[Response, int]:
    session = session_for(session_id, caller(allow_body_token=allow_body_token))
    try:
        session = runtime().life.close(session.id, reason)
    except SessionNotFound as exc:  # a finished session's document expired meanwhile
        raise session_not_found() from exc
    return jsonify(schema_of(SessionAnswer).dump(session)), 202
