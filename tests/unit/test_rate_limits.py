"""The Redis rate limiter against the suite's real Redis (its Lua script is the point: fakeredis
here runs no Lua). Time is an argument of every check, so the clock is a number the tests move.
"""

from __future__ import annotations

import asyncio
import math
import re
import threading
import uuid
from collections.abc import Callable

import pytest
import redis
import redis.asyncio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.adapters.rate_limits import AsyncRateLimiter, RateLimiter, RateScope, rate_key
from shared.adapters.redis_server import free_port
from shared.config_limits import Rate

NOW = 1_700_000_000.0
TEN_A_MINUTE = Rate(10, 60.0)
Connect = Callable[[], redis.Redis]


@pytest.fixture
def limiter(connect: Connect) -> RateLimiter:
    return RateLimiter(connect())


def admitted(limiter: RateLimiter, times: list[float], rate: Rate, subject: str = "alice") -> int:
    return sum(limiter.check(RateScope.USER, subject, rate, now=t) is None for t in times)


def test_admits_the_count_then_refuses_until_the_oldest_request_leaves_the_window(
    limiter: RateLimiter,
) -> None:
    assert admitted(limiter, [NOW + i for i in range(10)], TEN_A_MINUTE) == 10

    refused = limiter.check(RateScope.USER, "alice", TEN_A_MINUTE, now=NOW + 20.5)

    assert refused is not None
    # The first request (at NOW) leaves the window at NOW + 60: 39.5 s on, rounded up.
    assert refused.retry_after == 40
    assert refused.scope is RateScope.USER
    assert refused.rate == TEN_A_MINUTE
    assert refused.details == {"limit": "10/60s", "scope": "user"}
    assert limiter.check(RateScope.USER, "alice", TEN_A_MINUTE, now=NOW + 59.9) is not None
    assert limiter.check(RateScope.USER, "alice", TEN_A_MINUTE, now=NOW + 60) is None


def test_the_window_slides_instead_of_resetting(limiter: RateLimiter) -> None:
    # Five at the start, five half a minute later: at 61 s only the first five have left.
    admitted(limiter, [NOW] * 5 + [NOW + 30] * 5, TEN_A_MINUTE)

    assert admitted(limiter, [NOW + 61] * 6, TEN_A_MINUTE) == 5
    refused = limiter.check(RateScope.USER, "alice", TEN_A_MINUTE, now=NOW + 61)
    assert refused is not None
    assert refused.retry_after == 29


def test_retry_after_is_at_least_one_second(limiter: RateLimiter) -> None:
    rate = Rate(1, 60.0)
    assert limiter.check(RateScope.USER, "alice", rate, now=NOW) is None

    refused = limiter.check(RateScope.USER, "alice", rate, now=NOW + 59.99)

    assert refused is not None
    assert refused.retry_after == 1


def test_refused_requests_do_not_push_the_wait_further(limiter: RateLimiter) -> None:
    rate = Rate(2, 60.0)
    admitted(limiter, [NOW, NOW + 1], rate)

    assert admitted(limiter, [NOW + 2 + i for i in range(50)], rate) == 0
    assert limiter.check(RateScope.USER, "alice", rate, now=NOW + 60) is None


def test_subjects_and_scopes_are_counted_apart(limiter: RateLimiter) -> None:
    rate = Rate(1, 60.0)
    assert limiter.check(RateScope.USER, "alice", rate, now=NOW) is None
    assert limiter.check(RateScope.USER, "alice", rate, now=NOW) is not None

    assert limiter.check(RateScope.USER, "bob", rate, now=NOW) is None
    assert limiter.check(RateScope.CLIENT_IP, "alice", rate, now=NOW) is None
    assert limiter.check(RateScope.FRONTEND_TOKEN, "alice", rate, now=NOW) is None


def test_a_lowered_limit_waits_for_enough_old_requests_to_leave(limiter: RateLimiter) -> None:
    admitted(limiter, [NOW + i for i in range(10)], TEN_A_MINUTE)

    refused = limiter.check(RateScope.USER, "alice", Rate(4, 60.0), now=NOW + 10)

    # Ten counted, four allowed: the seventh (at NOW + 6) must leave first, at NOW + 66.
    assert refused is not None
    assert refused.retry_after == 56


