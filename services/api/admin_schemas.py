"""Response schemas of the operators' routes (``/v1/admin/...``): the wire contract."""

from __future__ import annotations

from typing import Any, Final

from marshmallow import fields, validate

from services.api.schemas import Answer, SessionAnswer
from shared.adapters.dead_letters import Status
from shared.domain.pools.config import PoolMode

FAILURE_ID_PATTERN: Final = r"^f-[0-9a-f]{20}$"
FAILURE_STATUSES: Final = (Status.FAILED, Status.REQUEUED, Status.RESOLVED)


class PoolConfigAnswer(Answer):
    """A pool's configuration (``PoolConfig``) as operators set it."""

    mode = fields.Enum(PoolMode, by_value=True, required=True)
    size = fields.Integer(required=True, metadata={"description": "static pools: how many"})
    min = fields.Integer(attribute="min_size", required=True)
    max = fields.Integer(attribute="max_size", required=True)
    hit_rate = fields.Float(required=True, metadata={"description": "adaptive pools' goal"})
    paused = fields.Boolean(required=True)


class PoolAnswer(Answer):
    template = fields.String(required=True)
    region = fields.String(required=True)
    mode = fields.Enum(PoolMode, by_value=True, required=True)
    target = fields.Integer(required=True, metadata={"description": "ready environments wanted"})
    ready = fields.Integer(required=True)
    in_flight = fields.Integer(required=True, metadata={"description": "booting now"})
    paused = fields.Boolean(required=True, metadata={"description": "itself or all pools"})
    hit_rate_1h = fields.Float(
        required=True,
        allow_none=True,
        metadata={"description": "share of the last hour's claims served warm (null: none)"},
    )
    config = fields.Nested(PoolConfigAnswer, required=True)


class PoolsAnswer(Answer):
    paused = fields.Boolean(required=True, metadata={"description": "the global pause"})
    pools = fields.List(fields.Nested(PoolAnswer), required=True)


class RegionLocationAnswer(Answer):
    lat = fields.Float(required=True)
    lon = fields.Float(required=True)


class RegionAnswer(Answer):
    """One region (``RegionOverview``): its configuration, load and flags."""

    region = fields.String(attribute="state.name", required=True)
    location = fields.Nested(
        RegionLocationAnswer, attribute="state.location", required=True, allow_none=True
    )
    capacity_vms = fields.Integer(
        attribute="state.capacity_vms",
        required=True,
        allow_none=True,
        metadata={"description": "null: no limit"},
    )
    vms_in_use = fields.Integer(attribute="state.vms_in_use", required=True)
    alive = fields.Boolean(
        attribute="flags.alive",
        required=True,
        allow_none=True,
        metadata={"description": "null: no worker reported the region yet"},
    )
    drained = fields.Boolean(attribute="flags.drained", required=True)


class RegionsAnswer(Answer):
    default_region = fields.String(required=True)
    regions = fields.List(fields.Nested(RegionAnswer), required=True)


class Count(fields.Integer):
    """The length of a list attribute."""

    # marshmallow's signature; the value is all that matters.
    def _serialize(self, value: Any, attr: Any, obj: Any, **kwargs: Any) -> int:  # noqa: ARG002
        return len(value)


class FailureAttemptAnswer(Answer):
    """One entry of a record's history: a failure, or its resolution."""

    at = fields.Float(required=True, metadata={"description": "seconds since the epoch"})
    error = fields.String()
    type = fields.String()
    task_id = fields.String(allow_none=True)
    resolved = fields.Boolean()


class RequeueAnswer(Answer):
    at = fields.Float(required=True, metadata={"description": "seconds since the epoch"})
    by = fields.String(required=True, metadata={"example": "ana (admin 1a2b3c4d)"})


class FailureSummaryAnswer(Answer):
    id = fields.String(required=True, metadata={"pattern": FAILURE_ID_PATTERN})
    task = fields.String(required=True, metadata={"example": "labvirt.provision"})
    status = fields.String(required=True, validate=validate.OneOf(FAILURE_STATUSES))
    error = fields.String(required=True)
    attempts = fields.Integer(required=True)
    first_failed_at = fields.Float(required=True, metadata={"description": "epoch seconds"})
    last_failed_at = fields.Float(required=True, metadata={"description": "epoch seconds"})
    concerns = fields.Dict(
        keys=fields.String(),
        values=fields.String(),
        required=True,
        metadata={"description": "the session, environment or region it concerns"},
    )
    requeues = Count(required=True, metadata={"description": "how often it was requeued"})


class FailurePageAnswer(Answer):
    failed = fields.List(fields.Nested(FailureSummaryAnswer), required=True)
    next_before = fields.Float(
        required=True,
        allow_none=True,
        metadata={"description": "the ``before`` of the next page (null: the last page)"},
    )
    total = fields.Integer(required=True)


class FailureAnswer(Answer):
    """A whole record (``DeadLetter``)."""

    id = fields.String(required=True, metadata={"pattern": FAILURE_ID_PATTERN})
    task = fields.String(required=True)
    payload = fields.Dict(keys=fields.String(), values=fields.String(), required=True)
    error = fields.String(required=True)
    error_type = fields.String(required=True)
    traceback = fields.String(required=True)
    status = fields.String(required=True, validate=validate.OneOf(FAILURE_STATUSES))
    attempts = fields.Integer(required=True)
    first_failed_at = fields.Float(required=True)
    last_failed_at = fields.Float(required=True)
    concerns = fields.Dict(keys=fields.String(), values=fields.String(), required=True)
    history = fields.List(fields.Nested(FailureAttemptAnswer), required=True)
    requeues = fields.List(fields.Nested(RequeueAnswer), required=True)


class RequeuedAnswer(Answer):
    requeued = fields.Boolean(
        required=True, metadata={"description": "false: it already was, and was not again"}
    )
    failed = fields.Nested(FailureAnswer, required=True)


class RequeuedManyAnswer(Answer):
    requeued = fields.List(fields.String(), required=True)
    skipped = fields.List(fields.String(), required=True)


class PurgedAnswer(Answer):
    purged = fields.String(required=True, metadata={"pattern": FAILURE_ID_PATTERN})


class AdminSessionsAnswer(Answer):
    sessions = fields.List(fields.Nested(SessionAnswer), required=True)
    total = fields.Integer(required=True)
