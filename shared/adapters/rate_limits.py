"""Request rate limits in Redis, shared by every API and gateway process.

A sliding log: a subject's key is a sorted set of the times of its admitted requests in the
last period, and one Lua script trims it, counts and admits or refuses in a single step.
``Rate`` promises at most ``count`` requests in *any* window of ``period_seconds``; a sliding
log keeps that promise exactly, and its Retry-After is exact too (when the request that frees
a place leaves the window). GCRA would store one number instead, but with a burst of
``count`` it admits up to twice that within one period. The log's price, one entry per
admitted request, is bounded by ``count`` per subject and gone ``period`` after its last one.

Keys are ``labvirt:rate:<scope>:<sha256 of the subject>`` (no user name, token or address in
a key name), one per script (Redis Cluster safe), expiring on their own. The time comes from
the caller, so tests drive it with a fake clock. Refused requests are not recorded: a client
that keeps knocking is let in again as soon as its earlier admitted requests age out. Redis errors
propagate: nobody is let through unchecked while Redis is down.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Final

import redis
import redis.asyncio

from shared.adapters.script_batches import ScriptBatch
from shared.config_limits import Rate

PREFIX: Final = "labvirt:rate"

# KEYS[1]: the subject's log. ARGV: now, period (s), count, a unique member for this request.
# Returns 0 when admitted, else the whole seconds (>= 1) until a place frees up.
_CHECK: Final = """
local now = tonumber(ARGV[1])
local period = tonumber(ARGV[2])
local count = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - period)
local used = redis.call('ZCARD', KEYS[1])
if used < count then
  redis.call('ZADD', KEYS[1], now, ARGV[4])
  redis.call('PEXPIRE', KEYS[1], math.ceil(period * 1000))
  return 0
end
local freeing = redis.call('ZRANGE', KEYS[1], used - count, used - count, 'WITHSCORES')
local wait = math.min(tonumber(freeing[2]) + period - now, period)
return math.max(1, math.ceil(wait))
"""


class RateScope(StrEnum):
    """Whose requests one limit counts."""

    USER = "user"
    FRONTEND_TOKEN = "frontend_token"  # noqa: S105 - a scope name, not a secret  # nosec B105
    CLIENT_IP = "client_ip"
    SIGN_IN_IP = "sign_in_ip"  # the dashboard's sign-ins, counted apart from browser calls


@dataclass(frozen=True)
class Throttled:
    """A refused request: which limit, and the whole seconds to wait (Retry-After)."""

    scope: RateScope
    rate: Rate
    retry_after: int

    @property
    def message(self) -> str:
        return (
            f"too many requests for this {_SUBJECTS[self.scope]}: at most {self.rate.count} "
            f"in {self.rate.period_seconds:g} s; retry in {self.retry_after} s"
        )

    @property
    def details(self) -> dict[str, str]:
        """The problem body's context members."""
        return {"limit": str(self.rate), "scope": self.scope.value}


class RateLimited(Exception):
    """A request a limit refused, raised where its verdict is read (``counting_along``)."""

    def __init__(self, throttled: Throttled) -> None:
        super().__init__(throttled.message)
        self.throttled = throttled


_SUBJECTS: Final = {
    RateScope.USER: "user",
    RateScope.FRONTEND_TOKEN: "frontend token",
    RateScope.CLIENT_IP: "client address",
    RateScope.SIGN_IN_IP: "client address",
}


def rate_key(scope: RateScope, subject: str) -> str:
    return f"{PREFIX}:{scope.value}:{hashlib.sha256(subject.encode()).hexdigest()[:32]}"


@dataclass(frozen=True)
class RateCheck:
    """One limit a request counts against."""

    scope: RateScope
    subject: str
    rate: Rate