def test_keys_name_a_hash_of_the_subject_and_expire_on_their_own(
    connect: Connect, limiter: RateLimiter
) -> None:
    token = "frontend-token-that-must-not-leak"
    limiter.check(RateScope.FRONTEND_TOKEN, token, TEN_A_MINUTE, now=NOW)
    limiter.check(RateScope.CLIENT_IP, "2001:db8::7", TEN_A_MINUTE, now=NOW)
    client = connect()

    keys = sorted(key.decode() for key in client.keys("*"))

    assert keys == sorted(
        [
            rate_key(RateScope.FRONTEND_TOKEN, token),
            rate_key(RateScope.CLIENT_IP, "2001:db8::7"),
        ]
    )
    for key in keys:
        assert re.fullmatch(r"labvirt:rate:(frontend_token|client_ip):[0-9a-f]{32}", key)
        assert token not in key
        assert 0 < client.pttl(key) <= 60_000
        assert token.encode() not in b"".join(client.zrange(key, 0, -1))


def test_concurrent_checks_from_separate_connections_admit_exactly_the_count(
    connect: Connect,
) -> None:
    limiters = [RateLimiter(connect()) for _ in range(8)]
    results: list[bool] = []
    lock = threading.Lock()

    def hammer(limiter: RateLimiter) -> None:
        for _ in range(25):
            verdict = limiter.check(RateScope.USER, "alice", Rate(30, 60.0), now=NOW)
            with lock:
                results.append(verdict is None)

    threads = [threading.Thread(target=hammer, args=(each,)) for each in limiters]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert len(results) == 200
    assert sum(results) == 30


def test_the_asyncio_limiter_shares_the_count_with_the_synchronous_one(
    redis_url: str, limiter: RateLimiter
) -> None:
    rate = Rate(3, 60.0)
    admitted(limiter, [NOW, NOW], rate, subject="198.51.100.7")

    async def from_the_gateway() -> list[int | None]:
        client = redis.asyncio.Redis.from_url(redis_url)
        try:
            gateway = AsyncRateLimiter(client)
            verdicts = [
                await gateway.check(RateScope.USER, "198.51.100.7", rate, now=NOW + 1)
                for _ in range(2)
            ]
        finally:
            await client.aclose()
        return [None if v is None else v.retry_after for v in verdicts]

    assert asyncio.run(from_the_gateway()) == [None, 59]


def test_an_unreachable_redis_raises_instead_of_admitting() -> None:
    down = redis.Redis(port=free_port(), socket_connect_timeout=1)
    with pytest.raises(redis.ConnectionError):
        RateLimiter(down).check(RateScope.USER, "alice", TEN_A_MINUTE, now=NOW)


def _reference(times: list[float], rate: Rate) -> list[int]:
    """The sliding log in plain Python: 0 for admitted, else the seconds to wait."""
    log: list[float] = []
    verdicts = []
    for now in times:
        log = [t for t in log if t > now - rate.period_seconds]
        if len(log) < rate.count:
            log.append(now)
            verdicts.append(0)
        else:
            freeing = sorted(log)[len(log) - rate.count]
            wait = min(freeing + rate.period_seconds - now, rate.period_seconds)
            verdicts.append(max(1, math.ceil(wait)))
    return verdicts


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    count=st.integers(1, 5),
    period=st.sampled_from([5.0, 7.5, 60.0]),  # Redis expires keys in real time: not too short
    gaps=st.lists(st.floats(0, 10, allow_nan=False), min_size=1, max_size=30),
)
def test_every_verdict_is_the_sliding_logs_and_no_window_holds_more_than_the_count(
    limiter: RateLimiter, count: int, period: float, gaps: list[float]
) -> None:
    rate = Rate(count, period)
    subject = uuid.uuid4().hex  # each example counts from nothing, even while shrinking
    times = [NOW + sum(gaps[: i + 1]) for i in range(len(gaps))]

    verdicts = []
    for now in times:
        refused = limiter.check(RateScope.CLIENT_IP, subject, rate, now=now)
        verdicts.append(0 if refused is None else refused.retry_after)

    assert verdicts == _reference(times, rate)
    kept = [t for t, v in zip(times, verdicts, strict=True) if v == 0]
    for start in kept:
        assert sum(start <= t < start + period for t in kept) <= count
