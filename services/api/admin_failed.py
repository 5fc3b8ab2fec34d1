"""Tasks that failed for good, and the sessions of the platform, for operators (admin token).

    GET    /v1/admin/failed[?task=&status=&session=&region=&limit=&before=]
    GET    /v1/admin/failed/<id>
    POST   /v1/admin/failed/<id>/requeue
    POST   /v1/admin/failed/requeue            {"task"?, "status"?, "session"?, "region"?}
    DELETE /v1/admin/failed/<id>
    GET    /v1/admin/sessions[?user=&template=&region=&state=&limit=]

A requeue is recorded with who asked (a fingerprint of the admin token, and the operator's
name when the ``X-Labvirt-Operator`` header gives one) and is idempotent.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any, Final

from flask import Blueprint, Response, jsonify, request
from marshmallow import RAISE, Schema, fields, validate
from werkzeug.routing import BaseConverter

from services.api.admin_schemas import (
    FAILURE_ID_PATTERN,
    AdminSessionsAnswer,
    FailureAnswer,
    FailurePageAnswer,
    PurgedAnswer,
    RequeuedAnswer,
    RequeuedManyAnswer,
)
from services.api.context import admin_caller, body, query, runtime
from services.api.errors import ApiError, invalid_query
from services.api.openapi import OPERATORS, documented, header
from shared.adapters.dead_letters import DeadLetter, Filter, Status
from shared.domain.sessions import IllegalTransition, SessionState
from shared.jobs import PROVISION

admin_failed = Blueprint("admin_failed", __name__)


class FailureIdConverter(BaseConverter):
    """``<failure:...>`` in a route: a record's id and nothing else. So
    ``/v1/admin/failed/requeue`` is only the POST that requeues every match (any other
    method there is 405), and a malformed id never reaches a view."""

    regex = FAILURE_ID_PATTERN.removeprefix("^").removesuffix("$")


_STATUSES: Final = (Status.FAILED, Status.REQUEUED, Status.RESOLVED)
MAX_PAGE: Final = 500
_PAGE_SIZE: Final = validate.Range(min=1, max=MAX_PAGE, error="a whole number from {min} to {max}")


class FailedFilter(Schema):
    """Which records: the body of a bulk requeue, and the filters of the list's query."""

    class Meta:
        unknown = RAISE

    task = fields.String(load_default=None, validate=validate.Length(min=1, max=100))
    status = fields.String(load_default=None, validate=validate.OneOf(_STATUSES))
    session = fields.String(load_default=None, validate=validate.Length(min=1, max=64))
    region = fields.String(load_default=None, validate=validate.Length(min=1, max=63))


class FailedQuery(FailedFilter):
    """``GET /v1/admin/failed``'s query: the filters, and a page."""

    limit = fields.Integer(strict=False, load_default=50, validate=_PAGE_SIZE)
    before = fields.Float(
        load_default=None,
        allow_nan=False,
        metadata={"description": "the next_before of the previous page"},
    )


class SessionsQuery(Schema):
    class Meta:
        unknown = RAISE

    user = fields.String(load_default=None, validate=validate.Length(min=1, max=128))
    template = fields.String(load_default=None, validate=validate.Length(min=1, max=63))
    region = fields.String(load_default=None, validate=validate.Length(min=1, max=63))
    state = fields.Enum(SessionState, by_value=True, load_default=None)
    limit = fields.Integer(load_default=100, validate=_PAGE_SIZE)


OPERATOR: Final = header(
    "X-Labvirt-Operator",
    "who asks, recorded with the requeue (letters, digits and _.@- are kept)",
    type="string",
)


def _filter(source: dict[str, Any]) -> Filter:
    return Filter(
        task=source.get("task"),
        status=source.get("status"),
        session_id=source.get("session"),
        region=source.get("region"),
    )


def _requester() -> str:
    who = admin_caller()
    digest = hashlib.sha256(who.token.encode()).hexdigest()
    return requested_by(digest, request.headers.get("X-Labvirt-Operator", ""))


def operator_name(given: str) -> str:
    """The operator's name as a requeue records it: letters, digits and ``_.@-``, 64 at most."""
    return re.sub(r"[^A-Za-z0-9_.@-]", "", given[:64])


def requested_by(token_digest: str, operator: str) -> str:
    """Who asked for a requeue: the operator's name, if given, and the admin token's
    fingerprint (the first 8 hex digits of its SHA-256)."""
    fingerprint = token_digest[:8]
    name = operator_name(operator)
    return f"{name} (admin {fingerprint})" if name else f"admin {fingerprint}"


def _letter(failure_id: str) -> DeadLetter:
    letter = runtime().dead_letters.get(failure_id)
    if letter is None:
        raise ApiError(404, "failure_not_found", "no such failed task")
    return letter


@admin_failed.get("/v1/admin/failed")
@documented(
    summary="Tasks that failed for good, newest first",
    answers={200: FailurePageAnswer},
    security=OPERATORS,
    query=FailedQuery,
)
def list_failed() -> Response:
    admin_caller()
    wanted = query(FailedQuery)
    letters, cursor = runtime().dead_letters.list(
        _filter(wanted), limit=wanted["limit"], before=wanted["before"]
    )
    page = {"failed": letters, "next_before": cursor, "total": runtime().dead_letters.count()}
    return jsonify(FailurePageAnswer().dump(page))


