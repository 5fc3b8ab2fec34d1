"""``GET /v1/sessions/{id}/events``: a session's progress as server-sent events.

Made for the browser's ``EventSource``: the session token may come in the query string
(``?token=``, EventSource cannot set headers), each event's ``id`` is its Redis stream id, so
the browser's automatic reconnect (``Last-Event-ID``) resumes exactly where it stopped. The
stream stays open after ``ready`` for what comes later (``expiring-soon``, ``ended``), with
comment keep-alives, until the client leaves or a terminal stage (``ended``, ``failed``) was
sent; a reconnect after that gets 204, which tells EventSource to stop.

Each open stream holds one API thread and one Redis connection (blocked in ``XREAD``): size
``LABVIRT_API_THREADS`` for the streams you expect. On shutdown every stream ends within one
read slice, so the worker never waits out its graceful timeout on them.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Final

import structlog
from flask import Blueprint, Response, current_app, request

from services.api.context import caller, runtime, session_for
from services.api.errors import ApiError
from shared.adapters.session_events import START, SessionEvents, is_event_id
from shared.domain.lifecycle import TERMINAL_STAGES, ProgressEvent

log = structlog.get_logger(__name__)
blueprint = Blueprint("events", __name__)

STOPPING_KEY: Final = "labvirt.stopping"
# How long one XREAD blocks: the bound on how late a stream notices shutdown.
READ_SLICE_SECONDS: Final = 2.0
# What EventSource waits before reconnecting after a dropped connection.
RETRY_MILLISECONDS: Final = 2000


def stopping_event() -> threading.Event:
    event: threading.Event = current_app.extensions[STOPPING_KEY]
    return event


@blueprint.get("/v1/sessions/<session_id>/events")
def session_events(session_id: str) -> Response:
    session = session_for(session_id, caller(allow_query_token=True))
    after = request.headers.get("Last-Event-ID") or request.args.get("last_event_id") or START
    if not is_event_id(after):
        raise ApiError(400, "invalid_last_event_id", "Last-Event-ID is not an id this API sent")
    rt = runtime()
    first = rt.events.read(session.id, after=after)
    if not first and not session.is_live:
        # Everything was delivered and nothing more will come: 204 stops EventSource.
        return Response(status=204)
    stream = _stream(
        rt.events,
        session.id,
        first=first,
        after=after,
        keepalive=rt.settings.events_keepalive_seconds,
        stopping=stopping_event(),
    )
    log.info("session.events_opened", resumed=after != START)
    return Response(
        stream,
        mimetype="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )


def _stream(
    events: SessionEvents,
    session_id: str,
    *,
    first: list[tuple[str, ProgressEvent]],
    after: str,
    keepalive: float,
    stopping: threading.Event,
) -> Iterator[str]:
    yield f"retry: {RETRY_MILLISECONDS}\n\n"
    cursor = after
    batch = first
    last_write = time.monotonic()
    while True:
        for event_id, event in batch:
            cursor = event_id
            yield format_event(event_id, event)
            last_write = time.monotonic()
            if event.stage in TERMINAL_STAGES:
                return
        if stopping.is_set():
            return
        if time.monotonic() - last_write >= keepalive:
            # A comment: EventSource ignores it; proxies see traffic; a gone client fails the
            # write, which ends this generator and frees the thread.
            yield ": keep-alive\n\n"
            last_write = time.monotonic()
        batch = events.read(
            session_id, after=cursor, block_seconds=min(READ_SLICE_SECONDS, keepalive)
        )


def format_event(event_id: str, event: ProgressEvent) -> str:
    data = {"stage": event.stage.value, "at": event.at, **event.detail}
    return f"id: {event_id}\nevent: {event.stage.value}\ndata: {json.dumps(data)}\n\n"