class RateLimiter:
    """The synchronous side (the API)."""

    def __init__(self, client: redis.Redis) -> None:
        self._redis = client
        self._check = client.register_script(_CHECK)

    def check(self, scope: RateScope, subject: str, rate: Rate, *, now: float) -> Throttled | None:
        """Counts this request against ``rate``; None when it is admitted."""
        wait = self._check(keys=[rate_key(scope, subject)], args=_arguments(rate, now))
        return _verdict(scope, rate, wait)

    def check_all(self, checks: Sequence[RateCheck], *, now: float) -> Throttled | None:
        """Counts this request against every limit in one round trip; the first that refuses
        it (None when all admit it).

        As if checked one after the other: the limits after a refusal keep nothing of this
        request (the places they gave are taken back), the ones before it keep their count.
        """
        batch = ScriptBatch(self._redis)
        verdict = self._queue(batch, checks, now=now)
        return verdict(iter(batch.execute()))

    def counting_along(self, checks: Sequence[RateCheck], *, now: float) -> CountAlong:
        """``check_all`` in the round trip of another pipeline: the function returned queues
        the checks on it and gives back the function that reads their verdict. The checks run
        apart, at once, on a pipeline to another Redis, or of a Redis Cluster client (which
        runs no script in a pipeline)."""

        def along(pipe: Any) -> Callable[[Iterator[Any]], Throttled | None]:
            same = getattr(pipe, "connection_pool", None) is self._redis.connection_pool
            if isinstance(self._redis, redis.RedisCluster) or not same:
                verdict = self.check_all(checks, now=now)
                return lambda _answers: verdict
            return self._queue(_Pipelined(pipe), checks, now=now)

        return along

    def _queue(
        self, batch: ScriptBatch | _Pipelined, checks: Sequence[RateCheck], *, now: float
    ) -> Callable[[Iterator[Any]], Throttled | None]:
        members = []
        for check in checks:
            arguments = _arguments(check.rate, now)
            members.append(arguments[-1])
            batch.script(_CHECK, keys=[rate_key(check.scope, check.subject)], args=arguments)

        def verdict(answers: Iterator[Any]) -> Throttled | None:
            waits = [next(answers) for _ in checks]
            return self._first_refusal(checks, members, waits)

        return verdict

    def _first_refusal(
        self, checks: Sequence[RateCheck], members: Sequence[str], waits: Sequence[Any]
    ) -> Throttled | None:
        for i, (check, wait) in enumerate(zip(checks, waits, strict=True)):
            verdict = _verdict(check.scope, check.rate, wait)
            if verdict is None:
                continue
            given = [
                (rate_key(later.scope, later.subject), member)
                for later, member, later_wait in zip(
                    checks[i + 1 :], members[i + 1 :], waits[i + 1 :], strict=True
                )
                if int(later_wait) == 0
            ]
            if given:
                pipe = self._redis.pipeline(transaction=False)
                for key, member in given:
                    pipe.zrem(key, member)
                pipe.execute()
            return verdict
        return None


class _Pipelined:
    """Scripts queued on a plain pipeline (sent whole, as ``ScriptBatch`` sends them)."""

    def __init__(self, pipe: Any) -> None:
        self._pipe = pipe

    def script(self, source: str, *, keys: Sequence[Any], args: Sequence[Any]) -> None:
        self._pipe.eval(source, len(keys), *keys, *args)


# Queues rate checks on a pipeline; the function it returns reads their verdict.
CountAlong = Callable[[Any], Callable[[Iterator[Any]], Throttled | None]]


class AsyncRateLimiter:
    """The asyncio side (the gateway): the same script, the same keys."""

    def __init__(self, client: redis.asyncio.Redis) -> None:
        self._check = client.register_script(_CHECK)

    async def check(
        self, scope: RateScope, subject: str, rate: Rate, *, now: float
    ) -> Throttled | None:
        """Counts this request against ``rate``; None when it is admitted."""
        wait = await self._check(keys=[rate_key(scope, subject)], args=_arguments(rate, now))
        return _verdict(scope, rate, wait)


def _arguments(rate: Rate, now: float) -> list[str]:
    # The member only has to be unique: two requests in the same instant are two entries.
    return [repr(now), repr(rate.period_seconds), str(rate.count), secrets.token_hex(8)]


def _verdict(scope: RateScope, rate: Rate, wait: Any) -> Throttled | None:
    seconds = int(wait)
    return None if seconds == 0 else Throttled(scope, rate, max(1, seconds))