@admin_failed.get("/v1/admin/failed/<failure:failure_id>")
@documented(
    summary="One record, whole",
    answers={200: FailureAnswer},
    security=OPERATORS,
    errors={404: "`failure_not_found`."},
)
def show_failed(failure_id: str) -> Response:
    admin_caller()
    return jsonify(FailureAnswer().dump(_letter(failure_id)))


def _ready_to_run(letter: DeadLetter) -> None:
    """A failed provisioning runs again on its session, reopened in a fresh environment (the
    learner's session failed with it); 409 when that session can no longer be reopened."""
    if letter.task != PROVISION or letter.status == Status.REQUEUED:
        return
    rt = runtime()
    session = rt.sessions.get(letter.payload.get("session_id", ""))
    if session is None or session.state is not SessionState.FAILED:
        return  # gone (nothing to do) or live again: the task decides
    try:
        rt.life.reopen(session.id)
    except IllegalTransition as exc:
        raise ApiError(
            409,
            "session_not_reopenable",
            f"session {session.id} failed and its lifetime is over: open a new one",
        ) from exc


@admin_failed.post("/v1/admin/failed/<failure:failure_id>/requeue")
@documented(
    summary="Queue the task again, once",
    answers={200: RequeuedAnswer},
    security=OPERATORS,
    headers=(OPERATOR,),
    errors={
        404: "`failure_not_found`.",
        409: "`session_not_reopenable`: the failed session's lifetime is over.",
    },
)
def requeue_failed(failure_id: str) -> Response:
    letter, queued = requeue_failure(failure_id, by=_requester())
    return jsonify(RequeuedAnswer().dump({"requeued": queued, "failed": letter}))


def requeue_failure(failure_id: str, *, by: str) -> tuple[DeadLetter, bool]:
    """Queue a recorded task again, once: (the record, whether it was queued now). The admin
    API and the operators' dashboard both requeue through here."""
    rt = runtime()
    _ready_to_run(_letter(failure_id))
    letter, queued = rt.dead_letters.requeue(failure_id, by=by, enqueue=rt.queue.enqueue)
    if letter is None:
        raise ApiError(404, "failure_not_found", "no such failed task")
    return letter, queued


@admin_failed.post("/v1/admin/failed/requeue")
@documented(
    summary="Requeue every matching record (status `failed` unless given)",
    answers={200: RequeuedManyAnswer},
    security=OPERATORS,
    body=FailedFilter,
    headers=(OPERATOR,),
)
def requeue_matching() -> Response:
    by = _requester()
    rt = runtime()
    data = body(FailedFilter, require_json=True)
    data["status"] = data["status"] or Status.FAILED
    letters, _ = rt.dead_letters.list(_filter(data), limit=MAX_PAGE)
    requeued: list[str] = []
    skipped: list[str] = []
    for letter in letters:
        try:
            _ready_to_run(letter)
        except ApiError:
            skipped.append(letter.id)
            continue
        _, queued = rt.dead_letters.requeue(letter.id, by=by, enqueue=rt.queue.enqueue)
        (requeued if queued else skipped).append(letter.id)
    return jsonify(RequeuedManyAnswer().dump({"requeued": requeued, "skipped": skipped}))


@admin_failed.delete("/v1/admin/failed/<failure:failure_id>")
@documented(
    summary="Purge a record",
    answers={200: PurgedAnswer},
    security=OPERATORS,
    errors={404: "`failure_not_found`."},
)
def purge_failed(failure_id: str) -> tuple[Response, int]:
    admin_caller()
    _letter(failure_id)
    runtime().dead_letters.purge(failure_id)
    return jsonify(PurgedAnswer().dump({"purged": failure_id})), 200


@admin_failed.get("/v1/admin/sessions")
@documented(
    summary="Sessions by filter, newest first",
    answers={200: AdminSessionsAnswer},
    security=OPERATORS,
    query=SessionsQuery,
)
def list_sessions() -> Response:
    """Live sessions (and, with ``state=ended|failed``, recently finished ones) by filter."""
    admin_caller()
    rt = runtime()
    wanted = query(SessionsQuery)
    if wanted["region"] is not None and wanted["region"] not in rt.settings.regions:
        raise invalid_query({"region": [f"one of {', '.join(rt.settings.regions)}"]})
    limit = wanted["limit"]
    finished = wanted["state"] in (SessionState.ENDED, SessionState.FAILED)
    found = rt.sessions.finished_sessions(limit=5000) if finished else rt.sessions.live_sessions()
    matching = [
        session
        for session in found
        if (wanted["user"] is None or session.user == wanted["user"])
        and (wanted["template"] is None or session.template == wanted["template"])
        and (wanted["region"] is None or session.region == wanted["region"])
        and (wanted["state"] is None or session.state is wanted["state"])
    ]
    matching.sort(key=lambda s: s.created_at, reverse=True)
    answer = {"sessions": matching[:limit], "total": len(matching)}
    return jsonify(AdminSessionsAnswer().dump(answer))
