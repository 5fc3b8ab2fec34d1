"""The one retry layer: transient failures retried with capped, jittered backoff, Retry-After
honoured, and a budget that caps what one task may spend on retries across all its calls."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.adapters.kube import Conflict, TooManyRequests, Unavailable
from shared.adapters.retrying import Backoff, Retry, retry_budget


class Flaky:
    """An operation that fails with ``errors`` in turn, then answers ``"ok"``."""

    def __init__(self, *errors: Exception) -> None:
        self.errors = list(errors)
        self.calls = 0

    def __call__(self) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "ok"


def retry(sleeps: list[float], *, attempts: int = 6) -> Retry:
    return Retry(attempts=attempts, sleep=sleeps.append, rng=random.Random(1))


def test_transient_failures_are_retried_until_the_call_succeeds() -> None:
    sleeps: list[float] = []
    flaky = Flaky(Unavailable("503"), Unavailable("broken pipe"))
    assert retry(sleeps)(flaky, what="get", error=Unavailable) == "ok"
    assert flaky.calls == 3
    assert len(sleeps) == 2


def test_a_permanent_failure_is_raised_at_once() -> None:
    sleeps: list[float] = []
    flaky = Flaky(Conflict("stale"))
    with pytest.raises(Conflict):
        retry(sleeps)(flaky, what="patch", error=Conflict.__mro__[1])
    assert flaky.calls == 1
    assert sleeps == []


def test_a_429_waits_at_least_its_retry_after() -> None:
    sleeps: list[float] = []
    flaky = Flaky(TooManyRequests("slow down", retry_after=3.0))
    assert retry(sleeps)(flaky, what="create", error=TooManyRequests) == "ok"
    assert sleeps == [pytest.approx(3.0)]


def test_retry_after_is_capped_so_a_server_cannot_park_a_worker() -> None:
    sleeps: list[float] = []
    flaky = Flaky(TooManyRequests("slow down", retry_after=3600.0))
    retry(sleeps)(flaky, what="create", error=TooManyRequests)
    assert sleeps == [Backoff().cap]


def test_one_call_gives_up_after_its_attempts() -> None:
    sleeps: list[float] = []
    flaky = Flaky(*[Unavailable("503")] * 10)
    with pytest.raises(Unavailable):
        retry(sleeps, attempts=3)(flaky, what="list", error=Unavailable)
    assert flaky.calls == 3


def test_the_budget_is_shared_by_every_call_of_a_task() -> None:
    sleeps: list[float] = []
    policy = retry(sleeps)
    first = Flaky(Unavailable("503"), Unavailable("503"))
    second = Flaky(*[Unavailable("503")] * 5)
    with retry_budget(3) as budget:
        assert policy(first, what="create a", error=Unavailable) == "ok"  # spends 2
        with pytest.raises(Unavailable):
            policy(second, what="create b", error=Unavailable)  # 1 left, then exhausted
    assert second.calls == 2
    assert budget.spent == 3
    assert budget.exhausted_by == ["create b"]


def test_without_a_budget_only_the_attempt_limit_applies() -> None:
    sleeps: list[float] = []
    flaky = Flaky(*[Unavailable("503")] * 4)
    assert retry(sleeps, attempts=5)(flaky, what="list", error=Unavailable) == "ok"
    assert flaky.calls == 5


@given(
    attempt=st.integers(min_value=1, max_value=40),
    base=st.floats(min_value=0.01, max_value=2),
    cap=st.floats(min_value=0.1, max_value=30),
    seed=st.integers(min_value=0, max_value=2**32 - 1),
)
def test_backoff_is_jittered_within_its_exponential_cap(
    attempt: int, base: float, cap: float, seed: int
) -> None:
    delay = Backoff(base=base, cap=cap).delay(attempt, random.Random(seed))
    assert 0 <= delay <= min(cap, base * 2**attempt)
