"""The body of every error answer, for the API and the gateway alike: RFC 9457 problem details.

    {"type": "urn:labvirt:problem:<code>", "title": "...", "status": 404,
     "detail": "...", "code": "<code>", "errors": [{"pointer": "/user", "detail": "..."}], ...}

``code`` is the stable key clients switch on; ``errors`` lists field-level problems (a JSON
pointer into the request body, or into the query string as ``#/query/<name>``); any other
member is context of that kind of problem. Framework-free: each service wraps the body in its
own response type, with ``PROBLEM_MEDIA_TYPE``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

PROBLEM_MEDIA_TYPE: Final = "application/problem+json"
PROBLEM_TYPE_PREFIX: Final = "urn:labvirt:problem:"
QUERY_POINTER: Final = "#/query"


def problem_body(
    status: int,
    code: str,
    detail: str,
    *,
    errors: list[dict[str, str]] | None = None,
    context: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The problem document; context members never override the standard ones."""
    body: dict[str, Any] = {
        "type": PROBLEM_TYPE_PREFIX + code,
        "title": code.replace("_", " ").capitalize(),
        "status": status,
        "detail": detail,
        "code": code,
    }
    if errors:
        body["errors"] = errors
    for key, value in (context or {}).items():
        body.setdefault(key, value)
    return body


def field_problems(messages: Any, prefix: str = "") -> list[dict[str, str]]:
    """Flatten nested validation messages (marshmallow's shape: dicts of lists of strings)
    into ``{"pointer", "detail"}`` entries; ``prefix`` roots the pointers (``QUERY_POINTER``
    for a query string)."""
    if messages is None:
        return []
    if isinstance(messages, str):
        return [{"pointer": prefix or "/", "detail": messages}]
    if isinstance(messages, list):
        problems: list[dict[str, str]] = []
        for item in messages:
            problems.extend(field_problems(item, prefix))
        return problems
    if isinstance(messages, dict):
        problems = []
        for key, value in messages.items():
            name = "" if key == "_schema" else "/" + _escape(str(key))
            problems.extend(field_problems(value, prefix + name))
        return problems
    return [{"pointer": prefix or "/", "detail": str(messages)}]


def _escape(token: str) -> str:
    # RFC 6901: "~" and "/" inside a reference token.
    return token.replace("~", "~0").replace("/", "~1")
