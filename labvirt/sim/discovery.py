"""Discovery and OpenAPI documents, built from the resource types a store has registered.

Legacy discovery only (``/api``, ``/apis``, per group-version resource lists): clients that ask
for aggregated discovery get plain ``application/json`` and fall back, as against an older
server. OpenAPI v3 is served per group-version with ``x-kubernetes-group-version-kind`` on
each schema and operation, and a ``fieldValidation`` parameter on PATCH, which tells kubectl to
let the server validate instead of downloading the (protobuf-only) OpenAPI v2 document.
Schemas are permissive objects: the simulator's admission does the real validation.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Iterable, Mapping
from typing import Any

from labvirt.sim.store import ResourceType

KUBERNETES_VERSION = "v1.32.0"

_MERGE_PATCH_TYPES = (
    "application/json-patch+json",
    "application/merge-patch+json",
    "application/apply-patch+yaml",
)


def version_info() -> dict[str, str]:
    major, minor, _ = KUBERNETES_VERSION.lstrip("v").split(".")
    return {
        "major": major,
        "minor": minor,
        "gitVersion": f"{KUBERNETES_VERSION}+labvirt-sim",
        "gitCommit": "0000000000000000000000000000000000000000",
        "gitTreeState": "clean",
        "buildDate": "2025-01-01T00:00:00Z",
        "goVersion": "go1.23.4",
        "compiler": "gc",
        "platform": "linux/amd64",
    }


def _group_versions(resources: Iterable[ResourceType]) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for resource in resources:
        versions = groups.setdefault(resource.group, [])
        if resource.version not in versions:
            versions.append(resource.version)
    return groups


def api_versions(server_address: str) -> dict[str, Any]:
    """``GET /api``."""
    return {
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [
            {"clientCIDR": "0.0.0.0/0", "serverAddress": server_address}
        ],
    }


def _group(name: str, versions: list[str]) -> dict[str, Any]:
    entries = [{"groupVersion": f"{name}/{v}", "version": v} for v in versions]
    return {"name": name, "versions": entries, "preferredVersion": entries[0]}


def api_group_list(
    resources: Iterable[ResourceType], extra: Mapping[str, list[str]] | None = None
) -> dict[str, Any]:
    """``GET /apis``: every named group (the core group lives under ``/api``), plus ``extra``
    groups served without stored types (KubeVirt's subresources)."""
    groups = _group_versions(resources)
    groups.update(extra or {})
    return {
        "kind": "APIGroupList",
        "apiVersion": "v1",
        "groups": [_group(name, versions) for name, versions in sorted(groups.items()) if name],
    }


def api_group(resources: Iterable[ResourceType], group: str) -> dict[str, Any] | None:
    """``GET /apis/{group}``."""
    versions = _group_versions(resources).get(group)
    if not group or not versions:
        return None
    return {"kind": "APIGroup", "apiVersion": "v1", **_group(group, versions)}


def _storage_hash(resource: ResourceType) -> str:
    digest = hashlib.sha256(f"{resource.api_version}/{resource.kind}".encode()).digest()
    return base64.b64encode(digest[:8]).decode()


def api_resource_list(
    resources: Iterable[ResourceType], group: str, version: str
) -> dict[str, Any] | None:
    """``GET /api/v1`` or ``GET /apis/{group}/{version}``."""
    selected = [r for r in resources if r.group == group and r.version == version]
    if not selected:
        return None
    entries = []
    for resource in sorted(selected, key=lambda r: r.plural):
        entry: dict[str, Any] = {
            "name": resource.plural,
            "singularName": resource.singular,
            "namespaced": resource.namespaced,
            "kind": resource.kind,
            "verbs": list(resource.verbs),
            "storageVersionHash": _storage_hash(resource),
        }
        if resource.short_names:
            entry["shortNames"] = list(resource.short_names)
        if resource.categories:
            entry["categories"] = list(resource.categories)
        entries.append(entry)
    return {
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": f"{group}/{version}" if group else version,
        "resources": entries,
    }


# -- OpenAPI v3 ---------------------------------------------------------------------------------


def _gv_path(group: str, version: str) -> str:
    return f"apis/{group}/{version}" if group else f"api/{version}"


def schema_name(resource: ResourceType, kind: str | None = None) -> str:
    """``io.k8s.api.core.v1.Service``, ``io.kubevirt.v1.VirtualMachineInstance``."""
    kind = kind or resource.kind
    if resource.custom:
        reversed_group = ".".join(reversed(resource.group.split(".")))
        return f"{reversed_group}.{resource.version}.{kind}"
    short_group = resource.group.split(".")[0] if resource.group else "core"
    return f"io.k8s.api.{short_group}.{resource.version}.{kind}"


def _gvk(resource: ResourceType, kind: str | None = None) -> dict[str, str]:
    return {"group": resource.group, "version": resource.version, "kind": kind or resource.kind}


def _query(name: str, description: str, type_: str = "string") -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "description": description,
        "schema": {"type": type_, "uniqueItems": True},
    }


