"""``GET /v1/sessions/{id}/events``: a session's progress as server-sent events, on asyncio.

One Redis subscription per gateway process (``session_events.NOTIFY_CHANNEL``) wakes the
streams of the session whose log grew; each stream then reads on from its cursor with a
non-blocking ``XREAD``. So thousands of open streams cost a coroutine and a small buffer
each, not a thread and a blocked Redis connection. A stream that hears nothing sends a comment
keep-alive, and reads anyway (a missed notice, a Redis restart, cost at most that delay).

Made for ``EventSource``: each event's ``id`` is its stream id, so the browser's reconnect
(``Last-Event-ID``) resumes exactly where it stopped; the stream ends after ``ended`` or
``failed``, and a reconnect after that gets 204, which stops EventSource.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import defaultdict
from collections.abc import Awaitable, Callable
from typing import Any, Final

import redis.asyncio
import structlog
from aiohttp import web

from services.gateway.access import error
from shared.adapters.session_events import NOTIFY_CHANNEL, START, events_key, is_event_id
from shared.domain.lifecycle import TERMINAL_STAGES, ProgressEvent

log = structlog.get_logger(__name__)

RETRY_MILLISECONDS: Final = 2000
_BATCH: Final = 100


class EventHub:
    """Wakes the waiters of a session whenever its event log grows (one subscription)."""

    def __init__(self, client: redis.asyncio.Redis) -> None:
        self._redis = client
        self._waiters: defaultdict[str, set[asyncio.Event]] = defaultdict(set)
        self._listeners: list[Callable[[str], Awaitable[None]]] = []
        self._task: asyncio.Task[None] | None = None

    def on_append(self, listener: Callable[[str], Awaitable[None]]) -> None:
        """Also call ``listener(session_id)`` on every append (the terminals' ending)."""
        self._listeners.append(listener)

    def start(self) -> None:
        self._task = asyncio.create_task(self._listen(), name="event-hub")

    async def stop(self) -> None:
        if self._task is not None:
            await cancel_for_sure(self._task)

    def subscribe(self, session_id: str) -> asyncio.Event:
        event = asyncio.Event()
        self._waiters[session_id].add(event)
        return event

    def unsubscribe(self, session_id: str, event: asyncio.Event) -> None:
        waiters = self._waiters.get(session_id)
        if waiters is not None:
            waiters.discard(event)
            if not waiters:
                del self._waiters[session_id]

    async def _listen(self) -> None:
        failures = 0
        while True:
            try:
                async with self._redis.pubsub() as pubsub:
                    await pubsub.subscribe(NOTIFY_CHANNEL)
                    failures = 0
                    async for message in pubsub.listen():
                        if message.get("type") != "message":
                            continue
                        data = message["data"]
                        await self._wake(data.decode() if isinstance(data, bytes) else str(data))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - streams still poll; resubscribe later
                failures += 1
                log.warning("events.subscription_lost", error=str(exc), failures=failures)
                await asyncio.sleep(min(10.0, 0.2 * 2**failures))

    async def _wake(self, session_id: str) -> None:
        for event in self._waiters.get(session_id, ()):
            event.set()
        for listener in self._listeners:
            await listener(session_id)


async def read_events(
    client: redis.asyncio.Redis, session_id: str, after: str
) -> list[tuple[str, ProgressEvent]]:
    answer: Any = await client.xread({events_key(session_id): after}, count=_BATCH)
    events = []
    for _stream, entries in answer or []:
        for entry_id, fields in entries:
            decoded = {_text(k): _text(v) for k, v in fields.items()}
            events.append((_text(entry_id), ProgressEvent.from_fields(decoded)))
    return events


def last_event_id(request: web.Request) -> str:
    """Where a reconnecting stream resumes (``Last-Event-ID``), or the start; 400 if it is no
    id this gateway sent."""
    after = request.headers.get("Last-Event-ID") or request.query.get("last_event_id") or START
    if not is_event_id(after):
        raise error(400, "invalid_last_event_id", "Last-Event-ID is not an id this API sent")
    return after


def format_event(event_id: str, event: ProgressEvent) -> bytes:
    data = {"stage": event.stage.value, "at": event.at, **event.detail}
    return f"id: {event_id}\nevent: {event.stage.value}\ndata: {json.dumps(data)}\n\n".encode()


async def stream_events(
    request: web.Request,
    *,
    client: redis.asyncio.Redis,
    hub: EventHub,
    session_id: str,
    after: str,
    live: bool,
    keepalive: float,
    stopping: asyncio.Event,
) -> web.StreamResponse:
    """Serve one event stream until a terminal stage, the client leaving, or shutdown."""
    wake = hub.subscribe(session_id)
    try:
        batch = await read_events(client, session_id, after)
        if not batch and not live:
            return web.Response(status=204)  # all delivered, nothing more will come
        return await _serve(
            request,
            client=client,
            session_id=session_id,
            cursor=after,
            batch=batch,
            wake=wake,
            keepalive=keepalive,
            stopping=stopping,
        )
    except ConnectionResetError:
        log.debug("events.client_left", session_id=session_id)
        # The client is gone; nothing can be written to it any more.
        return web.Response(status=499)
    finally:
        hub.unsubscribe(session_id, wake)


async def _serve(
    request: web.Request,
    *,
    client: redis.asyncio.Redis,
    session_id: str,
    cursor: str,
    batch: list[tuple[str, ProgressEvent]],
    wake: asyncio.Event,
    keepalive: float,
    stopping: asyncio.Event,
) -> web.StreamResponse:
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-store",
            "X-Accel-Buffering": "no",
        }
    )
    await response.prepare(request)
    await response.write(f"retry: {RETRY_MILLISECONDS}\n\n".encode())
    while True:
        for event_id, event in batch:
            cursor = event_id
            await response.write(format_event(event_id, event))
            if event.stage in TERMINAL_STAGES:
                return response
        if stopping.is_set():
            return response
        wake.clear()
        if not await _woken(wake, stopping, keepalive):
            await response.write(b": keep-alive\n\n")
        if stopping.is_set():
            return response
        batch = await read_events(client, session_id, cursor)


async def _woken(wake: asyncio.Event, stopping: asyncio.Event, timeout: float) -> bool:
    """Wait for news (True), the stop, or the keep-alive interval (False)."""
    waiters = [asyncio.ensure_future(wake.wait()), asyncio.ensure_future(stopping.wait())]
    done, pending = await asyncio.wait(
        waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
    )
    for task in pending:
        task.cancel()
    return bool(done)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


async def cancel_for_sure(task: asyncio.Task[None], *, limit: float = 5.0) -> None:
    """Cancel ``task`` and wait for it, cancelling again if a library swallowed the first
    request (redis-py's subscribe can on Python 3.11); give up waiting after ``limit``."""
    deadline = asyncio.get_running_loop().time() + limit
    while not task.done():
        task.cancel()
        remaining = deadline - asyncio.get_running_loop().time()
        if remaining <= 0:
            log.warning("task.would_not_stop", task=task.get_name())
            return
        await asyncio.wait({task}, timeout=min(0.5, remaining))
    with contextlib.suppress(asyncio.CancelledError, Exception):
        task.result()
