"""Warm pools: booted environments waiting for a learner, and the rules that size them.

Pure Python. Three parts:

- the life of one pooled environment (``booting`` -> ``ready`` -> ``claimed``, or ``retired``);
- sizing: a static size, or an adaptive target from demand (recent claim rate, a learned
  time-of-week profile with a burst memory, the measured refill time and the hit-rate target);
- the prewarmer's plan for one pool on one tick: what to create and what to retire.

The sizing model: a pool of ``s`` warm environments whose every claim starts a replacement that
is ready ``T`` seconds later, fed by Poisson claims at rate ``lambda``, loses a claim (the learner
gets a cold environment) exactly when all ``s`` are being refilled. That is Erlang's loss
system, so the miss rate is ``B(s, lambda * T)`` whatever the distribution of ``T``.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any, Final

from shared.domain.sessions import VmView

# -- configuration -----------------------------------------------------------------------------

DEFAULT_HIT_RATE: Final = 0.95
MIN_HIT_RATE: Final = 0.5
MAX_HIT_RATE: Final = 0.999
MAX_POOL_SIZE: Final = 1000
DEFAULT_ADAPTIVE_MAX: Final = 50


@dataclass(frozen=True, order=True)
class PoolKey:
    """One pool: a template's warm environments in one region."""

    region: str
    template: str

    def __str__(self) -> str:
        return f"{self.region}/{self.template}"


class PoolMode(StrEnum):
    STATIC = "static"
    ADAPTIVE = "adaptive"


class InvalidPoolConfig(ValueError):
    """A pool configuration that cannot be honoured (the message says which field)."""