_PATH_NAME = {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}
_PATH_NAMESPACE = {
    "name": "namespace",
    "in": "path",
    "required": True,
    "schema": {"type": "string"},
}
_WRITE_PARAMS = [
    _query("dryRun", "When present, indicates that modifications should not be persisted."),
    _query("fieldManager", "fieldManager is a name associated with the actor making changes."),
    _query(
        "fieldValidation",
        "fieldValidation instructs the server on how to handle objects "
        "in the request containing unknown or duplicate fields.",
    ),
]
_LIST_PARAMS = [
    _query("allowWatchBookmarks", "requests watch events with type BOOKMARK.", "boolean"),
    _query("continue", "The continue option should be set when retrieving more results."),
    _query("fieldSelector", "A selector to restrict the list of returned objects by fields."),
    _query("labelSelector", "A selector to restrict the list of returned objects by labels."),
    _query("limit", "limit is a maximum number of responses to return.", "integer"),
    _query(
        "resourceVersion",
        "Sets a constraint on what resource versions a request may be served from.",
    ),
    _query("timeoutSeconds", "Timeout for the list/watch call.", "integer"),
    _query("watch", "Watch for changes to the described resources.", "boolean"),
]


def _content(ref: str, types: Iterable[str] = ("application/json",)) -> dict[str, Any]:
    return {t: {"schema": {"$ref": ref}} for t in types}


def _operation(
    resource: ResourceType,
    action: str,
    operation_id: str,
    ref: str,
    *,
    params: list[dict[str, Any]] | None = None,
    body_types: Iterable[str] | None = None,
    status: str = "200",
) -> dict[str, Any]:
    op: dict[str, Any] = {
        "tags": [resource.api_version.replace("/", "_")],
        "description": f"{action} {resource.kind}",
        "operationId": operation_id,
        "parameters": params or [],
        "responses": {
            status: {"description": "OK", "content": _content(ref)},
            "401": {"description": "Unauthorized"},
        },
        "x-kubernetes-action": action,
        "x-kubernetes-group-version-kind": _gvk(resource),
    }
    if body_types is not None:
        op["requestBody"] = {"content": _content(ref, body_types), "required": True}
    return op


