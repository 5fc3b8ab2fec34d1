"""The prewarmer's plan for one pool on one tick: how many to create, which to retire, and why
creation may be held back."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Final

from shared.domain.pools.config import PoolMode

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
    BOOTING_CAP = "booting_cap"  # the region boots as many environments as it may at once
    BUDGET = "budget"  # the region's pools hold as many VMs as its pool budget allows


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
    boot_room: int | None = None,
    budget_room: int | None = None,
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
    - the region's room bounds creation too: ``boot_room`` more environments may boot in it
      now (its cap of boots at once), ``budget_room`` more of this pool's fit its pool budget
      (None: no bound);
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
        blocked = _held_back(
            paused=paused,
            capacity_blocked=capacity_blocked or any(b.unschedulable for b in live),
            boot_room=boot_room,
            budget_room=budget_room,
        )
        if blocked is None and health.failures > 0:
            waited = now - (health.last_failure_at or now)
            if waited < backoff_seconds(health.failures):
                blocked = Blocked.BACKOFF
            else:
                create = 1  # half open: one probe until a creation succeeds
    if blocked is not None:
        create = 0
    for room in (boot_room, budget_room):
        if room is not None:
            create = min(create, max(0, room))
    return PoolPlan(
        target=target,
        create=create,
        retire=tuple(retire),
        ceiling=held + create,
        blocked=blocked,
    )


def _held_back(
    *, paused: bool, capacity_blocked: bool, boot_room: int | None, budget_room: int | None
) -> Blocked | None:
    """Why creation waits this tick whatever the pool's health, if it does."""
    if paused:
        return Blocked.PAUSED
    if capacity_blocked:
        return Blocked.CAPACITY
    if boot_room is not None and boot_room <= 0:
        return Blocked.BOOTING_CAP
    if budget_room is not None and budget_room <= 0:
        return Blocked.BUDGET
    return None
