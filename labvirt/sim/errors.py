"""Kubernetes ``Status`` errors, raised anywhere in the simulator and rendered by the server."""

from __future__ import annotations

from typing import Any


class ApiError(Exception):
    """An API failure that the server answers with a ``Status`` object."""

    def __init__(
        self,
        code: int,
        reason: str,
        message: str,
        *,
        details: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.details = details
        self.headers = headers or {}

    def status(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        }
        if self.details is not None:
            body["details"] = self.details
        return body


def _details(name: str | None, group: str, kind: str, **extra: Any) -> dict[str, Any]:
    details: dict[str, Any] = {"kind": kind}
    if name is not None:
        details["name"] = name
    if group:
        details["group"] = group
    details.update(extra)
    return details


def qualified(plural: str, group: str) -> str:
    """``virtualmachineinstances.kubevirt.io``, or ``services`` for the core group."""
    return f"{plural}.{group}" if group else plural


def not_found(plural: str, group: str, name: str) -> ApiError:
    return ApiError(
        404,
        "NotFound",
        f'{qualified(plural, group)} "{name}" not found',
        details=_details(name, group, plural),
    )


def already_exists(plural: str, group: str, name: str) -> ApiError:
    return ApiError(
        409,
        "AlreadyExists",
        f'{qualified(plural, group)} "{name}" already exists',
        details=_details(name, group, plural),
    )


def conflict(plural: str, group: str, name: str) -> ApiError:
    return ApiError(
        409,
        "Conflict",
        f'Operation cannot be fulfilled on {qualified(plural, group)} "{name}": '
        "the object has been modified; please apply your changes to the latest version "
        "and try again",
        details=_details(name, group, plural),
    )


def invalid(
    kind: str,
    group: str,
    name: str | None,
    causes: list[dict[str, str]],
    message: str | None = None,
) -> ApiError:
    """422 ``Invalid``; each cause is ``{"type", "message", "field"}``."""
    if message is None:
        summary = "; ".join(
            f"{c['field']}: {c['message']}" if c.get("field") else c["message"] for c in causes
        )
        message = (
            f'{kind}.{group} "{name or ""}" is invalid: {summary}'
            if group
            else (f'{kind} "{name or ""}" is invalid: {summary}')
        )
    return ApiError(422, "Invalid", message, details=_details(name, group, kind, causes=causes))


def bad_request(message: str) -> ApiError:
    return ApiError(400, "BadRequest", message)


def method_not_allowed(
    message: str = "the server does not allow this method on the requested resource",
) -> ApiError:
    return ApiError(405, "MethodNotAllowed", message)


def unsupported_media_type(content_type: str) -> ApiError:
    return ApiError(
        415,
        "UnsupportedMediaType",
        "the body of the request was in an unknown format - accepted media types include: "
        "application/json-patch+json, application/merge-patch+json, "
        f"application/apply-patch+yaml (got {content_type})",
    )


def too_many_requests(retry_after: int) -> ApiError:
    return ApiError(
        429,
        "TooManyRequests",
        "the server has received too many requests and has asked us to try again later",
        details={"retryAfterSeconds": retry_after},
        headers={"Retry-After": str(retry_after)},
    )


def internal_error(
    message: str = 'an error on the server ("unknown") has prevented the request from succeeding',
) -> ApiError:
    return ApiError(500, "InternalError", message)


def service_unavailable(
    message: str = "the server is currently unable to handle the request",
) -> ApiError:
    return ApiError(503, "ServiceUnavailable", message)


def expired(requested: str, oldest: str) -> ApiError:
    """The 410 carried in a watch ``ERROR`` event when history no longer reaches back."""
    return ApiError(410, "Expired", f"too old resource version: {requested} ({oldest})")
