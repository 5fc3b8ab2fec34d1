"""Warm pools for operators (admin token): see every pool, size it, pause one or all.

    GET /v1/admin/pools                      every (region, template) pool and the global pause
    PUT /v1/admin/pools/<template>[?region=] {"size": N} | {"mode": "adaptive", "min", "max",
                                             "hit_rate"} | {"paused": bool}
    PUT /v1/admin/pools                      {"paused": bool}: every pool at once

Views validate (marshmallow), change the pool's configuration in Redis and answer; the
prewarmer acts on it at its next tick.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, jsonify, request
from marshmallow import RAISE, Schema, ValidationError, fields, validate, validates_schema

from services.api.context import admin_caller, body, runtime
from services.api.errors import ApiError, invalid_request
from shared.adapters.pool_counters import hit_rate
from shared.adapters.pool_store import RedisPoolStore
from shared.domain.pools.config import (
    MAX_HIT_RATE,
    MAX_POOL_SIZE,
    MIN_HIT_RATE,
    InvalidPoolConfig,
    PoolKey,
    PoolMode,
)
from shared.runtime import Runtime

admin = Blueprint("admin", __name__)

_SIZE = validate.Range(min=0, max=MAX_POOL_SIZE)


class StrictBoolean(fields.Boolean):
    """JSON true or false only: 1, "yes" or "true" are typos in an operator's request."""

    # marshmallow's signature; only the value matters here.
    def _deserialize(self, value: Any, *args: Any, **kwargs: Any) -> bool:  # noqa: ARG002
        if not isinstance(value, bool):
            raise self.make_error("invalid", input=value)
        return value


class PoolUpdate(Schema):
    class Meta:
        unknown = RAISE

    region = fields.String(load_default=None, validate=validate.Length(min=1, max=63))
    size = fields.Integer(strict=True, load_default=None, validate=_SIZE)
    mode = fields.String(load_default=None, validate=validate.OneOf([m.value for m in PoolMode]))
    min = fields.Integer(strict=True, load_default=None, validate=_SIZE)
    max = fields.Integer(strict=True, load_default=None, validate=_SIZE)
    hit_rate = fields.Float(
        load_default=None, validate=validate.Range(min=MIN_HIT_RATE, max=MAX_HIT_RATE)
    )
    paused = StrictBoolean(load_default=None)

    @validates_schema
    def one_kind_of_change(self, data: dict[str, Any], **_: Any) -> None:
        changes = {k for k, v in data.items() if v is not None and k != "region"}
        if not changes:
            raise ValidationError("give size, mode (with min, max, hit_rate) or paused")
        adaptive_fields = changes & {"min", "max", "hit_rate"}
        if "size" in changes and (adaptive_fields or data.get("mode") == PoolMode.ADAPTIVE):
            raise ValidationError(
                "size makes a pool static; min, max and hit_rate size an adaptive one"
            )
        if adaptive_fields and data.get("mode") == PoolMode.STATIC:
            raise ValidationError("min, max and hit_rate size adaptive pools, not static ones")


class GlobalPause(Schema):
    class Meta:
        unknown = RAISE

    paused = StrictBoolean(required=True)


def _store(rt: Runtime) -> RedisPoolStore:
    if rt.pools is None:
        raise ApiError(503, "unavailable", "warm pools are not available on this deployment")
    return rt.pools


def _region(rt: Runtime, given: str | None) -> str:
    region = given or rt.settings.default_region
    if region not in rt.settings.regions:
        raise ApiError(
            422,
            "unknown_region",
            f"no cluster serves region {region!r}",
            details={"regions": list(rt.settings.regions)},
        )
    return region


def _pool_view(
    rt: Runtime, store: RedisPoolStore, key: PoolKey, paused_all: bool
) -> dict[str, Any]:
    template = rt.templates[key.template]
    config = store.config(key, default=template.pool)
    snapshot = store.snapshot(key)
    if config.mode is PoolMode.STATIC:
        target = config.size
    else:
        target = snapshot.target if snapshot.target is not None else config.min_size
    claims, misses = store.counters.last_hour(key, now=rt.clock())
    return {
        "template": key.template,
        "region": key.region,
        "mode": config.mode.value,
        "target": target,
        "ready": len(snapshot.ready),
        "in_flight": len(snapshot.booting),
        "paused": config.paused or paused_all,
        "hit_rate_1h": hit_rate(claims, misses),
        "config": config.to_dict(),
    }


def _pools_body(rt: Runtime, store: RedisPoolStore) -> dict[str, Any]:
    paused_all = store.globally_paused()
    return {
        "paused": paused_all,
        "pools": [
            _pool_view(rt, store, PoolKey(region, template), paused_all)
            for region in rt.settings.regions
            for template in sorted(rt.templates)
        ],
    }


@admin.get("/v1/admin/pools")
def list_pools() -> Response:
    admin_caller()
    rt = runtime()
    return jsonify(_pools_body(rt, _store(rt)))


@admin.put("/v1/admin/pools")
def pause_all_pools() -> Response:
    admin_caller()
    rt = runtime()
    store = _store(rt)
    data = body(GlobalPause, require_json=True)
    store.set_globally_paused(data["paused"])
    return jsonify(_pools_body(rt, store))


@admin.put("/v1/admin/pools/<template>")
def configure_pool(template: str) -> Response:
    admin_caller()
    rt = runtime()
    store = _store(rt)
    if template not in rt.templates:
        raise ApiError(
            404,
            "unknown_template",
            f"no template named {template!r}",
            details={"templates": sorted(rt.templates)},
        )
    data = body(PoolUpdate, require_json=True)
    query_region = request.args.get("region") or None
    if query_region and data["region"] and query_region != data["region"]:
        raise invalid_request({"region": ["the query and the body name different regions"]})
    key = PoolKey(_region(rt, query_region or data["region"]), template)
    current = store.config(key, default=rt.templates[template].pool)
    try:
        updated = current.changed(
            size=data["size"],
            mode=PoolMode(data["mode"]) if data["mode"] else None,
            min_size=data["min"],
            max_size=data["max"],
            hit_rate=data["hit_rate"],
            paused=data["paused"],
        )
    except InvalidPoolConfig as exc:
        raise invalid_request({"pool": [str(exc)]}) from exc
    if updated != current:
        store.set_config(key, updated)
    return jsonify(_pool_view(rt, store, key, store.globally_paused()))
