"""Which sessions a browser is connected to, across every gateway process, in Redis.

Each open terminal or event stream holds a lease on its session (``labvirt:conns:<session>``,
renewed while it lives). When the last one closes, the session enters ``labvirt:disconnected``
with the time; if none comes back within the grace time, the reaper closes the session as
``disconnected`` (``SessionLife.close_disconnected``). A gateway that dies holds its leases no
longer than their term: the reaper expires them as if they had closed. A session that never
connected is never in the set: the idle clock alone ends it.

Opening and closing are Lua scripts, so "was that the last one?" is decided atomically across
gateways.
"""

from __future__ import annotations

from typing import Any, Final, cast

import redis
import redis.asyncio

PREFIX: Final = "labvirt"
# A connection's lease; a gateway renews every open connection's well before it runs out.
LEASE_SECONDS: Final = 30.0
LEASES_KEY: Final = f"{PREFIX}:conn-leases"
DISCONNECTED_KEY: Final = f"{PREFIX}:disconnected"

_OPEN: Final = """
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[3] .. ' ' .. ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[3])
return redis.call('HLEN', KEYS[1])
"""

# Close one connection; if it was the session's last, the session is disconnected from ARGV[3].
_CLOSE: Final = """
local removed = redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[2] .. ' ' .. ARGV[1])
if removed == 1 and redis.call('HLEN', KEYS[1]) == 0 then
  redis.call('ZADD', KEYS[3], 'NX', ARGV[3], ARGV[2])
  return 1
end
return 0
"""

# A session due for closing is taken out of the set by exactly one caller, and only if no
# connection came back meanwhile and its last disconnect is still older than the cutoff (it
# may have come back and left again since it was listed: then its new grace runs).
_TAKE_DUE: Final = """
if redis.call('HLEN', KEYS[1]) > 0 then
  redis.call('ZREM', KEYS[2], ARGV[1])
  return 0
end
local since = redis.call('ZSCORE', KEYS[2], ARGV[1])
if not since or tonumber(since) > tonumber(ARGV[2]) then
  return 0
end
return redis.call('ZREM', KEYS[2], ARGV[1])
"""


def _conns_key(session_id: str) -> str:
    return f"{PREFIX}:conns:{session_id}"


class Connections:
    """The gateway's side: open, renew and close connections (asyncio)."""

    def __init__(self, client: redis.asyncio.Redis) -> None:
        self._redis = client
        self._open = client.register_script(_OPEN)
        self._close = client.register_script(_CLOSE)

    async def open(self, session_id: str, connection_id: str, *, now: float) -> None:
        await self._open(
            keys=[_conns_key(session_id), LEASES_KEY, DISCONNECTED_KEY],
            args=[connection_id, repr(now + LEASE_SECONDS), session_id],
        )

    async def renew(self, session_id: str, connection_ids: list[str], *, now: float) -> None:
        if not connection_ids:
            return
        expiry = now + LEASE_SECONDS
        pipe = self._redis.pipeline(transaction=False)
        pipe.hset(_conns_key(session_id), mapping=dict.fromkeys(connection_ids, repr(expiry)))
        pipe.zadd(LEASES_KEY, {f"{session_id} {c}": expiry for c in connection_ids})
        await pipe.execute()

    async def close(self, session_id: str, connection_id: str, *, now: float) -> bool:
        """True when this was the session's last connection."""
        result = await self._close(
            keys=[_conns_key(session_id), LEASES_KEY, DISCONNECTED_KEY],
            args=[connection_id, session_id, repr(now)],
        )
        return bool(result)


class ConnectionSweeper:
    """The reaper's side: expire dead gateways' leases, find sessions disconnected too long."""

    def __init__(self, client: redis.Redis) -> None:
        self._redis = client
        self._close = client.register_script(_CLOSE)
        self._take_due = client.register_script(_TAKE_DUE)

    def expire_leases(self, *, now: float, batch: int = 1000) -> int:
        """Close every connection whose lease ran out (its gateway is gone); how many."""
        members = cast(
            list[Any], self._redis.zrangebyscore(LEASES_KEY, "-inf", now, start=0, num=batch)
        )
        for raw in members:
            member = raw.decode() if isinstance(raw, bytes) else str(raw)
            session_id, _, connection_id = member.partition(" ")
            score = self._redis.zscore(LEASES_KEY, member)
            at = float(score) if score is not None else now
            self._close(
                keys=[_conns_key(session_id), LEASES_KEY, DISCONNECTED_KEY],
                args=[connection_id, session_id, repr(at)],
            )
        return len(members)

    def take_due(self, *, now: float, grace: float, batch: int = 1000) -> list[str]:
        """Sessions whose last connection closed at least ``grace`` ago and stayed closed;
        each is handed to exactly one caller."""
        due = cast(
            list[Any],
            self._redis.zrangebyscore(DISCONNECTED_KEY, "-inf", now - grace, start=0, num=batch),
        )
        taken = []
        for raw in due:
            session_id = raw.decode() if isinstance(raw, bytes) else str(raw)
            cutoff = repr(now - grace)
            if self._take_due(
                keys=[_conns_key(session_id), DISCONNECTED_KEY], args=[session_id, cutoff]
            ):
                taken.append(session_id)
        return taken

    def connected(self, session_id: str) -> int:
        """How many connections the session has now (for tests and operators)."""
        return int(self._redis.hlen(_conns_key(session_id)))
