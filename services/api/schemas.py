"""Request and response schemas of the public API (marshmallow): the wire contract."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from marshmallow import RAISE, Schema, fields, validate

from shared.domain.sessions import Session


class LocationBody(Schema):
    """Where the learner is, in degrees: the nearest region with room is chosen."""

    class Meta:
        unknown = RAISE

    lat = fields.Float(required=True, validate=validate.Range(min=-90, max=90))
    lon = fields.Float(required=True, validate=validate.Range(min=-180, max=180))


class CreateSessionRequest(Schema):
    class Meta:
        unknown = RAISE

    template = fields.String(required=True, validate=validate.Length(min=1, max=63))
    user = fields.String(required=True, validate=validate.Length(min=1, max=128))
    # Where: at most one of an explicit region, a location and a country (ISO 3166 alpha-2).
    region = fields.String(load_default=None, validate=validate.Length(min=1, max=63))
    location = fields.Nested(LocationBody, load_default=None)
    country = fields.String(
        load_default=None,
        validate=validate.Regexp(r"^[A-Za-z]{2}$", error="expected a two-letter country code"),
    )
    # Close the user's live sessions and open a new one, instead of a reconnect or a 409.
    replace = fields.Boolean(load_default=False)


class TokenBody(Schema):
    """Body of the beacon-friendly calls: the session token may travel here, not in a header."""

    class Meta:
        unknown = RAISE

    token = fields.String(load_default=None, validate=validate.Length(min=1, max=256))


def timestamp(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def session_body(session: Session, *, token: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": session.id,
        "user": session.user,
        "template": session.template,
        "region": session.region,
        "state": session.state.value,
        "warm": session.warm,
        "created_at": timestamp(session.created_at),
        "expires_at": timestamp(session.expires_at),
        "idle_expires_at": timestamp(session.idle_expires_at),
        # How far extensions can go (null: the session cannot be extended).
        "hard_expires_at": (
            None if session.hard_expires_at is None else timestamp(session.hard_expires_at)
        ),
        "vms": [vm.to_dict() for vm in session.vms],
        "history": [
            {"state": t.state.value, "at": timestamp(t.at), "reason": t.reason}
            for t in session.history
        ],
    }
    if session.reason is not None:
        body["reason"] = session.reason
    if token is not None:
        body["token"] = token
    return body
