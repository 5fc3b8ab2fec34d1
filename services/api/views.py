"""Session, template and health endpoints: validate, call one domain function, enqueue, answer."""

from __future__ import annotations

from typing import Any

import redis
from flask import Blueprint, Response, jsonify

from services.api.context import body, caller, platform_caller, runtime, session_for
from services.api.errors import ApiError, invalid_request, session_not_found
from services.api.schemas import CreateSessionRequest, TokenBody, session_body, timestamp
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

blueprint = Blueprint("sessions", __name__)


@blueprint.get("/healthz")
def healthz() -> Response:
    return jsonify({"status": "ok"})


@blueprint.get("/readyz")
def readyz() -> tuple[Response, int]:
    try:
        runtime().redis.ping()
    except redis.RedisError as exc:
        return jsonify({"status": "unavailable", "redis": str(exc)}), 503
    return jsonify({"status": "ok"}), 200


@blueprint.get("/v1/templates")
def list_templates() -> Response:
    platform_caller()
    rt = runtime()
    settings = rt.settings
    overrides = clock_overrides(settings)
    return jsonify(
        {
            "templates": [
                {
                    "name": t.name,
                    "description": t.description,
                    "max_lifetime_seconds": clocks_for(t, overrides).max_lifetime_seconds,
                    "idle_timeout_seconds": clocks_for(t, overrides).idle_timeout_seconds,
                    "vms": [
                        {
                            "name": vm.name,
                            "hostname": vm.hostname,
                            "cpu_cores": vm.cpu_cores,
                            "memory": vm.memory,
                        }
                        for vm in t.vms
                    ],
                }
                for t in sorted(rt.templates.values(), key=lambda t: t.name)
            ],
            "regions": list(settings.regions),
            "default_region": settings.default_region,
        }
    )


@blueprint.post("/v1/sessions")
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
        )
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
    where = {"region_reason": opened.region_reason}
    if opened.reconnected:
        # A reconnect (a page reload): the session as it is, without a token, which only the
        # first answer carried (labvirt keeps its hash, not the token).
        answer = {**session_body(opened.session), **where, "reconnected": True}
        return jsonify(answer), 200, location
    return jsonify({**session_body(opened.session, token=opened.token), **where}), 201, location


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
def get_session(session_id: str) -> Response:
    return jsonify(session_body(session_for(session_id, caller())))


@blueprint.delete("/v1/sessions/<session_id>")
def delete_session(session_id: str) -> tuple[Response, int]:
    return _close(session_id, CloseReason.DELETED, allow_body_token=False)


@blueprint.post("/v1/sessions/<session_id>/close")
def close_session(session_id: str) -> tuple[Response, int]:
    return _close(session_id, CloseReason.CLOSED, allow_body_token=True)


@blueprint.post("/v1/sessions/<session_id>/heartbeat")
def heartbeat(session_id: str) -> Response:
    session = session_for(session_id, caller(allow_body_token=True))
    try:
        session = runtime().life.heartbeat(session.id)
    except SessionNotFound as exc:
        raise session_not_found() from exc
    except NotLive as exc:
        raise ApiError(409, "session_closed", str(exc)) from exc
    return jsonify(session_body(session))


@blueprint.post("/v1/sessions/<session_id>/extend")
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
    return jsonify(session_body(session))


@blueprint.post("/v1/sessions/<session_id>/tickets")
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
    return jsonify({"ticket": ticket, "expires_at": timestamp(expires_at)}), 201


def _deadlines(session: Session) -> dict[str, Any]:
    extra = session_body(session)
    return {key: extra[key] for key in ("state", "expires_at", "hard_expires_at")}


def _close(session_id: str, reason: CloseReason, *, allow_body_token: bool) -> tuple[Response, int]:
    session = session_for(session_id, caller(allow_body_token=allow_body_token))
    try:
        session = runtime().life.close(session.id, reason)
    except SessionNotFound as exc:  # a finished session's document expired meanwhile
        raise session_not_found() from exc
    return jsonify(session_body(session)), 202
