"""Handing one ready environment of a pool to one session: the warm claim, in Redis.

One script (``pool_scripts.CLAIM``) takes the oldest ready environments listed just before as
candidates (their records' keys must be given to it, to stay in the pool's hash slot), claims
the first still ready, and counts the claim as a hit in the same step; when racing claims took
them all, it is tried again on the next ones. The list may come from a read the caller already
made in another round trip (``queue_candidates``, beside the user's lock on the create path).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, Final, cast

import redis

from shared.adapters import pool_scripts
from shared.adapters.pool_counters import PoolCounters
from shared.adapters.pool_records import decode_environment, environment_key, pool_redis_key
from shared.domain.pools.config import PoolKey
from shared.domain.pools.environments import WarmEnvironment

# A claimed environment's record outlives any session that may hold it; the session store
# shortens it to the ended retention when that session ends.
CLAIMED_RECORD_SECONDS: Final = 2 * 24 * 3600
# How many of the oldest ready environments one claim script may try (a racing claim may have
# taken some of those listed).
CLAIM_CANDIDATES: Final = 8


class PoolClaims:
    def __init__(self, client: redis.Redis, *, prefix: str, counters: PoolCounters) -> None:
        self._redis = client
        self._prefix = prefix
        self._counters = counters
        self._claim = client.register_script(pool_scripts.CLAIM)

    @property
    def client(self) -> redis.Redis:
        return self._redis

    def queue_candidates(self, pipe: Any, key: PoolKey) -> Callable[[Iterator[Any]], list[str]]:
        """Queue the read of the pool's oldest ready environments on ``pipe``; the function
        returned takes them from the pipeline's answers."""
        pipe.zrange(pool_redis_key(self._prefix, key, "ready"), 0, CLAIM_CANDIDATES - 1)
        return lambda answers: [_text(i) for i in next(answers)]

    def claim(
        self,
        key: PoolKey,
        *,
        session_id: str,
        at: float,
        record: bool,
        candidates: Sequence[str] | None,
    ) -> WarmEnvironment | None:
        """The oldest ready environment, now claimed by ``session_id``; None when none is ready
        (``candidates``: the oldest ready ones as read just before, if read)."""
        ready = pool_redis_key(self._prefix, key, "ready")
        claimed = pool_redis_key(self._prefix, key, "claimed")
        counted = self._counters.claim_keys(key, at=at)
        head: list[str | int] = [
            session_id,
            repr(at),
            CLAIMED_RECORD_SECONDS,
            "1" if record else "0",
        ]
        head += self._counters.claim_args(at=at)
        ids = None if candidates is None else list(candidates)
        while True:
            if ids is None:
                listed = cast(list[bytes], self._redis.zrange(ready, 0, CLAIM_CANDIDATES - 1))
                ids = [_text(i) for i in listed]
            if not ids:
                if record:
                    self._counters.record_claim(key, session_id=session_id, hit=False, at=at)
                return None
            records = [environment_key(key, i, prefix=self._prefix) for i in ids]
            raw = self._claim(keys=[ready, claimed, *counted, *records], args=[*head, *ids])
            if raw:
                break
            ids = None
        env_id, *pairs = cast(list[bytes], raw)
        fields = {pairs[i]: pairs[i + 1] for i in range(0, len(pairs), 2)}
        return decode_environment(_text(env_id), fields)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
