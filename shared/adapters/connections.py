"""Which sessions a browser is connected to, across every gateway process, in Redis.

Each open terminal or event stream holds a lease on its session (``labvirt:conns:{sNN}:<id>``,
renewed while it lives). When the last one closes, the session enters
``labvirt:disconnected:{sNN}`` with the time; if none comes back within the grace time, the
reaper closes the session as ``disconnected`` (``SessionLife.close_disconnected``). A gateway
that dies holds its leases no longer than their term: the reaper expires them as if they had
closed. A session that never connected is never in the set: the idle clock alone ends it.

Opening and closing are Lua scripts, so "was that the last one?" is decided atomically across
gateways. The leases and the disconnected set are split by the session's shard (``hash_tags``):
each script touches one session's keys, all in one hash slot; the reaper reads every shard.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final, cast

import redis
import redis.asyncio

from shared.adapters.hash_tags import SESSION_TAGS, session_tag

PREFIX: Final = "labvirt"
# A connection's lease; a gateway renews every open connection's well before it runs out.
LEASE_SECONDS: Final = 30.0

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


def leases_key(tag: str) -> str:
    """The leases of one shard's connections: ``<session> <connection>`` -> lease end."""
    return f"{PREFIX}:conn-leases:{tag}"


def disconnected_key(tag: str) -> str:
    """One shard's sessions whose last connection closed: session -> when."""
    return f"{PREFIX}:disconnected:{tag}"


def _conns_key(session_id: str) -> str:
    return f"{PREFIX}:conns:{session_tag(session_id)}:{session_id}"


def _script_keys(session_id: str) -> list[str]:
    """What the open and close scripts touch: all in the session's hash slot (``hash_tags``)."""
    tag = session_tag(session_id)
    return [_conns_key(session_id), leases_key(tag), disconnected_key(tag)]


class Connections:
    """The gateway's side: open, renew and close connections (asyncio)."""

    def __init__(self, client: redis.asyncio.Redis) -> None:
        self._redis = client
        self._open = client.register_script(_OPEN)
        self._close = client.register_script(_CLOSE)

    async def open(self, session_id: str, connection_id: str, *, now: float) -> None:
        await self._open(
            keys=_script_keys(session_id),
            args=[connection_id, repr(now + LEASE_SECONDS), session_id],
        )

    async def renew(self, session_id: str, connection_ids: list[str], *, now: float) -> None:
        if not connection_ids:
            return
        expiry = now + LEASE_SECONDS
        pipe = self._redis.pipeline(transaction=False)
        pipe.hset(_conns_key(session_id), mapping=dict.fromkeys(connection_ids, repr(expiry)))
        leases = leases_key(session_tag(session_id))
        pipe.zadd(leases, {f"{session_id} {c}": expiry for c in connection_ids})
        await pipe.execute()

    async def close(self, session_id: str, connection_id: str, *, now: float) -> bool:
        """True when this was the session's last connection."""
        result = await self._close(
            keys=_script_keys(session_id),
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
        """Close every connection whose lease ran out (its gateway is gone), the ``batch``
        oldest at most; how many."""
        expired = self._oldest(leases_key, until=now, batch=batch)
        for member in expired:
            session_id, _, connection_id = member.partition(" ")
            score = self._redis.zscore(leases_key(session_tag(session_id)), member)
            at = float(score) if score is not None else now
            self._close(keys=_script_keys(session_id), args=[connection_id, session_id, repr(at)])
        return len(expired)

    def take_due(self, *, now: float, grace: float, batch: int = 1000) -> list[str]:
        """Sessions whose last connection closed at least ``grace`` ago and stayed closed;
        each is handed to exactly one caller."""
        cutoff = now - grace
        taken = []
        for session_id in self._oldest(disconnected_key, until=cutoff, batch=batch):
            keys = [_conns_key(session_id), disconnected_key(session_tag(session_id))]
            if self._take_due(keys=keys, args=[session_id, repr(cutoff)]):
                taken.append(session_id)
        return taken

    def _oldest(self, key_of: Callable[[str], str], *, until: float, batch: int) -> list[str]:
        """The ``batch`` members scored at most ``until`` across every shard, oldest first."""
        pipe = self._redis.pipeline(transaction=False)
        for tag in SESSION_TAGS:
            pipe.zrangebyscore(key_of(tag), "-inf", until, start=0, num=batch, withscores=True)
        found = sorted(
            (float(score), _text(member))
            for shard in pipe.execute()
            for member, score in cast(list[Any], shard)
        )
        return [member for _, member in found[:batch]]

    def connected(self, session_id: str) -> int:
        """How many connections the session has now (for tests and operators)."""
        return int(self._redis.hlen(_conns_key(session_id)))

    def disconnected_since(self, session_id: str) -> float | None:
        """When the session's last connection closed, while it waits out its grace."""
        score = self._redis.zscore(disconnected_key(session_tag(session_id)), session_id)
        return None if score is None else float(score)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
