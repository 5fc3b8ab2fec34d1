"""Lua scripts and plain commands sent to Redis in one round trip, in the order queued.

redis-py runs a registered script inside a pipeline only after asking Redis whether it has the
script (``SCRIPT EXISTS``): one more round trip on every call of a hot path. A batch sends each
script whole (``EVAL``: Redis keeps it by its hash, so it is compiled once), which also means
no script can be missing (after a restart or a ``SCRIPT FLUSH``) and run out of its turn. A
Redis Cluster client refuses scripts in a pipeline: there each script runs on its own, in
turn, and the plain commands queued after the last script follow in one pipeline.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import redis

Check = Callable[[Any], None]


class ScriptBatch:
    """Commands (on ``pipe``) and scripts (``script``), sent together by ``execute``."""

    def __init__(self, client: redis.Redis) -> None:
        self._client = client
        self._cluster = isinstance(client, redis.RedisCluster)
        self.pipe = client.pipeline(transaction=False)  # plain commands are queued on it
        # Cluster only: the scripts, each with how many plain commands were queued before it.
        self._apart: list[tuple[int, str, Sequence[Any], Sequence[Any]]] = []
        self._checks: dict[int, Check] = {}

    def __len__(self) -> int:
        return len(self.pipe) + len(self._apart)

    def script(
        self,
        source: str,
        *,
        keys: Sequence[Any],
        args: Sequence[Any],
        check: Check | None = None,
    ) -> None:
        """Queue the script ``source``; ``check`` sees its answer (and may raise)."""
        if check is not None:
            self._checks[len(self)] = check
        if self._cluster:
            self._apart.append((len(self.pipe), source, keys, args))
        else:
            self.pipe.eval(source, len(keys), *keys, *args)

    def execute(self) -> list[Any]:
        """Every command's answer, in order; the first error, or a check's, is raised."""
        answers = self._execute_apart() if self._apart else self.pipe.execute()
        for position, check in self._checks.items():
            check(answers[position])
        return answers

    def _execute_apart(self) -> list[Any]:
        if any(before != len(self.pipe) for before, *_ in self._apart):
            raise ValueError("on a cluster, plain commands may only follow the scripts")
        ran = [
            self._client.eval(source, len(keys), *keys, *args)
            for _, source, keys, args in self._apart
        ]
        return ran + (self.pipe.execute() if len(self.pipe) else [])
