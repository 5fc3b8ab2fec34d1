"""One create at a time per user, across API processes: the user's lock in Redis.

A plain ``SET NX PX`` with a random value, expiring by itself if its holder dies, and released
only by its holder: by a Lua compare-and-delete where Redis runs scripts, by a WATCHed
transaction otherwise (fakeredis in tests). Both ends carry what the create needs next to them,
in their round trip:

- taking it reads (queued after the ``SET NX``, so under the lock) the user's index, one part
  per session shard, and whatever else the holder asks for (``along``); the first attempt also
  sends what must happen once whether or not the lock is free (``once``: the create's rate
  limits, whose reader may refuse the request);
- the release sends what the holder queued on its ``batch`` first (the new session, its notice
  to the gateways, its first task), then the compare-and-delete. Where no batch can carry them
  (no Lua, or a Redis Cluster client, which runs no script in a pipeline) ``batch`` is None and
  the holder sends them itself.
"""

from __future__ import annotations

import functools
import secrets
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Final

import redis

from shared.adapters.hash_tags import SESSION_TAGS
from shared.adapters.script_batches import ScriptBatch
from shared.adapters.session_indexes import merged_members, queue_user_ids

PREFIX: Final = "labvirt"
UNLOCK: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# Reads a holder queues beside the lock: each queues its commands on the pipeline and returns
# the function that takes their answers, in order, from the pipeline's.
Reader = Callable[[Iterator[Any]], Any]
ReadAlong = Callable[[Any], Reader]


class UserBusy(RuntimeError):
    """Another request holds this user's lock for longer than a request should wait."""


def user_lock_key(user: str) -> str:
    return f"{PREFIX}:user-lock:{user}"


@dataclass(frozen=True)
class HeldLock:
    """A user's lock while it is held."""

    session_ids: list[str]  # the user's index when it was taken
    read: Mapping[str, Any]  # what the reads asked for ``along`` found, by name
    batch: ScriptBatch | None  # sent with the release, before it; None: send things now


class UserLocks:
    def __init__(self, client: redis.Redis, *, scripted: bool) -> None:
        """``scripted``: Redis runs Lua (a real server; fakeredis does not)."""
        self._redis = client
        self._scripted = scripted
        self._cluster = isinstance(client, redis.RedisCluster)

    @contextmanager
    def hold(
        self,
        user: str,
        *,
        ttl_seconds: float,
        wait_seconds: float,
        along: Mapping[str, ReadAlong] | None = None,
        once: ReadAlong | None = None,
    ) -> Iterator[HeldLock]:
        """Hold ``user``'s lock; ``UserBusy`` when it is not free within ``wait_seconds``.
        ``once``'s reader runs after the first attempt, and what it raises refuses the hold."""
        key = user_lock_key(user)
        token = secrets.token_hex(16)
        deadline = time.monotonic() + wait_seconds
        pause = 0.005
        while True:
            pipe = self._redis.pipeline(transaction=False)
            pipe.set(key, token, nx=True, px=int(ttl_seconds * 1000))
            first = once(pipe) if once is not None else None
            once = None
            queue_user_ids(pipe, user)
            readers = {name: queue(pipe) for name, queue in (along or {}).items()}
            answers = iter(pipe.execute())
            taken = bool(next(answers))
            if first is not None:
                self._first(first, answers, key, token, taken=taken)
            if taken:
                break
            if time.monotonic() >= deadline:
                raise UserBusy(user)
            time.sleep(pause)
            pause = min(pause * 2, 0.05)
        ids = merged_members(next(answers) for _ in SESSION_TAGS)
        read = {name: reader(answers) for name, reader in readers.items()}
        batch = ScriptBatch(self._redis) if self._scripted and not self._cluster else None
        try:
            yield HeldLock(ids, read, batch)
        except BaseException:
            self._release(key, token, None)  # what was queued for the release is dropped
            raise
        self._release(key, token, batch)

    def _first(
        self, reader: Reader, answers: Iterator[Any], key: str, token: str, *, taken: bool
    ) -> None:
        """Read what was sent once; if it refuses the hold, let go of a lock just taken."""
        try:
            reader(answers)
        except BaseException:
            if taken:
                self._release(key, token, None)
            raise

    def _release(self, key: str, token: str, batch: ScriptBatch | None) -> None:
        if batch is not None:
            batch.script(UNLOCK, keys=[key], args=[token])
            batch.execute()
        elif self._scripted:
            self._redis.eval(UNLOCK, 1, key, token)
        else:
            self._redis.transaction(functools.partial(_delete_if_held, key, token), key)


def _delete_if_held(key: str, token: str, pipe: Any) -> None:
    held = pipe.get(key)
    pipe.multi()
    if held is not None and _text(held) == token:
        pipe.delete(key)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
