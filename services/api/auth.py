"""The API's side of credentials: the bearer token of a Flask request (``shared.credentials``
judges it)."""

from __future__ import annotations

from flask import Request

from shared.credentials import Caller, Role, identify, parse_bearer

__all__ = ["Caller", "Role", "bearer_token", "identify"]


def bearer_token(request: Request) -> str | None:
    return parse_bearer(request.headers.get("Authorization", ""))
