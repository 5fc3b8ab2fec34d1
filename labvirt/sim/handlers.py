"""The verbs on stored objects: get, list, create, update, patch, delete, deletecollection.

Each handler reads its request as the API server does (dry runs, patch types, delete options),
works on the ``Store`` and answers in the negotiated representation. Stored objects are never
copied to be read: they are immutable once stored.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from aiohttp import web

from labvirt.sim import tables
from labvirt.sim.core import MERGE_KEYS, Core
from labvirt.sim.errors import ApiError, bad_request, not_found, unsupported_media_type
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
from labvirt.sim.rest import (
    Representation,
    Target,
    int_param,
    json_response,
    parse_dry_run,
    read_body,
    selectors,
)
from labvirt.sim.selectors import FieldGetter
from labvirt.sim.store import Obj, ResourceType, Store

_PROPAGATION_POLICIES = ("Orphan", "Background", "Foreground")


class ResourceHandlers:
    """The handlers of every verb but watch, for any registered resource type."""

    def __init__(
        self,
        store: Store,
        core: Core | None,
        field_selectors: Mapping[ResourceType, Mapping[str, FieldGetter]],
    ) -> None:
        self._store = store
        self._core = core
        self._field_selectors = field_selectors

    # -- reads ------------------------------------------------------------------------------

    def get(
        self, target: Target, query: Mapping[str, str], representation: Representation
    ) -> web.Response:
        assert target.name is not None
        obj = self._store.peek(target.resource, target.namespace, target.name)
        if obj is None:
            raise not_found(target.resource.plural, target.resource.group, target.name)
        if representation.form == "Table":
            include = tables.parse_include_object(query.get("includeObject"))
            return json_response(
                tables.table(
                    target.resource,
                    [obj],
                    now=self._store.scheduler.now(),
                    include=include,
                    metadata={"resourceVersion": obj["metadata"].get("resourceVersion", "")},
                    api_version=representation.api_version,
                )
            )
        if representation.form == "PartialObjectMetadata":
            return json_response(tables.partial_metadata(obj, representation.api_version))
        return json_response(obj)

    def list(
        self, target: Target, query: Mapping[str, str], representation: Representation
    ) -> web.Response:
        labels, fields = selectors(target, query, self._field_selectors)
        limit = int_param(query, "limit")
        result = self._store.list(
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
                    now=self._store.scheduler.now(),
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

    # -- writes -----------------------------------------------------------------------------

    async def create(self, request: web.Request, target: Target) -> web.Response:
        body = await read_body(request, target.resource)
        dry_run = parse_dry_run(request.query.getall("dryRun", []))
        created = self._store.create(target.resource, target.namespace, body, dry_run=dry_run)
        return json_response(created, 201)

    async def update(self, request: web.Request, target: Target) -> web.Response:
        assert target.name is not None
        body = await read_body(request, target.resource)
        dry_run = parse_dry_run(request.query.getall("dryRun", []))
        updated = self._store.update(
            target.resource, target.namespace, target.name, body, dry_run=dry_run
        )
        return json_response(updated)

    async def patch(self, request: web.Request, target: Target) -> web.Response:
        assert target.name is not None
        resource = target.resource
        content_type = request.content_type
        if content_type not in PATCH_TYPES or (
            content_type == STRATEGIC_MERGE_PATCH and resource.custom
        ):
            raise unsupported_media_type(content_type)
        raw = await request.read()
        dry_run = parse_dry_run(request.query.getall("dryRun", []))
        current = self._store.peek(resource, target.namespace, target.name)
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
            created = self._store.create(resource, target.namespace, applied, dry_run=dry_run)
            return json_response(created, 201)
        if content_type == MERGE_PATCH:
            patched = apply_merge_patch(current, raw)
        elif content_type == JSON_PATCH:
            patched = apply_json_patch(current, raw)
        elif content_type == STRATEGIC_MERGE_PATCH:
            patched = apply_strategic_merge_patch(current, raw, MERGE_KEYS.get(resource, {}))
        else:
            patched = apply_patch(current, raw)
        updated = self._store.update(
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
            grace = int_param(query, "gracePeriodSeconds")
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
        return grace, preconditions, parse_dry_run(dry_values)

    async def delete(self, request: web.Request, target: Target) -> web.Response:
        assert target.name is not None
        grace, preconditions, dry_run = await self._delete_options(request)
        resource = target.resource
        if self._core is not None:
            self._core.check_delete(resource, target.namespace, target.name)
        obj, removed = self._store.delete(
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

    async def delete_collection(self, request: web.Request, target: Target) -> web.Response:
        grace, _, dry_run = await self._delete_options(request)
        labels, fields = selectors(target, request.query, self._field_selectors)
        resource = target.resource
        matches = self._store.list(
            resource, target.namespace, labels=labels, fields=fields, copy_items=False
        )["items"]
        keys = [(o["metadata"].get("namespace"), o["metadata"]["name"]) for o in matches]
        deleted = []
        for namespace, name in keys:
            if self._core is not None:
                self._core.check_delete(resource, namespace, name)
            try:
                obj, _ = self._store.delete(
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
                "metadata": {"resourceVersion": str(self._store.resource_version)},
                "items": deleted,
            }
        )


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
