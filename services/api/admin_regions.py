"""Regions for operators (admin token): see each region's state, drain one or bring it back.

    GET /v1/admin/regions              every region: location, capacity_vms, vms_in_use, alive
                                       (null: no worker reported it yet), drained
    PUT /v1/admin/regions/<region>     {"drained": bool}: a drained region takes no new
                                       sessions and no new warm environments; what runs there
                                       finishes

Views validate, change the flag in Redis and answer; creates and the prewarmer read it.
"""

from __future__ import annotations

from flask import Blueprint, Response, jsonify
from marshmallow import RAISE, Schema

from services.api.admin_schemas import RegionAnswer, RegionsAnswer
from services.api.context import admin_caller, body, runtime
from services.api.errors import ApiError
from services.api.openapi import OPERATORS, documented
from services.api.schemas import StrictBoolean

admin_regions = Blueprint("admin_regions", __name__)


class RegionUpdate(Schema):
    class Meta:
        unknown = RAISE

    drained = StrictBoolean(required=True)


@admin_regions.get("/v1/admin/regions")
@documented(
    summary="Every region: load and flags", answers={200: RegionsAnswer}, security=OPERATORS
)
def list_regions() -> Response:
    admin_caller()
    rt = runtime()
    answer = {"default_region": rt.settings.default_region, "regions": rt.regions.overview()}
    return jsonify(RegionsAnswer().dump(answer))


@admin_regions.put("/v1/admin/regions/<region>")
@documented(
    summary="Drain a region, or bring it back",
    answers={200: RegionAnswer},
    security=OPERATORS,
    body=RegionUpdate,
    errors={404: "`unknown_region`."},
)
def update_region(region: str) -> Response:
    admin_caller()
    rt = runtime()
    if region not in rt.settings.regions:
        raise ApiError(
            404,
            "unknown_region",
            f"no cluster serves region {region!r}",
            details={"regions": list(rt.settings.regions)},
        )
    data = body(RegionUpdate, require_json=True)
    rt.regions.state.set_drained(region, data["drained"])
    [view] = [o for o in rt.regions.overview() if o.state.name == region]
    return jsonify(RegionAnswer().dump(view))
