"""The HTTP face of the simulator: the Kubernetes REST protocol over aiohttp.

One catch-all route parses Kubernetes paths itself (``/api/v1/...``, ``/apis/{g}/{v}/...``,
namespaced or not) and hands each request to its handler: discovery and OpenAPI (from
``discovery``), the verbs on stored objects (``handlers``), watch streams (``watch``) and the
``/_sim`` endpoints (``control``), KubeVirt's console subresource (``console``), with injected
faults (``faults``) applied on the way in.

The server runs on one asyncio loop and never copies stored objects to read them: they are
immutable once stored, so responses encode them directly and watch streams write the lines
the store encoded once per event.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping
from typing import Any

from aiohttp import web

from labvirt.sim import discovery
from labvirt.sim.console import SUBRESOURCE_GROUP, Consoles, subresource_groups
from labvirt.sim.control import SimControl
from labvirt.sim.core import FIELD_SELECTORS, Core
from labvirt.sim.errors import ApiError, internal_error, method_not_allowed
from labvirt.sim.faults import Controllers, Counters, FaultInjector, Faults
from labvirt.sim.handlers import ResourceHandlers
from labvirt.sim.rest import (
    JSON,
    TRUE_VALUES,
    Target,
    encode,
    json_response,
    negotiate,
    not_found_path,
    status_response,
)
from labvirt.sim.selectors import FieldGetter
from labvirt.sim.store import ResourceType, Store
from labvirt.sim.timeline import REQUEST_RECEIVED, VmiTimeline
from labvirt.sim.watch import WatchSettings, WatchStreams

log = logging.getLogger(__name__)


class ApiServer:
    """Routes each request to its handler; ``make_app`` wires it into an aiohttp application."""

    def __init__(
        self,
        store: Store,
        *,
        core: Core | None = None,
        controllers: Controllers | None = None,
        faults: Faults | None = None,
        watch: WatchSettings | None = None,
        seed: int | None = None,
        field_selectors: Mapping[ResourceType, Mapping[str, FieldGetter]] | None = None,
    ) -> None:
        self._store = store
        self._counters = Counters()
        rng = random.Random(seed)  # one RNG for every fault and timeout: seeded runs repeat
        self._faults = FaultInjector(faults, controllers, rng, self._counters)
        selectors = dict(FIELD_SELECTORS)
        selectors.update(field_selectors or {})
        self._resources = ResourceHandlers(store, core, selectors)
        self._watches = WatchStreams(
            store,
            watch or WatchSettings(),
            faults=self._faults.faults,
            rng=rng,
            counters=self._counters,
            field_selectors=selectors,
        )
        self._consoles = Consoles(store)
        self._timeline = VmiTimeline(store.scheduler.now)
        store.add_listener(self._timeline.on_event)
        self._control = SimControl(
            store,
            faults=self._faults,
            controllers=controllers,
            counters=self._counters,
            watch_stream_count=lambda: self._watches.count,
            console_count=lambda: self._consoles.count,
            timeline=self._timeline,
        )
        self._discovery_cache: dict[tuple[str, ...], bytes] = {}

    def make_app(self) -> web.Application:
        app = web.Application(client_max_size=3 * 1024 * 1024)
        app.router.add_route("*", "/{path:.*}", self.handle)
        app.on_shutdown.append(self._on_shutdown)
        return app

    async def _on_shutdown(self, _app: web.Application) -> None:
        self.close_watches()
        await self._consoles.close_all()

    def close_watches(self) -> None:
        """End every watch stream cleanly (the final chunk is written), e.g. on shutdown."""
        self._watches.close()

    # -- entry point ------------------------------------------------------------------------

    async def handle(self, request: web.Request) -> web.StreamResponse:
        REQUEST_RECEIVED.set(self._store.scheduler.now())  # this request's task only
        path = request.path
        try:
            if path.startswith("/_sim/"):
                return await self._control.handle(
                    request, path[len("/_sim/") :].strip("/").split("/")
                )
            self._counters.requests += 1
            await self._faults.delay()
            parts = [p for p in path.split("/") if p]
            if not parts:
                return json_response(
                    {"paths": ["/api", "/api/v1", "/apis", "/openapi/v3", "/version", "/healthz"]}
                )
            head = parts[0]
            if head == "apis" and len(parts) >= 2 and parts[1] == SUBRESOURCE_GROUP:
                return await self._subresource_request(request, parts)
            if head in ("api", "apis"):
                response = self._discovery(request, parts)
                if response is not None:
                    return response
                return await self._resource_request(request, parts)
            if head == "version" and len(parts) == 1:
                return json_response(discovery.version_info())
            if head == "openapi":
                return self._openapi(parts)
            if head in ("healthz", "readyz", "livez"):
                return web.Response(text="ok")
            raise not_found_path()
        except ApiError as error:
            self._count(error.code)
            return status_response(error)
        except web.HTTPException as exc:  # aiohttp's own refusals, e.g. 413 for a huge body
            self._count(exc.status)
            reason = exc.reason.replace(" ", "")
            return status_response(ApiError(exc.status, reason, exc.text or exc.reason))
        except Exception:
            log.exception("unexpected error serving %s %s", request.method, request.path_qs)
            self._count(500)
            return status_response(internal_error())

    def _count(self, code: int) -> None:
        self._counters.by_code[code] = self._counters.by_code.get(code, 0) + 1

    # -- discovery and OpenAPI --------------------------------------------------------------

    def _cached(self, key: tuple[str, ...], build: Any) -> web.Response:
        body = self._discovery_cache.get(key)
        if body is None:
            doc = build()
            if doc is None:
                raise not_found_path()
            body = encode(doc)
            self._discovery_cache[key] = body
        return web.Response(body=body, content_type=JSON)

    def _discovery(self, request: web.Request, parts: list[str]) -> web.Response | None:
        if request.method != "GET":
            return None
        resources = self._store.resources()
        key = (str(len(resources)), *parts)
        if parts == ["api"]:
            return json_response(discovery.api_versions(request.host))
        if parts == ["apis"]:
            extra = subresource_groups() if self._consoles.enabled else {}
            return self._cached(key, lambda: discovery.api_group_list(resources, extra))
        if parts[0] == "api" and len(parts) == 2:
            return self._cached(key, lambda: discovery.api_resource_list(resources, "", parts[1]))
        if parts[0] == "apis" and len(parts) == 2:
            return self._cached(key, lambda: discovery.api_group(resources, parts[1]))
        if parts[0] == "apis" and len(parts) == 3:
            return self._cached(
                key, lambda: discovery.api_resource_list(resources, parts[1], parts[2])
            )
        return None

    async def _subresource_request(
        self, request: web.Request, parts: list[str]
    ) -> web.StreamResponse:
        """KubeVirt's aggregated ``subresources.kubevirt.io`` API: discovery and the console."""
        if not self._consoles.enabled:
            raise not_found_path()
        document = self._consoles.discovery(parts)
        if document is not None:
            if request.method != "GET":
                raise method_not_allowed()
            return json_response(document)
        self._faults.strike(is_watch=False)
        return await self._consoles.serve(request, parts)

    def _openapi(self, parts: list[str]) -> web.Response:
        resources = self._store.resources()
        key = (str(len(resources)), *parts)
        if parts == ["openapi", "v3"]:
            return self._cached(key, lambda: discovery.openapi_v3_index(resources))
        if len(parts) == 4 and parts[:3] == ["openapi", "v3", "api"]:
            return self._cached(key, lambda: discovery.openapi_v3_document(resources, "", parts[3]))
        if len(parts) == 5 and parts[:3] == ["openapi", "v3", "apis"]:
            return self._cached(
                key, lambda: discovery.openapi_v3_document(resources, parts[3], parts[4])
            )
        # No OpenAPI v2: clients then rely on v3, or on the server's field validation.
        raise not_found_path()

    # -- resources --------------------------------------------------------------------------

    def _target(self, parts: list[str]) -> Target:
        if parts[0] == "api":
            group, version, rest = "", parts[1], parts[2:]
        else:
            if len(parts) < 4:
                raise not_found_path()
            group, version, rest = parts[1], parts[2], parts[3:]
        watch_path = False
        if rest and rest[0] == "watch":
            watch_path, rest = True, rest[1:]
        if not rest:
            raise not_found_path()
        namespace: str | None = None
        if rest[0] == "namespaces" and len(rest) >= 3:
            namespace, rest = rest[1], rest[2:]
        plural, name, sub = rest[0], (rest[1] if len(rest) > 1 else None), rest[2:]
        resource = self._store.resource(group, plural)
        if resource is None or resource.version != version or sub:
            raise not_found_path()
        if namespace is not None and not resource.namespaced:
            raise not_found_path()
        if resource.namespaced and namespace is None and name is not None:
            raise not_found_path()
        return Target(resource, namespace, name, watch_path)

    async def _resource_request(self, request: web.Request, parts: list[str]) -> web.StreamResponse:
        target = self._target(parts)
        query = request.query
        method = request.method
        is_watch = method == "GET" and (
            target.watch_path or query.get("watch", "").lower() in TRUE_VALUES
        )
        drop_watch = self._faults.strike(is_watch=is_watch)
        verbs = target.resource.verbs
        if method == "GET":
            representation = negotiate(request.headers.get("Accept"))
            if is_watch:
                self._require_verb(target, "watch")
                return await self._watches.serve(request, target, representation, drop=drop_watch)
            if target.name is None:
                self._require_verb(target, "list")
                return self._resources.list(target, query, representation)
            return self._resources.get(target, query, representation)
        if target.name is None:
            if method == "POST" and (target.namespace or not target.resource.namespaced):
                self._require_verb(target, "create")
                return await self._resources.create(request, target)
            if method == "DELETE" and "deletecollection" in verbs:
                return await self._resources.delete_collection(request, target)
            raise method_not_allowed()
        if method == "PUT" and "update" in verbs:
            return await self._resources.update(request, target)
        if method == "PATCH" and "patch" in verbs:
            return await self._resources.patch(request, target)
        if method == "DELETE" and "delete" in verbs:
            return await self._resources.delete(request, target)
        raise method_not_allowed()

    @staticmethod
    def _require_verb(target: Target, verb: str) -> None:
        if verb not in target.resource.verbs:
            raise method_not_allowed()


def create_app(server: ApiServer) -> web.Application:
    """The aiohttp application for ``server`` (one wiring function, as the style asks)."""
    return server.make_app()
