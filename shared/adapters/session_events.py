"""A session's progress events in a Redis Stream: appended by every service, read by the API.

One stream per session (``XADD ... MAXLEN ~``), so the log stays short and goes away with the
session. The stream id is the event id: a client that reconnects with ``Last-Event-ID`` reads on
from exactly there (``XREAD`` after an id), so nothing is missed or repeated.
"""

from __future__ import annotations

import re
from typing import Any, Final, cast

import redis

from shared.adapters.hash_tags import session_tag
from shared.domain.lifecycle import ProgressEvent

PREFIX: Final = "labvirt"
# A session's whole life is a few dozen events; the cap only guards against a runaway writer.
STREAM_MAXLEN: Final = 200
# A live session's stream outlives its last event by this (sessions are far shorter); the
# transaction that ends the session cuts it to the ended retention (``session_store``).
STREAM_RETENTION_SECONDS: Final = 24 * 3600
START: Final = "0-0"
# Every append is also announced here (the session id), so a gateway follows thousands of
# streams with one subscription instead of one blocked XREAD each.
NOTIFY_CHANNEL: Final = f"{PREFIX}:events-appended"
_STREAM_ID: Final = re.compile(r"[0-9]{1,20}-[0-9]{1,20}")


def events_key(session_id: str) -> str:
    """In the session's hash slot: appended to in the same MULTI as the session's document."""
    return f"{PREFIX}:events:{session_tag(session_id)}:{session_id}"


def is_event_id(text: str) -> bool:
    return _STREAM_ID.fullmatch(text) is not None


def append(pipe: Any, session_id: str, event: ProgressEvent) -> None:
    """Queue the append on ``pipe`` (a client or a MULTI), e.g. beside the change it reports;
    ``notify`` once it is in."""
    key = events_key(session_id)
    pipe.xadd(key, event.to_fields(), maxlen=STREAM_MAXLEN, approximate=True)
    pipe.expire(key, STREAM_RETENTION_SECONDS)


def notify(client: Any, session_id: str) -> None:
    """Wake the gateways that follow ``session_id``: after the commit, not inside it (PUBLISH
    names no key, so a cluster-aware client refuses it in a transaction). A notice lost to a
    crash right before it costs a stream one keep-alive interval: streams read anyway."""
    client.publish(NOTIFY_CHANNEL, session_id)


class SessionEvents:
    def __init__(self, client: redis.Redis) -> None:
        self._redis = client

    def emit(self, session_id: str, event: ProgressEvent) -> None:
        pipe = self._redis.pipeline(transaction=True)
        append(pipe, session_id, event)
        pipe.execute()
        notify(self._redis, session_id)

    def read(
        self, session_id: str, *, after: str = START, block_seconds: float | None = None
    ) -> list[tuple[str, ProgressEvent]]:
        """Events after ``after``, oldest first; waits up to ``block_seconds`` for the first."""
        block = None if block_seconds is None else max(1, int(block_seconds * 1000))
        answer = self._redis.xread({events_key(session_id): after}, count=100, block=block)
        events: list[tuple[str, ProgressEvent]] = []
        for _stream, entries in cast(list[Any], answer or []):
            for entry_id, fields in entries:
                decoded = {_text(k): _text(v) for k, v in fields.items()}
                events.append((_text(entry_id), ProgressEvent.from_fields(decoded)))
        return events

    def history(self, session_id: str) -> list[tuple[str, ProgressEvent]]:
        """Every event still kept for the session (tests and debugging)."""
        entries = self._redis.xrange(events_key(session_id))
        return [
            (_text(entry_id), ProgressEvent.from_fields({_text(k): _text(v) for k, v in f.items()}))
            for entry_id, f in cast(list[Any], entries)
        ]


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