@dataclass(frozen=True, kw_only=True)
class PoolConfig:
    """How big one (region, template) pool should be, and whether it may grow at all."""

    mode: PoolMode = PoolMode.STATIC
    size: int = 0  # static pools
    min_size: int = 0  # adaptive pools: the target never leaves [min_size, max_size]
    max_size: int = DEFAULT_ADAPTIVE_MAX
    hit_rate: float = DEFAULT_HIT_RATE
    paused: bool = False

    def __post_init__(self) -> None:
        problems = []
        for name in ("size", "min_size", "max_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                problems.append(f"{name} must be a whole number")
            elif not 0 <= value <= MAX_POOL_SIZE:
                problems.append(f"{name} must be between 0 and {MAX_POOL_SIZE}, got {value}")
        if not problems and self.min_size > self.max_size:
            problems.append(f"min ({self.min_size}) must not exceed max ({self.max_size})")
        if not (
            isinstance(self.hit_rate, int | float) and MIN_HIT_RATE <= self.hit_rate <= MAX_HIT_RATE
        ):
            problems.append(
                f"hit_rate must be between {MIN_HIT_RATE} and {MAX_HIT_RATE}, got {self.hit_rate}"
            )
        if problems:
            raise InvalidPoolConfig("; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode.value,
            "size": self.size,
            "min": self.min_size,
            "max": self.max_size,
            "hit_rate": self.hit_rate,
            "paused": self.paused,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PoolConfig:
        defaults = cls()
        return cls(
            mode=PoolMode(data.get("mode", defaults.mode)),
            size=int(data.get("size", defaults.size)),
            min_size=int(data.get("min", defaults.min_size)),
            max_size=int(data.get("max", defaults.max_size)),
            hit_rate=float(data.get("hit_rate", defaults.hit_rate)),
            paused=bool(data.get("paused", defaults.paused)),
        )

    def changed(
        self,
        *,
        size: int | None = None,
        mode: PoolMode | None = None,
        min_size: int | None = None,
        max_size: int | None = None,
        hit_rate: float | None = None,
        paused: bool | None = None,
    ) -> PoolConfig:
        """This config with the given fields replaced (validated again); a ``size`` without a
        ``mode`` makes the pool static."""
        changes: dict[str, Any] = {
            name: value
            for name, value in (
                ("size", size),
                ("mode", mode),
                ("min_size", min_size),
                ("max_size", max_size),
                ("hit_rate", hit_rate),
                ("paused", paused),
            )
            if value is not None
        }
        if size is not None and mode is None:
            changes["mode"] = PoolMode.STATIC
        return replace(self, **changes)


# -- one pooled environment --------------------------------------------------------------------


class EnvironmentState(StrEnum):
    BOOTING = "booting"
    READY = "ready"
    CLAIMED = "claimed"
    RETIRED = "retired"


_ENVIRONMENT_MOVES: Final[Mapping[EnvironmentState, frozenset[EnvironmentState]]] = {
    EnvironmentState.BOOTING: frozenset({EnvironmentState.READY, EnvironmentState.RETIRED}),
    EnvironmentState.READY: frozenset({EnvironmentState.CLAIMED, EnvironmentState.RETIRED}),
    # A claimed environment belongs to its session: the session's teardown removes it.
    EnvironmentState.CLAIMED: frozenset(),
    EnvironmentState.RETIRED: frozenset(),
}


class IllegalEnvironmentMove(ValueError):
    def __init__(self, current: EnvironmentState, wanted: EnvironmentState) -> None:
        super().__init__(f"a {current} pooled environment cannot become {wanted}")
        self.current = current
        self.wanted = wanted


def can_move(current: EnvironmentState, wanted: EnvironmentState) -> bool:
    return wanted in _ENVIRONMENT_MOVES[current]


@dataclass(frozen=True, kw_only=True)
class WarmEnvironment:
    """One pooled environment as the pool store records it."""

    id: str
    region: str
    template: str
    token: str  # chosen once at creation, so a retried boot renders identical manifests
    created_at: float
    state: EnvironmentState = EnvironmentState.BOOTING
    ready_at: float | None = None
    vms: tuple[VmView, ...] = ()
    session_id: str | None = None
    claimed_at: float | None = None
    unschedulable: bool = False

    def moved(self, wanted: EnvironmentState) -> WarmEnvironment:
        if not can_move(self.state, wanted):
            raise IllegalEnvironmentMove(self.state, wanted)
        return replace(self, state=wanted)

    def ready(self, *, at: float, vms: Sequence[VmView]) -> WarmEnvironment:
        return replace(self.moved(EnvironmentState.READY), ready_at=at, vms=tuple(vms))

    def claimed(self, *, session_id: str, at: float) -> WarmEnvironment:
        return replace(self.moved(EnvironmentState.CLAIMED), session_id=session_id, claimed_at=at)


_TOKEN_ALPHABET: Final = "abcdefghijklmnopqrstuvwxyz0123456789"  # noqa: S105 - an alphabet


def new_warm_environment(*, key: PoolKey, now: float) -> WarmEnvironment:
    """A pooled environment about to be reserved: a fresh id, and a cloud-init token chosen
    once (kubeadm's bootstrap-token shape, [a-z0-9]{6}.[a-z0-9]{16}) so every retry of its
    boot renders the same manifests."""
    token = "".join(secrets.choice(_TOKEN_ALPHABET) for _ in range(22))
    return WarmEnvironment(
        id=secrets.token_hex(5),
        region=key.region,
        template=key.template,
        token=f"{token[:6]}.{token[6:]}",
        created_at=now,
    )


# -- the sizing math ---------------------------------------------------------------------------


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
    if mean > _POISSON_DIRECT_LIMIT:  # e**-mean underflows: sum the terms in log space
        log_mean = math.log(mean)
        cdf = math.fsum(math.exp(-mean + i * log_mean - math.lgamma(i + 1)) for i in range(k + 1))
        return max(0.0, 1.0 - cdf)
    term = math.exp(-mean)
    cdf = term
    for i in range(1, k + 1):
        term *= mean / i
        cdf += term
    return max(0.0, 1.0 - cdf)


_POISSON_DIRECT_LIMIT: Final = 500.0


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


# -- demand: recent claims and a time-of-week profile ------------------------------------------

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
LEAD_SECONDS: Final = 300.0  # warm up this long (beyond one refill) before a slot starts
# A remembered burst is held this long past its slot: a class is punctual only to a few minutes.
BURST_LINGER_SECONDS: Final = 600.0
DITHER_PERIOD_SECONDS: Final = 600.0
MISS_BUDGET_MIN_CLAIMS: Final = 20  # below this the last hour says too little to correct on
MISS_BUDGET_SIGNIFICANCE: Final = 0.01  # misses this unlikely within budget mean a wrong model
DEFAULT_REFILL_SECONDS: Final = 30.0  # assumed cold start until one has been measured
REFILL_MEMORY: Final = 0.2  # weight of the newest measured refill time


def absolute_slot(moment: float) -> int:
    return int(moment // SLOT_SECONDS)


def slot_of_week(slot: int) -> int:
    return slot % SLOTS_PER_WEEK


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


def upcoming_slots(now: float, horizon: float) -> list[int]:
    """Slots of the week from now until ``now + horizon``."""
    first, last = absolute_slot(now), absolute_slot(now + horizon)
    return [slot_of_week(slot) for slot in range(first, last + 1)]


@dataclass(frozen=True, kw_only=True)
class Demand:
    """What the prewarmer knows of a pool's demand at one moment."""

    arrivals: tuple[float, ...] = ()  # claim times within RECENT_WINDOW_SECONDS
    profile: Mapping[int, SlotDemand] = field(default_factory=dict)  # slot of the week
    claims_last_hour: int = 0
    misses_last_hour: int = 0


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


def next_refill_estimate(previous: float | None, measured: float) -> float:
    """The refill time to plan with after one more measured cold start (a moving average)."""
    if measured < 0 or not math.isfinite(measured):
        raise ValueError(f"a refill time must be a finite non-negative number, got {measured}")
    if previous is None:
        return measured
    return REFILL_MEMORY * measured + (1 - REFILL_MEMORY) * previous


# -- the prewarmer's plan for one pool ---------------------------------------------------------

BACKOFF_BASE_SECONDS: Final = 10.0
BACKOFF_CAP_SECONDS: Final = 300.0


@dataclass(frozen=True)
class ReadyEntry:
    env_id: str
    ready_at: float


@dataclass(frozen=True)
class BootingEntry:
    env_id: str
    started_at: float
    unschedulable: bool = False


@dataclass(frozen=True, kw_only=True)
class PoolHealth:
    """Consecutive failed creations, and when the last one failed."""

    failures: int = 0
    last_failure_at: float | None = None


@dataclass(frozen=True, kw_only=True)
class PrewarmLimits:
    batch: int  # most creations per pool per tick
    max_in_flight: int  # most environments booting per pool
    max_warm_age: float  # a ready environment older than this is recycled (images go stale)
    boot_timeout: float  # a booting environment older than this is lost: retire it

    def __post_init__(self) -> None:
        if self.batch < 1 or self.max_in_flight < 1:
            raise ValueError("batch and max_in_flight must be at least 1")
        if self.max_warm_age <= 0 or self.boot_timeout <= 0:
            raise ValueError("max_warm_age and boot_timeout must be positive")


class Blocked(StrEnum):
    PAUSED = "paused"
    CAPACITY = "capacity"  # VMIs of the region's pools wait for room: do not add more
    BACKOFF = "backoff"  # recent creations failed


class RetireReason(StrEnum):
    LOST = "lost"  # booting for longer than any boot may take
    STALE = "stale"
    EXCESS = "excess"


@dataclass(frozen=True)
class Retirement:
    env_id: str
    reason: RetireReason


@dataclass(frozen=True, kw_only=True)
class PoolPlan:
    target: int
    create: int
    retire: tuple[Retirement, ...]
    # Ready + booting may reach this once the plan is applied; a reservation checks it again
    # atomically, so two prewarmers acting on one snapshot create nothing extra.
    ceiling: int
    blocked: Blocked | None = None


def backoff_seconds(failures: int) -> float:
    if failures <= 0:
        return 0.0
    return float(min(BACKOFF_CAP_SECONDS, BACKOFF_BASE_SECONDS * 2.0 ** min(failures - 1, 30)))


def plan_pool(
    *,
    now: float,
    target: int,
    mode: PoolMode,
    paused: bool,
    ready: Sequence[ReadyEntry],
    booting: Sequence[BootingEntry],
    health: PoolHealth,
    limits: PrewarmLimits,
    capacity_blocked: bool = False,
) -> PoolPlan:
    """Desired vs actual for one pool: level-triggered, so running it twice does no harm.

    - booting environments past the boot timeout are lost: retire them;
    - over target: cancel booting ones (newest first), then retire ready ones (oldest first);
      an adaptive pool keeps one spare, which the next claim takes, rather than destroy it;
    - stale ready environments are replaced before they go (make before break), one batch at
      a time, and retired at twice the age whatever happens;
    - under target: create, at most a batch per tick and up to max_in_flight booting, never
      while paused, while the region has VMIs waiting for capacity, or while backing off
      from failures (then one probe at a time until a creation succeeds);
    - ready + booting never exceeds target + one batch.
    """
    if target < 0:
        raise ValueError(f"target must not be negative, got {target}")
    retire: list[Retirement] = []
    lost = [b for b in booting if now - b.started_at > limits.boot_timeout]
    retire += [Retirement(b.env_id, RetireReason.LOST) for b in lost]
    live = sorted((b for b in booting if b not in lost), key=lambda b: (b.started_at, b.env_id))
    by_age = sorted(ready, key=lambda r: (r.ready_at, r.env_id))
    fresh = [r for r in by_age if now - r.ready_at < limits.max_warm_age]
    stale = [r for r in by_age if now - r.ready_at >= limits.max_warm_age]
    expired = [r for r in stale if now - r.ready_at >= 2 * limits.max_warm_age]
    retire += [Retirement(r.env_id, RetireReason.STALE) for r in expired]
    stale = [r for r in stale if r not in expired]

    slack = 1 if mode is PoolMode.ADAPTIVE else 0
    excess = len(fresh) + len(live) - target
    if excess > slack:
        surplus = excess - slack
        cancelled = live[::-1][:surplus]
        live = [b for b in live if b not in cancelled]
        retire += [Retirement(b.env_id, RetireReason.EXCESS) for b in cancelled]
        surplus -= len(cancelled)
        retire += [Retirement(r.env_id, RetireReason.EXCESS) for r in fresh[:surplus]]
        fresh = fresh[surplus:]

    # Stale ones stay claimable until fresh ones can take their place.
    replaced = max(0, len(fresh) + len(stale) - target)
    retire += [Retirement(r.env_id, RetireReason.STALE) for r in stale[:replaced]]
    stale = stale[replaced:]

    held = len(fresh) + len(live) + len(stale)
    create = max(0, target - len(fresh) - len(live))
    create = min(create, limits.batch, max(0, limits.max_in_flight - len(live)))
    create = min(create, max(0, target + limits.batch - held))
    blocked: Blocked | None = None
    if create > 0:
        if paused:
            blocked = Blocked.PAUSED
        elif capacity_blocked or any(b.unschedulable for b in live):
            blocked = Blocked.CAPACITY
        elif health.failures > 0:
            waited = now - (health.last_failure_at or now)
            if waited < backoff_seconds(health.failures):
                blocked = Blocked.BACKOFF
            else:
                create = 1  # half open: one probe until a creation succeeds
    if blocked is not None:
        create = 0
    return PoolPlan(
        target=target,
        create=create,
        retire=tuple(retire),
        ceiling=held + create,
        blocked=blocked,
    )
