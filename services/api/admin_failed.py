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

from services.api.context import admin_caller, body, runtime
from services.api.errors import ApiError, invalid_request
from services.api.schemas import session_body
from shared.adapters.dead_letters import DeadLetter, Filter, Status
from shared.domain.sessions import IllegalTransition, SessionState
from shared.jobs import PROVISION

admin_failed = Blueprint("admin_failed", __name__)

_FAILURE_ID: Final = re.compile(r"f-[0-9a-f]{20}")
_STATUSES: Final = (Status.FAILED, Status.REQUEUED, Status.RESOLVED)
MAX_PAGE: Final = 500


class FailedFilter(Schema):
    class Meta:
        unknown = RAISE

    task = fields.String(load_default=None, validate=validate.Length(min=1, max=100))
    status = fields.String(load_default=None, validate=validate.OneOf(_STATUSES))
    session = fields.String(load_default=None, validate=validate.Length(min=1, max=64))
    region = fields.String(load_default=None, validate=validate.Length(min=1, max=63))


def _summary(letter: DeadLetter) -> dict[str, Any]:
    return {
        "id": letter.id,
        "task": letter.task,
        "status": letter.status,
        "error": letter.error,
        "attempts": letter.attempts,
        "first_failed_at": letter.first_failed_at,
        "last_failed_at": letter.last_failed_at,
        "concerns": letter.concerns,
        "requeues": len(letter.requeues),
    }


def _filter(source: dict[str, Any]) -> Filter:
    return Filter(
        task=source.get("task"),
        status=source.get("status"),
        session_id=source.get("session"),
        region=source.get("region"),
    )


def _query_filter() -> Filter:
    args = {key: request.args.get(key) for key in ("task", "status", "session", "region")}
    errors = FailedFilter().validate({k: v for k, v in args.items() if v is not None})
    if errors:
        raise invalid_request(errors, "the query is invalid")
    return _filter(args)


def _int_arg(name: str, default: int, *, maximum: int) -> int:
    raw = request.args.get(name)
    if raw is None:
        return default
    if not raw.isdigit() or not 1 <= int(raw) <= maximum:
        raise invalid_request({name: [f"a whole number from 1 to {maximum}"]}, "bad query")
    return int(raw)


def _requester() -> str:
    who = admin_caller()
    fingerprint = hashlib.sha256(who.token.encode()).hexdigest()[:8]
    operator = request.headers.get("X-Labvirt-Operator", "")[:64]
    operator = re.sub(r"[^A-Za-z0-9_.@-]", "", operator)
    return f"{operator} (admin {fingerprint})" if operator else f"admin {fingerprint}"


def _letter(failure_id: str) -> DeadLetter:
    letter = runtime().dead_letters.get(failure_id) if _FAILURE_ID.fullmatch(failure_id) else None
    if letter is None:
        raise ApiError(404, "failure_not_found", "no such failed task")
    return letter


@admin_failed.get("/v1/admin/failed")
def list_failed() -> Response:
    admin_caller()
    where = _query_filter()
    limit = _int_arg("limit", 50, maximum=MAX_PAGE)
    before_raw = request.args.get("before")
    try:
        before = None if before_raw is None else float(before_raw)
    except ValueError as exc:
        raise invalid_request({"before": ["a cursor from next_before"]}, "bad query") from exc
    letters, cursor = runtime().dead_letters.list(where, limit=limit, before=before)
    return jsonify(
        {
            "failed": [_summary(letter) for letter in letters],
            "next_before": cursor,
            "total": runtime().dead_letters.count(),
        }
    )


@admin_failed.get("/v1/admin/failed/<failure_id>")
def show_failed(failure_id: str) -> Response:
    admin_caller()
    return jsonify(_letter(failure_id).to_dict())


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


@admin_failed.post("/v1/admin/failed/<failure_id>/requeue")
def requeue_failed(failure_id: str) -> Response:
    by = _requester()
    rt = runtime()
    _ready_to_run(_letter(failure_id))
    letter, queued = rt.dead_letters.requeue(failure_id, by=by, enqueue=rt.queue.enqueue)
    if letter is None:
        raise ApiError(404, "failure_not_found", "no such failed task")
    return jsonify({"requeued": queued, "failed": letter.to_dict()})


@admin_failed.post("/v1/admin/failed/requeue")
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
    return jsonify({"requeued": requeued, "skipped": skipped})


@admin_failed.delete("/v1/admin/failed/<failure_id>")
def purge_failed(failure_id: str) -> tuple[Response, int]:
    admin_caller()
    _letter(failure_id)
    runtime().dead_letters.purge(failure_id)
    return jsonify({"purged": failure_id}), 200


@admin_failed.get("/v1/admin/sessions")
def list_sessions() -> Response:
    """Live sessions (and, with ``state=ended|failed``, recently finished ones) by filter."""
    admin_caller()
    rt = runtime()
    wanted = {key: request.args.get(key) for key in ("user", "template", "region", "state")}
    if wanted["state"] is not None and wanted["state"] not in {s.value for s in SessionState}:
        raise invalid_request({"state": [f"one of {', '.join(s.value for s in SessionState)}"]})
    if wanted["region"] is not None and wanted["region"] not in rt.settings.regions:
        raise invalid_request({"region": [f"one of {', '.join(rt.settings.regions)}"]})
    limit = _int_arg("limit", 100, maximum=MAX_PAGE)
    finished = wanted["state"] in (SessionState.ENDED.value, SessionState.FAILED.value)
    found = rt.sessions.finished_sessions(limit=5000) if finished else rt.sessions.live_sessions()
    matching = [
        session
        for session in found
        if (wanted["user"] is None or session.user == wanted["user"])
        and (wanted["template"] is None or session.template == wanted["template"])
        and (wanted["region"] is None or session.region == wanted["region"])
        and (wanted["state"] is None or session.state.value == wanted["state"])
    ]
    matching.sort(key=lambda s: s.created_at, reverse=True)
    return jsonify(
        {"sessions": [session_body(s) for s in matching[:limit]], "total": len(matching)}
    )
