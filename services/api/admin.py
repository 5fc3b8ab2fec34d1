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

from flask import Blueprint, Response, jsonify
from marshmallow import RAISE, Schema, ValidationError, fields, validate, validates_schema

from services.api.admin_schemas import PoolAnswer, PoolsAnswer
from services.api.context import admin_caller, body, query, runtime
from services.api.errors import ApiError, invalid_request
from services.api.openapi import OPERATORS, documented
from services.api.pool_budget import check_pool_budget
from services.api.schemas import StrictBoolean
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


class PoolQuery(Schema):
    class Meta:
        unknown = RAISE

    region = fields.String(load_default=None, validate=validate.Length(min=1, max=63))


class GlobalPause(Schema):
    class Meta:
        unknown = RAISE

    paused = StrictBoolean(required=True)


def pool_store(rt: Runtime) -> RedisPoolStore:
    if rt.pools is None:
        raise ApiError(503, "unavailable", "warm pools are not available on this deployment")
    return rt.pools


def require_template(rt: Runtime, template: str) -> None:
    if template not in rt.templates:
        raise ApiError(
            404,
            "unknown_template",
            f"no template named {template!r}",
            details={"templates": sorted(rt.templates)},
        )


def pool_region(rt: Runtime, given: str | None) -> str:
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
    target = config.target(snapshot.target)
    claims, misses = store.counters.last_hour(key, now=rt.clock())
    return {
        "template": key.template,
        "region": key.region,
        "mode": config.mode,
        "target": target,
        "ready": len(snapshot.ready),
        "in_flight": len(snapshot.booting),
        "paused": config.paused or paused_all,
        "hit_rate_1h": hit_rate(claims, misses),
        "config": config,
    }


def pools_body(rt: Runtime, store: RedisPoolStore) -> dict[str, Any]:
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
@documented(summary="Every warm pool", answers={200: PoolsAnswer}, security=OPERATORS)
def list_pools() -> Response:
    admin_caller()
    rt = runtime()
    return jsonify(PoolsAnswer().dump(pools_body(rt, pool_store(rt))))


@admin.put("/v1/admin/pools")
@documented(
    summary="Pause or resume every pool",
    answers={200: PoolsAnswer},
    security=OPERATORS,
    body=GlobalPause,
)
def pause_all_pools() -> Response:
    admin_caller()
    rt = runtime()
    store = pool_store(rt)
    data = body(GlobalPause, require_json=True)
    store.set_globally_paused(data["paused"])
    return jsonify(PoolsAnswer().dump(pools_body(rt, store)))


@admin.put("/v1/admin/pools/<template>")
@documented(
    summary="Size, switch or pause one pool (the default region's unless named)",
    answers={200: PoolAnswer},
    security=OPERATORS,
    body=PoolUpdate,
    query=PoolQuery,
    errors={
        404: "`unknown_template`.",
        422: "`unknown_region`; `pool_budget_exceeded`: the region's pools would hold more VMs"
        " than its budget.",
    },
)
def configure_pool(template: str) -> Response:
    admin_caller()
    rt = runtime()
    store = pool_store(rt)
    require_template(rt, template)
    data = body(PoolUpdate, require_json=True)
    query_region = query(PoolQuery)["region"]
    if query_region and data["region"] and query_region != data["region"]:
        raise invalid_request({"region": ["the query and the body name different regions"]})
    key = PoolKey(pool_region(rt, query_region or data["region"]), template)
    change_pool(rt, store, key, data)
    return jsonify(PoolAnswer().dump(_pool_view(rt, store, key, store.globally_paused())))


def change_pool(rt: Runtime, store: RedisPoolStore, key: PoolKey, data: dict[str, Any]) -> None:
    """Apply a loaded ``PoolUpdate`` to one pool, within the region's pool budget (the
    admin API and the operators' dashboard both change pools through here)."""
    current = store.config(key, default=rt.templates[key.template].pool)
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
        check_pool_budget(rt, store, key, current=current, updated=updated)
        store.set_config(key, updated)
