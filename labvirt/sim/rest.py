"""The pieces of the Kubernetes REST protocol that every handler of the simulator shares.

Content negotiation (Object, Table or PartialObjectMetadata), parsed resource URLs, query
parameters and request bodies as the API server reads them, and JSON and ``Status`` answers.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import yaml
from aiohttp import web

from labvirt.sim.errors import ApiError, bad_request
from labvirt.sim.selectors import (
    SUPPORTED_FIELDS,
    FieldGetter,
    FieldSelector,
    LabelSelector,
    parse_field_selector,
    parse_label_selector,
)
from labvirt.sim.store import Obj, ResourceType

JSON = "application/json"
TRUE_VALUES = ("true", "1")
# application/octet-stream is what aiohttp reports for a request without Content-Type.
_BODY_TYPES = (JSON, "application/yaml", "application/x-yaml", "application/octet-stream")


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
        if media not in (JSON, "application/*", "*/*", "application/yaml"):
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
    return web.Response(body=encode(obj), status=status, content_type=JSON)


def status_response(error: ApiError) -> web.Response:
    response = json_response(error.status(), error.code)
    response.headers.update(error.headers)
    return response


def not_found_path() -> ApiError:
    return ApiError(404, "NotFound", "the server could not find the requested resource", details={})


def selectors(
    target: Target,
    query: Mapping[str, str],
    field_selectors: Mapping[ResourceType, Mapping[str, FieldGetter]],
) -> tuple[LabelSelector, FieldSelector]:
    labels = parse_label_selector(query.get("labelSelector"))
    supported = field_selectors.get(target.resource, SUPPORTED_FIELDS)
    text = query.get("fieldSelector") or ""
    if target.name is not None:  # a watch on one object, as /watch/.../{name} asks
        text = f"{text},metadata.name={target.name}" if text else f"metadata.name={target.name}"
    return labels, parse_field_selector(text, supported)


def int_param(query: Mapping[str, str], name: str) -> int | None:
    raw = query.get(name)
    if raw is None or raw == "":
        return None
    try:
        return int(raw)
    except ValueError as exc:
        raise bad_request(f'invalid value for {name}: "{raw}": must be an integer') from exc


def parse_dry_run(values: list[str]) -> bool:
    for value in values:
        if value != "All":
            raise ApiError(422, "Invalid", f'Invalid value: "{value}": valid values are: [All]')
    return bool(values)


async def read_body(request: web.Request, resource: ResourceType) -> Obj:
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
