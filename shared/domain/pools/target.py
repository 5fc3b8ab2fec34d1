"""The stock a pool should hold now: its config, its demand and its refill time combined.

A static pool holds its size. An adaptive pool holds what the sizing math asks for at the
larger of the recent and the expected claim rate, the whole size of any remembered burst about
to recur, and one more when the last hour clearly missed too often.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Final

from shared.domain.pools.config import PoolConfig, PoolMode
from shared.domain.pools.demand import (
    Demand,
    SlotDemand,
    absolute_slot,
    recent_rate,
    slot_of_week,
    upcoming_slots,
)
from shared.domain.pools.sizing import dithered, fractional_stock, poisson_sf

LEAD_SECONDS: Final = 300.0  # warm up this long (beyond one refill) before a slot starts
# A remembered burst is held this long past its slot: a class is punctual only to a few minutes.
BURST_LINGER_SECONDS: Final = 600.0
DITHER_PERIOD_SECONDS: Final = 600.0
MISS_BUDGET_MIN_CLAIMS: Final = 20  # below this the last hour says too little to correct on
MISS_BUDGET_SIGNIFICANCE: Final = 0.01  # misses this unlikely within budget mean a wrong model
DEFAULT_REFILL_SECONDS: Final = 30.0  # assumed cold start until one has been measured
REFILL_MEMORY: Final = 0.2  # weight of the newest measured refill time


def pool_target(
    config: PoolConfig,
    demand: Demand,
    *,
    now: float,
    refill_seconds: float,
    tick_seconds: float,
) -> int:
    if config.mode is PoolMode.STATIC:
        return config.size
    return adaptive_target(
        config, demand, now=now, refill_seconds=refill_seconds, tick_seconds=tick_seconds
    )


def adaptive_target(
    config: PoolConfig,
    demand: Demand,
    *,
    now: float,
    refill_seconds: float,
    tick_seconds: float,
) -> int:
    """The stock an adaptive pool should hold now.

    The effective refill time is the measured cold start plus half a prewarmer tick (a claim
    waits that long, on average, for the tick that replaces it). The rate is the larger of the
    recent one and the profile's for the slots about to start, so a recurring class is warmed
    before it arrives; a remembered burst asks for its whole size, from one refill before its
    slot until BURST_LINGER_SECONDS after it. A pool that clearly missed more than its budget
    in the last hour holds one more.
    """
    refill = max(refill_seconds, 0.0) + max(tick_seconds, 0.0) / 2
    upcoming = [
        demand.profile[slot]
        for slot in upcoming_slots(now, refill + LEAD_SECONDS)
        if slot in demand.profile
    ]
    current = demand.profile.get(slot_of_week(absolute_slot(now)))
    usual = current.rate if current is not None else 0.0
    recent = recent_rate(
        demand.arrivals, now=now, usual_rate=usual, claims_last_hour=demand.claims_last_hour
    )
    rate = max([recent, *(s.rate for s in upcoming)])
    stock = dithered(
        fractional_stock(rate * refill, config.hit_rate, limit=config.max_size),
        now=now,
        period=DITHER_PERIOD_SECONDS,
    )
    target = max([stock, *burst_sizes(demand.profile, now=now, horizon=refill + LEAD_SECONDS)])
    if missed_too_often(demand, config.hit_rate):
        target += 1
    return min(config.max_size, max(config.min_size, target))


def burst_sizes(profile: Mapping[int, SlotDemand], *, now: float, horizon: float) -> list[int]:
    """Remembered bursts from BURST_LINGER_SECONDS ago until ``now + horizon``. For a slot that
    already ended this week, last week's peak counts: a class is punctual only to a few
    minutes, and may come just after the slot it came in last week (this week's own peak in
    that slot is history, not a forecast)."""
    sizes = []
    current = absolute_slot(now)
    for slot in range(absolute_slot(now - BURST_LINGER_SECONDS), absolute_slot(now + horizon) + 1):
        remembered = profile.get(slot_of_week(slot))
        if remembered is None:
            continue
        peak = remembered.previous_peak if slot < current else remembered.peak
        if remembered.bursts(peak):
            sizes.append(math.ceil(peak))
    return sizes


def missed_too_often(demand: Demand, hit_rate: float) -> bool:
    """True when the last hour's misses are clearly beyond the budget, not just unlucky."""
    if demand.claims_last_hour < MISS_BUDGET_MIN_CLAIMS:
        return False
    budget = (1 - hit_rate) * demand.claims_last_hour
    return poisson_sf(demand.misses_last_hour - 1, budget) < MISS_BUDGET_SIGNIFICANCE


def next_refill_estimate(previous: float | None, measured: float) -> float:
    """The refill time to plan with after one more measured cold start (a moving average)."""
    if measured < 0 or not math.isfinite(measured):
        raise ValueError(f"a refill time must be a finite non-negative number, got {measured}")
    if previous is None:
        return measured
    return REFILL_MEMORY * measured + (1 - REFILL_MEMORY) * previous