def _paths(resource: ResourceType) -> dict[str, Any]:
    base = "/" + _gv_path(resource.group, resource.version)
    ref = f"#/components/schemas/{schema_name(resource)}"
    list_ref = f"#/components/schemas/{schema_name(resource, resource.list_kind)}"
    status_ref = "#/components/schemas/io.k8s.apimachinery.pkg.apis.meta.v1.Status"
    kind = resource.kind
    scope = "Namespaced" if resource.namespaced else ""
    # Strategic merge is accepted for built-in types but not advertised: kubectl would then
    # compute the patch from these permissive schemas (and warn); without it, it uses its own.
    patch_types = list(_MERGE_PATCH_TYPES)
    item_params = [_PATH_NAME, *([_PATH_NAMESPACE] if resource.namespaced else [])]
    collection = (
        f"{base}/namespaces/{{namespace}}/{resource.plural}"
        if resource.namespaced
        else f"{base}/{resource.plural}"
    )
    paths: dict[str, Any] = {
        collection: {
            "parameters": [_PATH_NAMESPACE] if resource.namespaced else [],
            "get": _operation(
                resource, "list", f"list{scope}{kind}", list_ref, params=_LIST_PARAMS
            ),
            "post": _operation(
                resource,
                "post",
                f"create{scope}{kind}",
                ref,
                params=_WRITE_PARAMS,
                body_types=["application/json"],
                status="201",
            ),
            "delete": _operation(
                resource,
                "deletecollection",
                f"deleteCollection{scope}{kind}",
                status_ref,
                params=_LIST_PARAMS,
            ),
        },
        f"{collection}/{{name}}": {
            "parameters": item_params,
            "get": _operation(resource, "get", f"read{scope}{kind}", ref),
            "put": _operation(
                resource,
                "put",
                f"replace{scope}{kind}",
                ref,
                params=_WRITE_PARAMS,
                body_types=["application/json"],
            ),
            "patch": _operation(
                resource,
                "patch",
                f"patch{scope}{kind}",
                ref,
                params=[
                    *_WRITE_PARAMS,
                    _query("force", 'Force is going to "force" Apply requests.', "boolean"),
                ],
                body_types=patch_types,
            ),
            "delete": _operation(
                resource, "delete", f"delete{scope}{kind}", ref, params=_WRITE_PARAMS
            ),
        },
    }
    if resource.namespaced:
        paths[f"{base}/{resource.plural}"] = {
            "get": _operation(
                resource, "list", f"list{kind}ForAllNamespaces", list_ref, params=_LIST_PARAMS
            ),
        }
    return paths


def _object_schema(resource: ResourceType, kind: str, description: str) -> dict[str, Any]:
    return {
        "description": description,
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": True,
        "x-kubernetes-group-version-kind": [_gvk(resource, kind)],
    }


def openapi_v3_index(resources: Iterable[ResourceType]) -> dict[str, Any]:
    """``GET /openapi/v3``: one entry per group-version, with a content hash in the URL."""
    resources = list(resources)
    paths: dict[str, Any] = {}
    for group, versions in sorted(_group_versions(resources).items()):
        for version in versions:
            path = _gv_path(group, version)
            doc = openapi_v3_document(resources, group, version) or {}
            digest = hashlib.sha512(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:32]
            paths[path] = {"serverRelativeURL": f"/openapi/v3/{path}?hash={digest.upper()}"}
    return {"paths": paths}


def openapi_v3_document(
    resources: Iterable[ResourceType], group: str, version: str
) -> dict[str, Any] | None:
    """``GET /openapi/v3/api/v1`` or ``/openapi/v3/apis/{group}/{version}``."""
    selected = [r for r in resources if r.group == group and r.version == version]
    if not selected:
        return None
    paths: dict[str, Any] = {}
    schemas: dict[str, Any] = {
        "io.k8s.apimachinery.pkg.apis.meta.v1.Status": {
            "description": "Status is a return value for calls that don't return other objects.",
            "type": "object",
            "x-kubernetes-group-version-kind": [{"group": "", "version": "v1", "kind": "Status"}],
        },
    }
    for resource in sorted(selected, key=lambda r: r.plural):
        paths.update(_paths(resource))
        schemas[schema_name(resource)] = _object_schema(
            resource, resource.kind, f"{resource.kind} ({resource.api_version})"
        )
        schemas[schema_name(resource, resource.list_kind)] = _object_schema(
            resource, resource.list_kind, f"{resource.list_kind} is a list of {resource.kind}"
        )
    return {
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes", "version": KUBERNETES_VERSION},
        "paths": paths,
        "components": {"schemas": schemas},
    }
