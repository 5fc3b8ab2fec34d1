"""Request and response schemas of the public API (marshmallow): the wire contract."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from marshmallow import INCLUDE, RAISE, Schema, fields, post_dump, validate

from shared.domain.sessions import SessionState
from shared.session_results import Opened

# What ``shared.domain.sessions`` hands out: "s-" and 24 hex digits.
SESSION_ID_PATTERN = r"^s-[0-9a-f]{24}$"


class StrictBoolean(fields.Boolean):
    """JSON true or false only: 1, "yes" or "true" are typos in a request (JSON bodies; a form
    or beacon body carries no booleans)."""

    # marshmallow's signature; only the value matters here.
    def _deserialize(self, value: Any, *args: Any, **kwargs: Any) -> bool:  # noqa: ARG002
        if not isinstance(value, bool):
            raise self.make_error("invalid", input=value)
        return value


class LocationBody(Schema):
    """Where the learner is, in degrees: the nearest region with room is chosen."""

    class Meta:
        unknown = RAISE

    lat = fields.Float(required=True, validate=validate.Range(min=-90, max=90))
    lon = fields.Float(required=True, validate=validate.Range(min=-180, max=180))


class CreateSessionRequest(Schema):
    class Meta:
        unknown = RAISE

    template = fields.String(
        required=True, validate=validate.Length(min=1, max=63), metadata={"example": "ubuntu"}
    )
    user = fields.String(
        required=True,
        validate=validate.Length(min=1, max=128),
        metadata={"description": "the learner, as the platform names them", "example": "alice"},
    )
    # Where: at most one of an explicit region, a location and a country (ISO 3166 alpha-2).
    region = fields.String(load_default=None, validate=validate.Length(min=1, max=63))
    location = fields.Nested(LocationBody, load_default=None)
    country = fields.String(
        load_default=None,
        validate=validate.Regexp(r"[A-Za-z]{2}\Z", error="expected a two-letter country code"),
    )
    # Close the user's live sessions and open a new one, instead of a reconnect or a 409.
    replace = StrictBoolean(load_default=False)


class TokenBody(Schema):
    """Body of the beacon-friendly calls: the session token may travel here, not in a header."""

    class Meta:
        unknown = RAISE

    # The alphabet of session tokens (URL-safe base64); ``\Z`` because Regexp only anchors
    # the start, and ``$`` would let a trailing newline through.
    token = fields.String(
        load_default=None,
        validate=validate.Regexp(
            r"[A-Za-z0-9_-]{1,256}\Z", error="a session token: 1-256 of A-Z a-z 0-9 _ -"
        ),
    )


def timestamp(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


class Answer(Schema):
    """A response body. Dumped, never loaded; answers may gain members, which clients ignore,
    so the document says ``additionalProperties: true``."""

    class Meta:
        unknown = INCLUDE


class Timestamp(fields.DateTime):
    """Seconds since the epoch, answered as RFC 3339 in UTC: ``2026-01-02T03:04:05Z``."""

    # marshmallow's signature; the value is all that matters.
    def _serialize(self, value: Any, attr: Any, obj: Any, **kwargs: Any) -> str | None:  # noqa: ARG002
        return None if value is None else timestamp(float(value))


class VmAnswer(Answer):
    name = fields.String(required=True)
    hostname = fields.String(required=True, metadata={"description": "its name in the session"})
    ip = fields.String(required=True, allow_none=True)
    phase = fields.String(required=True, metadata={"example": "Running"})
    ready = fields.Boolean(required=True)


class TransitionAnswer(Answer):
    state = fields.Enum(SessionState, by_value=True, required=True)
    at = Timestamp(required=True)
    reason = fields.String(required=True, allow_none=True)


class SessionAnswer(Answer):
    """A session as its learner's frontend sees it."""

    # Members left out of the answer rather than sent as null.
    omitted_when_null: tuple[str, ...] = ("reason",)

    id = fields.String(required=True, metadata={"pattern": SESSION_ID_PATTERN})
    user = fields.String(required=True)
    template = fields.String(required=True)
    region = fields.String(required=True)
    state = fields.Enum(SessionState, by_value=True, required=True)
    warm = fields.Boolean(required=True, metadata={"description": "handed out from a warm pool"})
    created_at = Timestamp(required=True)
    expires_at = Timestamp(required=True)
    idle_expires_at = Timestamp(required=True)
    hard_expires_at = Timestamp(
        required=True,
        allow_none=True,
        metadata={"description": "how far extensions can go (null: none allowed)"},
    )
    vms = fields.List(fields.Nested(VmAnswer), required=True)
    history = fields.List(fields.Nested(TransitionAnswer), required=True)
    reason = fields.String(metadata={"description": "why a failed or ended session stopped"})

    @post_dump
    def drop_nulls(self, data: dict[str, Any], **_: Any) -> dict[str, Any]:
        return {k: v for k, v in data.items() if v is not None or k not in self.omitted_when_null}


class OpenedSessionAnswer(SessionAnswer):
    """``POST /v1/sessions``: the session, where it went and why, and its token when new."""

    omitted_when_null = ("reason", "token")
    _OPENING = frozenset({"token", "reconnected", "region_reason"})

    token = fields.String(
        metadata={"description": "the session token, handed out once: in the 201 answer only"}
    )
    reconnected = fields.Boolean(
        required=True, metadata={"description": "true: the user's own session, opened before"}
    )
    region_reason = fields.String(required=True, allow_none=True)

    def get_attribute(self, obj: Opened, attr: str, default: Any) -> Any:
        source = obj if attr in self._OPENING else obj.session
        return super().get_attribute(source, attr, default)


class TicketAnswer(Answer):
    ticket = fields.String(required=True)
    expires_at = Timestamp(required=True)


class TemplateVmAnswer(Answer):
    name = fields.String(required=True)
    hostname = fields.String(required=True)
    cpu_cores = fields.Integer(required=True)
    memory = fields.String(required=True, metadata={"example": "2Gi"})


class TemplateAnswer(Answer):
    """A template with the clocks this deployment runs it with."""

    name = fields.String(required=True)
    description = fields.String(required=True)
    max_lifetime_seconds = fields.Integer(required=True)
    idle_timeout_seconds = fields.Integer(required=True)
    vms = fields.List(fields.Nested(TemplateVmAnswer), required=True)


class TemplatesAnswer(Answer):
    templates = fields.List(fields.Nested(TemplateAnswer), required=True)
    regions = fields.List(fields.String(), required=True)
    default_region = fields.String(required=True)


class HealthAnswer(Answer):
    status = fields.String(required=True, validate=validate.OneOf(["ok"]))
