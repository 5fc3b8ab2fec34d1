"""The HTTP face of the simulator: the Kubernetes REST protocol over aiohttp.

One catch-all route parses Kubernetes paths itself (``/api/v1/...``, ``/apis/{g}/{v}/...``,
namespaced or not), then serves every verb against the ``Store``: create, get, list, watch,
update, patch, delete and deletecollection, with Table and PartialObjectMetadata
representations for kubectl. Discovery and OpenAPI come from ``discovery``; the ``/_sim``
endpoints set faults, crash VMIs and report statistics.

The server runs on one asyncio loop and never copies stored objects to read them: they are
immutable once stored, so responses encode them directly and watch streams write the lines
the store encoded once per event.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import yaml
from aiohttp import web

from labvirt.sim import discovery, tables
from labvirt.sim.core import FIELD_SELECTORS, MERGE_KEYS, Core
from labvirt.sim.errors import (
    ApiError,
    bad_request,
    internal_error,
    method_not_allowed,
    not_found,
    qualified,
    service_unavailable,
    too_many_requests,
    unsupported_media_type,
)
from labvirt.sim.patch import (
    APPLY_PATCH,
    JSON_PATCH,
    MERGE_PATCH,
    PATCH_TYPES,
    STRATEGIC_MERGE_PATCH,
    apply_json_patch,
    apply_merge_patch,
    apply_patch,
    apply_strategic_merge_patch,
)
from labvirt.sim.selectors import (
    SUPPORTED_FIELDS,
    FieldSelector,
    LabelSelector,
    parse_field_selector,
    parse_label_selector,
)
from labvirt.sim.store import Obj, ResourceType, Store, Watcher

log = logging.getLogger(__name__)

_JSON = "application/json"
_TRUE = ("true", "1")
_PROPAGATION_POLICIES = ("Orphan", "Background", "Foreground")
# application/octet-stream is what aiohttp reports for a request without Content-Type.
_BODY_TYPES = (_JSON, "application/yaml", "application/x-yaml", "application/octet-stream")


class Controllers(Protocol):
    """What the server needs of the KubeVirt controllers (``labvirt.sim.kubevirt.KubeVirt``)."""

    boot_failure_rate: float

    def crash(self, namespace: str, name: str) -> dict[str, Any]: ...


@dataclass
class Faults:
    """Injected trouble; changed at runtime through ``PUT /_sim/faults``."""

    error_rate: float = 0.0
    latency_ms: float = 0.0
    watch_drop_rate: float = 0.0
    boot_failure_rate: float = 0.0  # mirrored into the controllers, which own it


_FAULT_LIMITS = {
    "error_rate": 1.0,
    "boot_failure_rate": 1.0,
    "watch_drop_rate": 1.0,
    "latency_ms": 60_000.0,
}


@dataclass(frozen=True)
class WatchSettings:
    bookmark_seconds: float = 60.0
    # Without timeoutSeconds a watch lasts between min_timeout and twice that, as upstream.
    min_timeout_seconds: float = 1800.0
    # A dropped watch (injected fault) ends after a random time in this range.
    drop_after_seconds: tuple[float, float] = (0.05, 2.0)


@dataclass(frozen=True)
class Representation:
    form: str = "Object"  # "Object", "Table" or "PartialObjectMetadata"
    version: str = "v1"

    @property
    def api_version(self) -> str:
        return f"meta.k8s.io/{self.version}"


OBJECT = Representation()


def negotiate(accept: str | None) -> Representation:
    """Pick the representation of a GET from an ``Accept`` header, as the API server does."""
    if not accept:
        return OBJECT
    clauses: list[tuple[float, int, str, dict[str, str]]] = []
    for index, raw in enumerate(accept.split(",")):
        media, *raw_params = (part.strip() for part in raw.split(";"))
        params: dict[str, str] = {}
        for param in raw_params:
            key, _, value = param.partition("=")
            params[key.strip().lower()] = value.strip()
        try:
            quality = float(params.pop("q", "1"))
        except ValueError:
            quality = 1.0
        clauses.append((-quality, index, media.lower(), params))
    for _, _, media, params in sorted(clauses):
        if media not in (_JSON, "application/*", "*/*", "application/yaml"):
            continue
        as_kind = params.get("as")
        if as_kind is None:
            return OBJECT
        if params.get("g") == "meta.k8s.io" and params.get("v") in ("v1", "v1beta1"):
            if as_kind == "Table":
                return Representation("Table", params["v"])
            if as_kind in ("PartialObjectMetadata", "PartialObjectMetadataList"):
                return Representation("PartialObjectMetadata", params["v"])
    raise ApiError(
        406,
        "NotAcceptable",
        "only the following media types are accepted: application/json, application/yaml",
    )


@dataclass(frozen=True)
class Target:
    """A parsed resource URL."""

    resource: ResourceType
    namespace: str | None  # None: cluster-scoped, or all namespaces
    name: str | None
    watch_path: bool = False  # the deprecated /watch/ prefix


def encode(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def json_response(obj: Any, status: int = 200) -> web.Response:
    return web.Response(body=encode(obj), status=status, content_type=_JSON)


def status_response(error: ApiError) -> web.Response:
    response = json_response(error.status(), error.code)
    response.headers.update(error.headers)
    return response


def _success(resource: ResourceType, obj: Obj) -> Obj:
    meta = obj.get("metadata", {})
    details = {"name": meta.get("name"), "kind": resource.plural, "uid": meta.get("uid")}
    if resource.group:
        details["group"] = resource.group
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Success",
        "details": details,
    }


def _not_found_path() -> ApiError:
    return ApiError(404, "NotFound", "the server could not find the requested resource", details={})


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


@dataclass
class Counters:
    requests: int = 0
    injected_errors: int = 0
    dropped_watches: int = 0
    watches_started: int = 0
    by_code: dict[int, int] = field(default_factory=dict)


class ApiServer:
    """The request handlers; ``make_app`` wires them into an aiohttp application."""

    def __init__(
        self,
        store: Store,
        *,
        core: Core | None = None,
        controllers: Controllers | None = None,
        faults: Faults | None = None,
        watch: WatchSettings | None = None,
        seed: int | None = None,
        field_selectors: Mapping[ResourceType, Mapping[str, Any]] | None = None,
    ) -> None:
        self.store = store
        self.core = core
        self.controllers = controllers
        if faults is None:
            rate = controllers.boot_failure_rate if controllers is not None else 0.0
            faults = Faults(boot_failure_rate=rate)
        elif controllers is not None:
            controllers.boot_failure_rate = faults.boot_failure_rate
        self.faults = faults
        self.watch_settings = watch or WatchSettings()
        self.counters = Counters()
        self._rng = random.Random(seed)
        self._streams: set[_Stream] = set()
        self._field_selectors = dict(FIELD_SELECTORS)
        self._field_selectors.update(field_selectors or {})
        self._discovery_cache: dict[tuple[str, ...], bytes] = {}
        self._closing = False

    def make_app(self) -> web.Application:
        app = web.Application(client_max_size=3 * 1024 * 1024)
        app.router.add_route("*", "/{path:.*}", self.handle)
        app.on_shutdown.append(self._on_shutdown)
        return app

    async def _on_shutdown(self, _app: web.Application) -> None:
        self.close_watches()

    def close_watches(self) -> None:
        """End every watch stream cleanly (the final chunk is written), e.g. on shutdown."""
        self._closing = True
        for stream in list(self._streams):
            stream.watcher.close()
            stream.wake.set()

    @property
    def watch_stream_count(self) -> int:
        return len(self._streams)

    # -- entry point ------------------------------------------------------------------------

    async def handle(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        try:
            if path.startswith("/_sim/"):
                return await self._sim(request, path[len("/_sim/") :].strip("/").split("/"))
            self.counters.requests += 1
            if self.faults.latency_ms > 0:
                await asyncio.sleep(self.faults.latency_ms / 1000.0)
            parts = [p for p in path.split("/") if p]
            if not parts:
                return json_response(
                    {"paths": ["/api", "/api/v1", "/apis", "/openapi/v3", "/version", "/healthz"]}
                )
            head = parts[0]
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
            raise _not_found_path()
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
        self.counters.by_code[code] = self.counters.by_code.get(code, 0) + 1

    # -- discovery and OpenAPI --------------------------------------------------------------

    def _cached(self, key: tuple[str, ...], build: Any) -> web.Response:
        body = self._discovery_cache.get(key)
        if body is None:
            doc = build()
            if doc is None:
                raise _not_found_path()
            body = encode(doc)
            self._discovery_cache[key] = body
        return web.Response(body=body, content_type=_JSON)

    def _discovery(self, request: web.Request, parts: list[str]) -> web.Response | None:
        if request.method != "GET":
            return None
        resources = self.store.resources()
        key = (str(len(resources)), *parts)
        if parts == ["api"]:
            return json_response(discovery.api_versions(request.host))
        if parts == ["apis"]:
            return self._cached(key, lambda: discovery.api_group_list(resources))
        if parts[0] == "api" and len(parts) == 2:
            return self._cached(key, lambda: discovery.api_resource_list(resources, "", parts[1]))
        if parts[0] == "apis" and len(parts) == 2:
            return self._cached(key, lambda: discovery.api_group(resources, parts[1]))
        if parts[0] == "apis" and len(parts) == 3:
            return self._cached(
                key, lambda: discovery.api_resource_list(resources, parts[1], parts[2])
            )
        return None

    def _openapi(self, parts: list[str]) -> web.Response:
        resources = self.store.resources()
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
        raise _not_found_path()

    # -- resources --------------------------------------------------------------------------

    def _target(self, parts: list[str]) -> Target:
        if parts[0] == "api":
            group, version, rest = "", parts[1], parts[2:]
        else:
            if len(parts) < 4:
                raise _not_found_path()
            group, version, rest = parts[1], parts[2], parts[3:]
        watch_path = False
        if rest and rest[0] == "watch":
            watch_path, rest = True, rest[1:]
        if not rest:
            raise _not_found_path()
        namespace: str | None = None
        if rest[0] == "namespaces" and len(rest) >= 3:
            namespace, rest = rest[1], rest[2:]
        plural, name, sub = rest[0], (rest[1] if len(rest) > 1 else None), rest[2:]
        resource = self.store.resource(group, plural)
        if resource is None or resource.version != version or sub:
            raise _not_found_path()
        if namespace is not None and not resource.namespaced:
            raise _not_found_path()
        if resource.namespaced and namespace is None and name is not None:
            raise _not_found_path()
        return Target(resource, namespace, name, watch_path)

    async def _resource_request(self, request: web.Request, parts: list[str]) -> web.StreamResponse:
        target = self._target(parts)
        query = request.query
        method = request.method
        is_watch = method == "GET" and (
            target.watch_path or query.get("watch", "").lower() in _TRUE
        )
        drop_watch = False
        if self.faults.error_rate > 0 and self._rng.random() < self.faults.error_rate:
            if is_watch and self._rng.random() < 0.5:
                drop_watch = True
            else:
                raise self._injected_error()
        verbs = target.resource.verbs
        if method == "GET":
            representation = negotiate(request.headers.get("Accept"))
            if is_watch:
                self._require_verb(target, "watch")
                return await self._watch(request, target, representation, drop=drop_watch)
            if target.name is None:
                self._require_verb(target, "list")
                return self._list(target, query, representation)
            return self._get(target, query, representation)
        if target.name is None:
            if method == "POST" and (target.namespace or not target.resource.namespaced):
                self._require_verb(target, "create")
                return await self._create(request, target)
            if method == "DELETE" and "deletecollection" in verbs:
                return await self._delete_collection(request, target)
            raise method_not_allowed()
        if method == "PUT" and "update" in verbs:
            return await self._update(request, target)
        if method == "PATCH" and "patch" in verbs:
            return await self._patch(request, target)
        if method == "DELETE" and "delete" in verbs:
            return await self._delete(request, target)
        raise method_not_allowed()

    @staticmethod
    def _require_verb(target: Target, verb: str) -> None:
        if verb not in target.resource.verbs:
            raise method_not_allowed()

    def _injected_error(self) -> ApiError:
        self.counters.injected_errors += 1
        roll = self._rng.random()
        if roll < 0.5:
            return too_many_requests(1)
        if roll < 0.75:
            error = service_unavailable()
            error.headers["Retry-After"] = "1"
            return error
        return internal_error()

    # -- request parsing --------------------------------------------------------------------

    def _selectors(
        self, target: Target, query: Mapping[str, str]
    ) -> tuple[LabelSelector, FieldSelector]:
        labels = parse_label_selector(query.get("labelSelector"))
        supported = self._field_selectors.get(target.resource, SUPPORTED_FIELDS)
        text = query.get("fieldSelector") or ""
        if target.name is not None:  # a watch on one object, as /watch/.../{name} asks
            text = f"{text},metadata.name={target.name}" if text else f"metadata.name={target.name}"
        return labels, parse_field_selector(text, supported)

    @staticmethod
    def _int_param(query: Mapping[str, str], name: str) -> int | None:
        raw = query.get(name)
        if raw is None or raw == "":
            return None
        try:
            return int(raw)
        except ValueError as exc:
            raise bad_request(f'invalid value for {name}: "{raw}": must be an integer') from exc

    @staticmethod
    def _dry_run(values: list[str]) -> bool:
        for value in values:
            if value != "All":
                raise ApiError(422, "Invalid", f'Invalid value: "{value}": valid values are: [All]')
        return bool(values)

    @staticmethod
    async def _body(request: web.Request, resource: ResourceType) -> Obj:
        if request.content_type not in _BODY_TYPES:
            # kubectl's typed clients send protobuf for built-in types; we speak JSON only.
            raise ApiError(
                415,
                "UnsupportedMediaType",
                f"the body of the request was in an unknown format - accepted media types "
                f"include: application/json, application/yaml (got {request.content_type})",
            )
        raw = await request.read()
        try:
            if request.content_type in ("application/yaml", "application/x-yaml"):
                body = yaml.safe_load(raw.decode())
            else:
                body = json.loads(raw)
        except (ValueError, yaml.YAMLError, UnicodeDecodeError) as exc:
            raise bad_request(
                f"the object provided is unrecognized (must be of type {resource.kind}): "
                f"couldn't get version/kind; json parse error: {exc}"
            ) from exc
        if not isinstance(body, dict):
            raise bad_request(
                f"the object provided is unrecognized (must be of type {resource.kind}): "
                "couldn't get version/kind; json parse error: the body is not an object"
            )
        return body

    # -- reads ------------------------------------------------------------------------------

    def _render_one(self, target: Target, obj: Obj, representation: Representation) -> Any:
        if representation.form == "Table":
            return tables.table(
                target.resource,
                [obj],
                now=self.store.scheduler.now(),
                metadata={"resourceVersion": obj["metadata"].get("resourceVersion", "")},
                api_version=representation.api_version,
            )
        if representation.form == "PartialObjectMetadata":
            return tables.partial_metadata(obj, representation.api_version)
        return obj

    def _get(
        self, target: Target, query: Mapping[str, str], representation: Representation
    ) -> web.Response:
        assert target.name is not None
        obj = self.store.peek(target.resource, target.namespace, target.name)
        if obj is None:
            raise not_found(target.resource.plural, target.resource.group, target.name)
        if representation.form == "Table":
            include = tables.parse_include_object(query.get("includeObject"))
            return json_response(
                tables.table(
                    target.resource,
                    [obj],
                    now=self.store.scheduler.now(),
                    include=include,
                    metadata={"resourceVersion": obj["metadata"].get("resourceVersion", "")},
                    api_version=representation.api_version,
                )
            )
        return json_response(self._render_one(target, obj, representation))

    def _list(
        self, target: Target, query: Mapping[str, str], representation: Representation
    ) -> web.Response:
        labels, fields = self._selectors(target, query)
        limit = self._int_param(query, "limit")
        result = self.store.list(
            target.resource,
            target.namespace,
            labels=labels,
            fields=fields,
            limit=limit,
            continue_token=query.get("continue") or None,
            copy_items=False,
        )
        if representation.form == "Table":
            include = tables.parse_include_object(query.get("includeObject"))
            return json_response(
                tables.table(
                    target.resource,
                    result["items"],
                    now=self.store.scheduler.now(),
                    include=include,
                    metadata=result["metadata"],
                    api_version=representation.api_version,
                )
            )
        if representation.form == "PartialObjectMetadata":
            return json_response(
                {
                    "kind": "PartialObjectMetadataList",
                    "apiVersion": representation.api_version,
                    "metadata": result["metadata"],
                    "items": [
                        tables.partial_metadata(o, representation.api_version)
                        for o in result["items"]
                    ],
                }
            )
        return json_response(result)

    # -- watch ------------------------------------------------------------------------------

    async def _watch(
        self,
        request: web.Request,
        target: Target,
        representation: Representation,
        *,
        drop: bool,
    ) -> web.StreamResponse:
        query = request.query
        labels, fields = self._selectors(target, query)
        include = tables.parse_include_object(query.get("includeObject"))
        timeout = self._int_param(query, "timeoutSeconds")
        settings = self.watch_settings
        if timeout is None or timeout <= 0:
            timeout_s = settings.min_timeout_seconds * (1 + self._rng.random())
        else:
            timeout_s = float(timeout)
        bookmarks = query.get("allowWatchBookmarks", "").lower() in _TRUE
        resource_version = query.get("resourceVersion") or None
        watcher = self.store.watch(
            target.resource,
            target.namespace,
            labels=labels,
            fields=fields,
            resource_version=resource_version,
        )
        if query.get("sendInitialEvents", "").lower() in _TRUE and resource_version in (
            None,
            "0",
        ):
            watcher.push(self._initial_events_end(target.resource), self.store.resource_version)
        if not drop and self.faults.watch_drop_rate > 0:
            drop = self._rng.random() < self.faults.watch_drop_rate
        drop_after = None
        if drop:
            self.counters.dropped_watches += 1
            drop_after = self._rng.uniform(*settings.drop_after_seconds)
        self.counters.watches_started += 1
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
                            "resourceVersion": str(self.store.resource_version),
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
            status=200, headers={"Content-Type": _JSON, "Cache-Control": "no-cache, private"}
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
        interval = self.watch_settings.bookmark_seconds
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
                        await response.write(self.store.bookmark(target.resource))
                    break
                if now >= next_bookmark:
                    watcher.push(self.store.bookmark(target.resource), self.store.resource_version)
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
                    now=self.store.scheduler.now(),
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

    # -- writes -----------------------------------------------------------------------------

    async def _create(self, request: web.Request, target: Target) -> web.Response:
        body = await self._body(request, target.resource)
        dry_run = self._dry_run(request.query.getall("dryRun", []))
        created = self.store.create(target.resource, target.namespace, body, dry_run=dry_run)
        return json_response(created, 201)

    async def _update(self, request: web.Request, target: Target) -> web.Response:
        assert target.name is not None
        body = await self._body(request, target.resource)
        dry_run = self._dry_run(request.query.getall("dryRun", []))
        updated = self.store.update(
            target.resource, target.namespace, target.name, body, dry_run=dry_run
        )
        return json_response(updated)

    async def _patch(self, request: web.Request, target: Target) -> web.Response:
        assert target.name is not None
        resource = target.resource
        content_type = request.content_type
        if content_type not in PATCH_TYPES or (
            content_type == STRATEGIC_MERGE_PATCH and resource.custom
        ):
            raise unsupported_media_type(content_type)
        raw = await request.read()
        dry_run = self._dry_run(request.query.getall("dryRun", []))
        current = self.store.peek(resource, target.namespace, target.name)
        if current is None:
            if content_type != APPLY_PATCH:
                raise not_found(resource.plural, resource.group, target.name)
            applied = apply_patch(None, raw)
            applied.setdefault("metadata", {})
            if applied["metadata"].get("name", target.name) != target.name:
                raise bad_request(
                    f"the name of the object ({applied['metadata']['name']}) does not match "
                    f"the name on the URL ({target.name})"
                )
            applied["metadata"]["name"] = target.name
            created = self.store.create(resource, target.namespace, applied, dry_run=dry_run)
            return json_response(created, 201)
        if content_type == MERGE_PATCH:
            patched = apply_merge_patch(current, raw)
        elif content_type == JSON_PATCH:
            patched = apply_json_patch(current, raw)
        elif content_type == STRATEGIC_MERGE_PATCH:
            patched = apply_strategic_merge_patch(current, raw, MERGE_KEYS.get(resource, {}))
        else:
            patched = apply_patch(current, raw)
        updated = self.store.update(
            resource,
            target.namespace,
            target.name,
            patched,
            require_resource_version=False,
            dry_run=dry_run,
        )
        return json_response(updated)

    async def _delete_options(self, request: web.Request) -> tuple[int | None, Obj | None, bool]:
        query = request.query
        options: Obj = {}
        if request.can_read_body:
            raw = await request.read()
            if raw.strip():
                try:
                    options = json.loads(raw)
                except ValueError as exc:
                    raise bad_request(f"error decoding DeleteOptions: {exc}") from exc
                if not isinstance(options, dict):
                    raise bad_request("error decoding DeleteOptions: not an object")
        grace = options.get("gracePeriodSeconds")
        if grace is None:
            grace = self._int_param(query, "gracePeriodSeconds")
        if grace is not None and (not isinstance(grace, int) or isinstance(grace, bool)):
            raise bad_request(f"invalid gracePeriodSeconds: {grace!r}")
        policy = options.get("propagationPolicy") or query.get("propagationPolicy")
        if policy is not None and policy not in _PROPAGATION_POLICIES:
            raise ApiError(
                422,
                "Invalid",
                f'DeleteOptions.meta.k8s.io "" is invalid: propagationPolicy: Unsupported value: '
                f'"{policy}": supported values: "Foreground", "Background", "Orphan", "nil"',
            )
        dry_values = options.get("dryRun") or request.query.getall("dryRun", [])
        if not isinstance(dry_values, list):
            raise bad_request("dryRun must be a list")
        preconditions = options.get("preconditions")
        if preconditions is not None and not isinstance(preconditions, dict):
            raise bad_request("preconditions must be an object")
        return grace, preconditions, self._dry_run(dry_values)

    async def _delete(self, request: web.Request, target: Target) -> web.Response:
        assert target.name is not None
        grace, preconditions, dry_run = await self._delete_options(request)
        resource = target.resource
        if self.core is not None:
            self.core.check_delete(resource, target.namespace, target.name)
        obj, removed = self.store.delete(
            resource,
            target.namespace,
            target.name,
            grace_period_seconds=grace,
            preconditions=preconditions,
            dry_run=dry_run,
        )
        if removed and not resource.returns_deleted_object:
            return json_response(_success(resource, obj))
        return json_response(obj)

    async def _delete_collection(self, request: web.Request, target: Target) -> web.Response:
        grace, _, dry_run = await self._delete_options(request)
        labels, fields = self._selectors(target, request.query)
        resource = target.resource
        matches = self.store.list(
            resource, target.namespace, labels=labels, fields=fields, copy_items=False
        )["items"]
        keys = [(o["metadata"].get("namespace"), o["metadata"]["name"]) for o in matches]
        deleted = []
        for namespace, name in keys:
            if self.core is not None:
                self.core.check_delete(resource, namespace, name)
            try:
                obj, _ = self.store.delete(
                    resource, namespace, name, grace_period_seconds=grace, dry_run=dry_run
                )
            except ApiError as error:
                if error.code == 404:  # gone meanwhile (a finalizer ran): nothing to do
                    continue
                raise
            deleted.append(obj)
        return json_response(
            {
                "kind": resource.list_kind,
                "apiVersion": resource.api_version,
                "metadata": {"resourceVersion": str(self.store.resource_version)},
                "items": deleted,
            }
        )

    # -- /_sim ------------------------------------------------------------------------------

    async def _sim(self, request: web.Request, parts: list[str]) -> web.Response:
        method = request.method
        if parts == ["faults"]:
            if method == "GET":
                return json_response(self.fault_settings())
            if method == "PUT":
                try:
                    changes = json.loads(await request.read())
                except ValueError as exc:
                    raise bad_request(f"invalid JSON: {exc}") from exc
                return json_response(self.set_faults(changes))
            raise method_not_allowed()
        if parts == ["stats"] and method == "GET":
            return json_response(self.stats())
        if parts == ["history"] and method == "PUT":
            return json_response(self._set_history(await request.read()))
        if len(parts) == 4 and parts[0] == "vmis" and parts[3] == "crash":
            if method != "POST":
                raise method_not_allowed()
            if self.controllers is None:
                raise ApiError(501, "NotImplemented", "no KubeVirt controllers are running")
            return json_response(self.controllers.crash(parts[1], parts[2]))
        raise _not_found_path()

    def fault_settings(self) -> dict[str, float]:
        if self.controllers is not None:
            self.faults.boot_failure_rate = self.controllers.boot_failure_rate
        return {
            "error_rate": self.faults.error_rate,
            "boot_failure_rate": self.faults.boot_failure_rate,
            "latency_ms": self.faults.latency_ms,
            "watch_drop_rate": self.faults.watch_drop_rate,
        }

    def set_faults(self, changes: Any) -> dict[str, float]:
        """Validate all of a partial update, then apply it; 400 and no change when invalid."""
        if not isinstance(changes, dict):
            raise bad_request("faults must be a JSON object")
        validated: dict[str, float] = {}
        for key, value in changes.items():
            if key not in _FAULT_LIMITS:
                raise bad_request(
                    f"unknown fault {key!r}: expected one of {', '.join(sorted(_FAULT_LIMITS))}"
                )
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not math.isfinite(value)
                or not 0 <= value <= _FAULT_LIMITS[key]
            ):
                raise bad_request(
                    f"invalid {key}: {value!r}: must be a number between 0 and "
                    f"{_FAULT_LIMITS[key]:g}"
                )
            validated[key] = float(value)
        for key, value in validated.items():
            setattr(self.faults, key, value)
        if "boot_failure_rate" in validated and self.controllers is not None:
            self.controllers.boot_failure_rate = validated["boot_failure_rate"]
        return self.fault_settings()

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
        self.store.set_history_limit(seconds=seconds, max_events=max_events)
        return {"oldestResourceVersion": str(self.store.oldest_resource_version)}

    def stats(self) -> dict[str, Any]:
        objects = {
            qualified(r.plural, r.group): sum(1 for _ in self.store.items(r))
            for r in self.store.resources()
        }
        return {
            "resourceVersion": str(self.store.resource_version),
            "oldestResourceVersion": str(self.store.oldest_resource_version),
            "objects": objects,
            "watchers": self.store.watcher_count,
            "watchStreams": len(self._streams),
            "requests": self.counters.requests,
            "injectedErrors": self.counters.injected_errors,
            "droppedWatches": self.counters.dropped_watches,
            "watchesStarted": self.counters.watches_started,
            "errorsByCode": {str(k): v for k, v in sorted(self.counters.by_code.items())},
        }


def create_app(server: ApiServer) -> web.Application:
    """The aiohttp application for ``server`` (one wiring function, as the style asks)."""
    return server.make_app()
