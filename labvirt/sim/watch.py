"""Watch streams: chunked lines of watch events, bookmarks, timeouts and dropped streams.

The store encodes each event once for every watcher; a stream writes those lines as they are,
re-encoding only when a client asked for Table or PartialObjectMetadata. Streams wait on an
event, not a poll, and all of them end cleanly (with the final chunk) when the server stops.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from labvirt.sim import tables
from labvirt.sim.faults import Counters, Faults
from labvirt.sim.rest import JSON, TRUE_VALUES, Representation, Target, encode, int_param, selectors
from labvirt.sim.selectors import FieldGetter
from labvirt.sim.store import ResourceType, Store, Watcher


@dataclass(frozen=True)
class WatchSettings:
    bookmark_seconds: float = 60.0
    # Without timeoutSeconds a watch lasts between min_timeout and twice that, as upstream.
    min_timeout_seconds: float = 1800.0
    # A dropped watch (injected fault) ends after a random time in this range.
    drop_after_seconds: tuple[float, float] = (0.05, 2.0)


def _drain(watcher: Watcher, transform: Any) -> bytes:
    """Every queued line, as one write."""
    lines = watcher.lines
    batch = b"".join(lines) if transform is None else b"".join(transform(x) for x in lines)
    lines.clear()
    return batch


@dataclass(eq=False)
class _Stream:
    watcher: Watcher
    wake: asyncio.Event


class WatchStreams:
    """Every open watch stream of the server, from its query to its last chunk."""

    def __init__(
        self,
        store: Store,
        settings: WatchSettings,
        *,
        faults: Faults,
        rng: random.Random,
        counters: Counters,
        field_selectors: Mapping[ResourceType, Mapping[str, FieldGetter]],
    ) -> None:
        self._store = store
        self._settings = settings
        self._faults = faults
        self._rng = rng
        self._counters = counters
        self._field_selectors = field_selectors
        self._streams: set[_Stream] = set()
        self._closing = False

    @property
    def count(self) -> int:
        return len(self._streams)

    def close(self) -> None:
        """End every watch stream cleanly (the final chunk is written), e.g. on shutdown."""
        self._closing = True
        for stream in list(self._streams):
            stream.watcher.close()
            stream.wake.set()

    async def serve(
        self,
        request: web.Request,
        target: Target,
        representation: Representation,
        *,
        drop: bool,
    ) -> web.StreamResponse:
        """Stream one watch; ``drop``: an injected error already chose to cut it short."""
        query = request.query
        labels, fields = selectors(target, query, self._field_selectors)
        include = tables.parse_include_object(query.get("includeObject"))
        timeout = int_param(query, "timeoutSeconds")
        settings = self._settings
        if timeout is None or timeout <= 0:
            timeout_s = settings.min_timeout_seconds * (1 + self._rng.random())
        else:
            timeout_s = float(timeout)
        bookmarks = query.get("allowWatchBookmarks", "").lower() in TRUE_VALUES
        resource_version = query.get("resourceVersion") or None
        watcher = self._store.watch(
            target.resource,
            target.namespace,
            labels=labels,
            fields=fields,
            resource_version=resource_version,
        )
        if query.get("sendInitialEvents", "").lower() in TRUE_VALUES and resource_version in (
            None,
            "0",
        ):
            watcher.push(self._initial_events_end(target.resource), self._store.resource_version)
        if not drop and self._faults.watch_drop_rate > 0:
            drop = self._rng.random() < self._faults.watch_drop_rate
        drop_after = None
        if drop:
            self._counters.dropped_watches += 1
            drop_after = self._rng.uniform(*settings.drop_after_seconds)
        self._counters.watches_started += 1
        return await self._stream(
            request,
            target,
            watcher,
            representation,
            include=include,
            timeout=timeout_s,
            bookmarks=bookmarks,
            drop_after=drop_after,
        )

    def _initial_events_end(self, resource: ResourceType) -> bytes:
        return (
            encode(
                {
                    "type": "BOOKMARK",
                    "object": {
                        "apiVersion": resource.api_version,
                        "kind": resource.kind,
                        "metadata": {
                            "resourceVersion": str(self._store.resource_version),
                            "annotations": {"k8s.io/initial-events-end": "true"},
                        },
                    },
                }
            )
            + b"\n"
        )

    async def _stream(
        self,
        request: web.Request,
        target: Target,
        watcher: Watcher,
        representation: Representation,
        *,
        include: str,
        timeout: float,
        bookmarks: bool,
        drop_after: float | None,
    ) -> web.StreamResponse:
        loop = asyncio.get_running_loop()
        response = web.StreamResponse(
            status=200, headers={"Content-Type": JSON, "Cache-Control": "no-cache, private"}
        )
        response.enable_chunked_encoding()
        await response.prepare(request)
        wake = asyncio.Event()
        watcher.notify = wake.set
        stream = _Stream(watcher, wake)
        self._streams.add(stream)
        if self._closing:
            watcher.close()
        started = loop.time()
        # A dropped stream ends early, without the closing bookmark of a normal timeout.
        dropping = drop_after is not None and drop_after < timeout
        deadline = started + (drop_after if drop_after is not None and dropping else timeout)
        interval = self._settings.bookmark_seconds
        next_bookmark = started + interval if bookmarks else math.inf
        transform = self._transformer(target, representation, include)
        timer: asyncio.TimerHandle | None = None
        try:
            while True:
                wake.clear()
                if watcher.lines:
                    await response.write(_drain(watcher, transform))
                    continue
                if watcher.closed:
                    break
                now = loop.time()
                if now >= deadline:
                    if bookmarks and not dropping:
                        await response.write(self._store.bookmark(target.resource))
                    break
                if now >= next_bookmark:
                    watcher.push(
                        self._store.bookmark(target.resource), self._store.resource_version
                    )
                    next_bookmark = now + interval
                    continue
                timer = loop.call_at(min(deadline, next_bookmark), wake.set)
                await wake.wait()
                timer.cancel()
            await response.write_eof()
        except ConnectionError:
            pass  # the client went away: nothing more to say
        finally:
            if timer is not None:
                timer.cancel()
            watcher.close()
            self._streams.discard(stream)
        return response

    def _transformer(self, target: Target, representation: Representation, include: str) -> Any:
        if representation.form == "Object":
            return None
        resource = target.resource
        state = {"headers": True}

        def transform(line: bytes) -> bytes:
            event = json.loads(line)
            if event.get("type") not in ("ADDED", "MODIFIED", "DELETED"):
                return line
            obj = event["object"]
            if representation.form == "Table":
                event["object"] = tables.table(
                    resource,
                    [obj],
                    now=self._store.scheduler.now(),
                    include=include,
                    headers=state["headers"],
                    metadata={"resourceVersion": obj["metadata"].get("resourceVersion", "")},
                    api_version=representation.api_version,
                )
                state["headers"] = False
            else:
                event["object"] = tables.partial_metadata(obj, representation.api_version)
            return encode(event) + b"\n"

        return transform
