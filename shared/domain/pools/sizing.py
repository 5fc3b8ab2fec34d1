"""The sizing math: how many warm environments a load needs for a hit rate.

A pool of ``s`` warm environments whose every claim starts a replacement that is ready ``T``
seconds later, fed by Poisson claims at rate ``lambda``, loses a claim (the learner gets a cold
environment) exactly when all ``s`` are being refilled. That is Erlang's loss system, so the
miss rate is ``B(s, lambda * T)`` whatever the distribution of ``T``.
"""

from __future__ import annotations

import math
from typing import Final

from shared.domain.pools.config import MAX_POOL_SIZE

# Beyond this mean e**-mean underflows, so Poisson terms are summed in log space.
_POISSON_DIRECT_LIMIT: Final = 500.0


def erlang_b(servers: int, load: float) -> float:
    """Erlang's loss probability: the share of claims that find a pool of ``servers`` empty
    when claims offer ``load`` = arrival rate x refill time (in environments)."""
    if servers < 0:
        raise ValueError(f"servers must not be negative, got {servers}")
    if load < 0 or not math.isfinite(load):
        raise ValueError(f"load must be a finite non-negative number, got {load}")
    blocking = 1.0
    for k in range(1, servers + 1):
        blocking = load * blocking / (k + load * blocking)
    return blocking


def stock_for_hit_rate(load: float, hit_rate: float, *, limit: int = MAX_POOL_SIZE) -> int:
    """The smallest pool whose loss probability stays within ``1 - hit_rate`` (at most limit)."""
    _check_hit_rate(hit_rate)
    if load <= 0:
        return 0
    allowed = 1.0 - hit_rate
    blocking = 1.0
    for servers in range(1, limit + 1):
        blocking = load * blocking / (servers + load * blocking)
        if blocking <= allowed:
            return servers
    return limit


def fractional_stock(load: float, hit_rate: float, *, limit: int = MAX_POOL_SIZE) -> float:
    """A stock between two whole sizes that just meets the hit rate on average over time.

    Whole sizes overshoot: a pool that needs 2.3 environments must otherwise keep 3. Holding
    ``s`` for a share of the time and ``s - 1`` for the rest gives a loss that is the same mix
    of the two losses; this is the mix that lands on ``1 - hit_rate``.
    """
    whole = stock_for_hit_rate(load, hit_rate, limit=limit)
    if whole == 0:
        return 0.0
    allowed = 1.0 - hit_rate
    above = erlang_b(whole - 1, load)  # too many misses
    below = erlang_b(whole, load)  # within the budget
    if above <= below:
        return float(whole)
    share_smaller = (allowed - below) / (above - below)
    return whole - min(1.0, max(0.0, share_smaller))


def dithered(stock: float, *, now: float, period: float) -> int:
    """A whole target whose time average is ``stock``: the larger size for the fractional
    share of every ``period``, the smaller one for the rest."""
    if stock < 0 or not math.isfinite(stock):
        raise ValueError(f"stock must be a finite non-negative number, got {stock}")
    base = math.floor(stock)
    share = stock - base
    phase = (now % period) / period
    return base + (1 if phase < share else 0)


def poisson_sf(k: int, mean: float) -> float:
    """P(X > k) for X ~ Poisson(mean)."""
    if mean < 0 or not math.isfinite(mean):
        raise ValueError(f"mean must be a finite non-negative number, got {mean}")
    if k < 0:
        return 1.0
    if mean == 0:
        return 0.0
    if mean > _POISSON_DIRECT_LIMIT:
        log_mean = math.log(mean)
        cdf = math.fsum(math.exp(-mean + i * log_mean - math.lgamma(i + 1)) for i in range(k + 1))
        return max(0.0, 1.0 - cdf)
    term = math.exp(-mean)
    cdf = term
    for i in range(1, k + 1):
        term *= mean / i
        cdf += term
    return max(0.0, 1.0 - cdf)


def poisson_quantile(probability: float, mean: float) -> int:
    """The smallest k with P(X <= k) >= probability, X ~ Poisson(mean)."""
    if not 0 < probability < 1:
        raise ValueError(f"probability must be within (0, 1), got {probability}")
    k = 0
    while poisson_sf(k, mean) > 1 - probability:
        k += 1
    return k


def _check_hit_rate(hit_rate: float) -> None:
    if not 0 < hit_rate < 1:
        raise ValueError(f"hit_rate must be within (0, 1), got {hit_rate}")
