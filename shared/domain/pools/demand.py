"""Demand: the claims a pool has seen, recently and by time of week.

The recent rate answers "how fast are claims arriving now"; the time-of-week profile, folded
once a week per 15-minute slot, remembers the rate and the largest burst each slot brings, so a
class that comes every Tuesday at ten is expected before it arrives.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from shared.domain.pools.sizing import poisson_sf

WEEK_SECONDS: Final = 7 * 24 * 3600
SLOT_SECONDS: Final = 15 * 60
SLOTS_PER_WEEK: Final = WEEK_SECONDS // SLOT_SECONDS
# How far back the recent rate looks; also how long claim arrivals are kept.
RECENT_WINDOW_SECONDS: Final = 15 * 60
# Short windows in which a surge (a class opening the same scenario) shows first.
SURGE_WINDOWS_SECONDS: Final = (15.0, 60.0, 180.0)
SURGE_MIN_CLAIMS: Final = 3
RATE_CHANGE_SIGNIFICANCE: Final = 0.01  # the last minutes disagree with the last hour
SURGE_SIGNIFICANCE: Final = 1e-3  # how unlikely under the usual rate a window's count must be
PEAK_WINDOW_SECONDS: Final = 60.0  # a slot's burst size: most claims within any such window
RATE_MEMORY: Final = 0.5  # weight of the newest week in a slot's rate
PEAK_DECAY_PER_WEEK: Final = 0.7  # a burst not seen again fades: 30 -> 21 -> 15 -> ...
BURST_SIGNIFICANCE: Final = 1e-4  # a slot's peak is a burst when Poisson would rarely give it


def absolute_slot(moment: float) -> int:
    return int(moment // SLOT_SECONDS)


def slot_of_week(slot: int) -> int:
    return slot % SLOTS_PER_WEEK


def upcoming_slots(now: float, horizon: float) -> list[int]:
    """Slots of the week from now until ``now + horizon``."""
    first, last = absolute_slot(now), absolute_slot(now + horizon)
    return [slot_of_week(slot) for slot in range(first, last + 1)]


@dataclass(frozen=True)
class SlotDemand:
    """What one slot of the week has usually brought: a claim rate and a burst size."""

    rate: float  # claims per second, weighted towards recent weeks
    peak: float  # most claims within PEAK_WINDOW_SECONDS, fading week by week
    weeks: int = 1
    # The peak before this week's fold: a slot that just ended still says what happened around
    # this time last week (a class a few minutes later this week).
    previous_peak: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "rate": self.rate,
            "peak": self.peak,
            "weeks": self.weeks,
            "previous_peak": self.previous_peak,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SlotDemand:
        return cls(
            float(data["rate"]),
            float(data["peak"]),
            int(data.get("weeks", 1)),
            float(data.get("previous_peak", 0.0)),
        )

    @property
    def is_burst(self) -> bool:
        """True when the peak is far above what the slot's steady rate would produce."""
        return self.bursts(self.peak)

    def bursts(self, peak: float) -> bool:
        usual = self.rate * PEAK_WINDOW_SECONDS
        return peak >= SURGE_MIN_CLAIMS and (
            poisson_sf(math.ceil(peak) - 1, usual) < BURST_SIGNIFICANCE
        )


def summarise_slot(arrivals: Iterable[float], *, start: float = -math.inf) -> tuple[int, int]:
    """Claims from ``start`` on, and the most claims within any PEAK_WINDOW_SECONDS that ends
    at one of them. Earlier arrivals (up to a window before ``start``) count towards those
    windows, so a class that straddles two slots is remembered whole in the later one."""
    times = sorted(arrivals)
    peak = 0
    first = 0
    for last, moment in enumerate(times):
        while moment - times[first] >= PEAK_WINDOW_SECONDS:
            first += 1
        if moment >= start:
            peak = max(peak, last - first + 1)
    return sum(1 for moment in times if moment >= start), peak


def fold_slot(previous: SlotDemand | None, *, claims: int, peak: int) -> SlotDemand:
    """The slot's profile after one more week: the rate moves towards this week's, a burst is
    remembered at once and forgotten slowly."""
    rate = claims / SLOT_SECONDS
    if previous is None:
        return SlotDemand(rate, float(peak))
    return SlotDemand(
        RATE_MEMORY * rate + (1 - RATE_MEMORY) * previous.rate,
        max(float(peak), PEAK_DECAY_PER_WEEK * previous.peak),
        previous.weeks + 1,
        previous.peak,
    )


def recent_rate(
    arrivals: Sequence[float], *, now: float, usual_rate: float, claims_last_hour: int = 0
) -> float:
    """Claims per second now.

    The last hour's average, unless the last RECENT_WINDOW_SECONDS clearly disagree with it
    (demand changed): then theirs. A surge in a short window that the usual rate would very
    rarely produce (a class opening the same scenario) wins over both.
    """
    recent = [t for t in arrivals if now - RECENT_WINDOW_SECONDS < t <= now]
    hourly = claims_last_hour / 3600
    rate = hourly
    expected = hourly * RECENT_WINDOW_SECONDS
    if (
        poisson_sf(len(recent) - 1, expected) < RATE_CHANGE_SIGNIFICANCE
        or 1 - poisson_sf(len(recent), expected) < RATE_CHANGE_SIGNIFICANCE
    ):
        rate = len(recent) / RECENT_WINDOW_SECONDS
    usual = max(rate, usual_rate)
    for window in SURGE_WINDOWS_SECONDS:
        count = sum(1 for t in recent if now - window < t)
        if count < SURGE_MIN_CLAIMS:
            continue
        if poisson_sf(count - 1, usual * window) < SURGE_SIGNIFICANCE:
            rate = max(rate, count / window)
    return rate


@dataclass(frozen=True, kw_only=True)
class Demand:
    """What the prewarmer knows of a pool's demand at one moment."""

    arrivals: tuple[float, ...] = ()  # claim times within RECENT_WINDOW_SECONDS
    profile: Mapping[int, SlotDemand] = field(default_factory=dict)  # slot of the week
    claims_last_hour: int = 0
    misses_last_hour: int = 0
