"""JSON request bodies, bounded in depth before they are parsed.

No request labvirt accepts nests deeper than a few levels, while a body of 20,000 ``[`` would
make the parser recurse until ``RecursionError`` (a 500). The depth is measured on the text, so
the parser never sees such a body; whatever it refuses is a ``ValueError``, which callers
answer as a 400.
"""

from __future__ import annotations

import json
import re
from typing import Any, Final

from flask.json.provider import DefaultJSONProvider

MAX_JSON_DEPTH: Final = 32
# What changes the depth or whether a bracket is text: one linear pass over these alone.
_SIGNIFICANT: Final = re.compile(r'[\[\]{}"\\]')


class TooDeep(ValueError):
    pass


def check_depth(text: str, limit: int = MAX_JSON_DEPTH) -> None:
    depth = 0
    in_string = False
    escaped_at = -1  # the position a backslash in a string escapes
    for found in _SIGNIFICANT.finditer(text):
        char, at = found.group(), found.start()
        if in_string:
            if at == escaped_at:
                continue
            if char == "\\":
                escaped_at = at + 1
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            if depth > limit:
                raise TooDeep(f"the body nests deeper than {limit} levels")
        elif char in "]}":
            depth -= 1


def load_bounded(data: str | bytes, **kwargs: Any) -> Any:
    """``json.loads``, refusing bodies nested deeper than ``MAX_JSON_DEPTH``."""
    # Decoded as json.loads decodes bytes, so both read the same text.
    text = (
        data if isinstance(data, str) else data.decode(json.detect_encoding(data), "surrogatepass")
    )
    check_depth(text)
    return json.loads(text, **kwargs)


class BoundedJSONProvider(DefaultJSONProvider):
    """Flask's JSON, with every request body (``request.get_json`` too) bounded in depth."""

    def loads(self, s: str | bytes, **kwargs: Any) -> Any:
        return load_bounded(s, **kwargs)
