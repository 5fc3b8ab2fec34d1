"""The ``/_sim`` endpoints: what tests and benchmarks use to steer and observe the simulator.

``/_sim/faults`` reads and changes the injected faults, ``/_sim/stats`` reports objects,
watchers, open consoles and traffic, ``/_sim/history`` sets how far back watches may resume,
``/_sim/timeline`` tells when each VMI's create arrived and when it turned Ready (``timeline``),
and ``/_sim/vmis/{namespace}/{name}/crash`` kills a running guest.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from aiohttp import web

from labvirt.sim.errors import ApiError, bad_request, method_not_allowed, qualified
from labvirt.sim.faults import Controllers, Counters, FaultInjector
from labvirt.sim.rest import json_response, not_found_path
from labvirt.sim.store import Store
from labvirt.sim.timeline import VmiTimeline


class SimControl:
    """The handler of every ``/_sim`` path."""

    def __init__(
        self,
        store: Store,
        *,
        faults: FaultInjector,
        controllers: Controllers | None,
        counters: Counters,
        watch_stream_count: Callable[[], int],
        console_count: Callable[[], int] = lambda: 0,
        timeline: VmiTimeline | None = None,
    ) -> None:
        self._store = store
        self._faults = faults
        self._controllers = controllers
        self._counters = counters
        self._watch_stream_count = watch_stream_count
        self._console_count = console_count
        self._timeline = timeline

    async def handle(self, request: web.Request, parts: list[str]) -> web.Response:
        method = request.method
        if parts == ["faults"]:
            if method == "GET":
                return json_response(self._faults.settings())
            if method == "PUT":
                try:
                    changes = json.loads(await request.read())
                except ValueError as exc:
                    raise bad_request(f"invalid JSON: {exc}") from exc
                return json_response(self._faults.update(changes))
            raise method_not_allowed()
        if parts == ["stats"] and method == "GET":
            return json_response(self._stats())
        if parts == ["timeline"] and method == "GET" and self._timeline is not None:
            return json_response({"vmis": self._timeline.entries()})
        if parts == ["history"] and method == "PUT":
            return json_response(self._set_history(await request.read()))
        if len(parts) == 4 and parts[0] == "vmis" and parts[3] == "crash":
            if method != "POST":
                raise method_not_allowed()
            if self._controllers is None:
                raise ApiError(501, "NotImplemented", "no KubeVirt controllers are running")
            return json_response(self._controllers.crash(parts[1], parts[2]))
        raise not_found_path()

    def _set_history(self, raw: bytes) -> dict[str, Any]:
        try:
            body = json.loads(raw)
            seconds = body.get("seconds")
            max_events = body.get("max_events")
            if seconds is not None:
                seconds = float(seconds)
            if max_events is not None:
                max_events = int(max_events)
        except (ValueError, TypeError, AttributeError) as exc:
            raise bad_request(f"invalid history settings: {exc}") from exc
        self._store.set_history_limit(seconds=seconds, max_events=max_events)
        return {"oldestResourceVersion": str(self._store.oldest_resource_version)}

    def _stats(self) -> dict[str, Any]:
        objects = {
            qualified(r.plural, r.group): sum(1 for _ in self._store.items(r))
            for r in self._store.resources()
        }
        return {
            "resourceVersion": str(self._store.resource_version),
            "oldestResourceVersion": str(self._store.oldest_resource_version),
            "objects": objects,
            "watchers": self._store.watcher_count,
            "watchStreams": self._watch_stream_count(),
            "consoleConnections": self._console_count(),
            "requests": self._counters.requests,
            "injectedErrors": self._counters.injected_errors,
            "droppedWatches": self._counters.dropped_watches,
            "watchesStarted": self._counters.watches_started,
            "errorsByCode": {str(k): v for k, v in sorted(self._counters.by_code.items())},
        }
