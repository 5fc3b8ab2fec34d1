"""Reading the JSON log lines that labvirt's processes write, for benchmarks that time them.

A process's threads share its stdout, so two log lines sometimes land on one line; gunicorn and
Celery also print plain text of their own. Every JSON object is found wherever it starts.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

_DECODER = json.JSONDecoder()


def log_events(path: Path) -> Iterator[dict[str, Any]]:
    """Every JSON object in the log at ``path``, in order."""
    text = path.read_text(errors="replace")
    position = text.find("{")
    while position != -1:
        try:
            event, end = _DECODER.raw_decode(text, position)
        except json.JSONDecodeError:
            end = position + 1  # a brace in plain text, or a line cut short: look further on
        else:
            if isinstance(event, dict):
                yield event
        position = text.find("{", end)


def stamp(event: dict[str, Any]) -> float:
    """An event's ``timestamp`` (ISO 8601, UTC, microseconds) as seconds since the epoch."""
    return datetime.fromisoformat(str(event["timestamp"]).replace("Z", "+00:00")).timestamp()
