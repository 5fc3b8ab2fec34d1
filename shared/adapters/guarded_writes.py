"""Writes that apply only while a key is absent, in one Lua step.

A new session is stored with its document, its first event and its index entries only if no
session of that id exists: a WATCH, an EXISTS and a MULTI, three round trips. ``WriteRecorder``
takes the same writes as a pipeline would (the session store's code queues them unchanged) and
``GUARDED_WRITE`` applies them after checking the key, in one script that can share a round
trip with other commands (``script_batches``). Every key is passed in KEYS, so on a Redis
Cluster the script stays in the one hash slot those keys share.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Final

GUARDED_WRITE: Final = """
-- KEYS[1]: the key that must not exist; the writes' keys follow. ARGV[1]: the writes as JSON,
-- each a list of strings: its command, the index in KEYS of its key, the arguments after it.
-- 1: written; 0: the key exists, nothing was written.
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
for _, write in ipairs(cjson.decode(ARGV[1])) do
  local call = {write[1], KEYS[tonumber(write[2])]}
  for i = 3, #write do call[i] = write[i] end
  redis.call(unpack(call))
end
return 1
"""


class WriteRecorder:
    """The pipeline methods the session store's writes use, recorded for ``GUARDED_WRITE``."""

    def __init__(self, guard: str) -> None:
        self.keys: list[str] = [guard]
        self._writes: list[list[str]] = []

    @property
    def args(self) -> list[str]:
        """The script's ARGV: one JSON text, which Redis packs and the script reads at once."""
        return [json.dumps(self._writes, separators=(",", ":"))]

    def _write(self, command: str, key: str, *arguments: Any) -> None:
        if key not in self.keys:
            self.keys.append(key)
        index = str(self.keys.index(key) + 1)
        self._writes.append([command, index, *(_wire(a) for a in arguments)])

    def set(self, name: str, value: Any) -> None:
        self._write("SET", name, value)

    def expire(self, name: str, time: int) -> None:
        self._write("EXPIRE", name, time)

    def xadd(
        self,
        name: str,
        fields: Mapping[str, Any],
        *,
        maxlen: int | None = None,
        approximate: bool = True,
    ) -> None:
        trim = [] if maxlen is None else ["MAXLEN", "~" if approximate else "=", maxlen]
        self._write("XADD", name, *trim, "*", *(x for pair in fields.items() for x in pair))

    def zadd(self, name: str, mapping: Mapping[str, float]) -> None:
        self._write("ZADD", name, *(x for pair in mapping.items() for x in reversed(pair)))

    def zrem(self, name: str, *members: str) -> None:
        self._write("ZREM", name, *members)

    def sadd(self, name: str, *members: str) -> None:
        self._write("SADD", name, *members)

    def srem(self, name: str, *members: str) -> None:
        self._write("SREM", name, *members)


def _wire(value: Any) -> str:
    """As redis-py encodes it: a float by its repr, so no precision is lost (a string, which
    the script passes on as it is: a Lua number would be cut to 14 digits)."""
    if isinstance(value, bytes):
        return value.decode()
    return repr(value) if isinstance(value, float) else str(value)
