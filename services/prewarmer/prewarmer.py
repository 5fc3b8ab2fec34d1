"""The prewarmer's tick: for every pool, desired level vs what it holds, and the difference.

Level-triggered: each tick reads the pool, asks the domain for a target and a plan, retires
what the plan retires and reserves what it creates, then enqueues the work by task name. A
tick that runs twice, or two prewarmers at once, do no harm: a per-pool lock keeps them apart,
and should it expire mid-tick the reservation itself re-checks the pool's level atomically.
The clock and the queue are injected, so the sizing benchmark drives this same code on a
simulated clock.

A region's limits bound its pools together: their targets are clipped to the region's pool
budget (``shared.domain.pools.budget``), and creations stop at the budget and at the region's
cap of environments booting at once (learners' provisioning sessions and the pools' boots),
short of the share of that cap left to learners' cold starts.
Both are read once per region per tick and spent pool by pool; two prewarmers ticking at the
same moment may each spend the same room, the same soft bound the API's region caps keep.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

import structlog

from shared.adapters.pool_store import PoolSnapshot, PoolStore
from shared.domain.pools.budget import PoolWant, fit_to_budget
from shared.domain.pools.config import PoolConfig, PoolKey, PoolMode
from shared.domain.pools.demand import Demand
from shared.domain.pools.environments import WarmEnvironment, new_warm_environment
from shared.domain.pools.plan import PrewarmLimits, plan_pool
from shared.domain.pools.target import DEFAULT_REFILL_SECONDS, pool_target
from shared.domain.templates import Template
from shared.jobs import BIND_ENVIRONMENT, PREWARM_ENVIRONMENT, RETIRE_ENVIRONMENT

log = structlog.get_logger(__name__)

# A booting environment gets its template's startup timeout plus this before it counts as lost.
BOOT_TIMEOUT_MARGIN_SECONDS: Final = 60.0
# A claim whose VMIs are still unlabelled after this long lost its bind (or its session).
UNBOUND_CLAIM_GRACE_SECONDS: Final = 120.0
# Warming pools must not turn learners away: this share of a region's cap of boots at once
# is left to learners' cold starts (a region at the cap answers their creates 503).
LEARNERS_SHARE_OF_BOOTS: Final = 0.25

# (task name, payload): how the prewarmer hands work to workers (``TaskQueue.enqueue``).
Enqueue = Callable[[str, Mapping[str, str]], None]
# Whether a claimed environment's session still exists and holds it.
ClaimIsLive = Callable[[WarmEnvironment], bool]
# The regions an operator drained: their pools create nothing (what they hold finishes).
DrainedRegions = Callable[[], Collection[str]]
# How many learners' sessions of a region are provisioning (booting their environment).
SessionsBooting = Callable[[str], int]


@dataclass(frozen=True, kw_only=True)
class PoolTick:
    key: PoolKey
    target: int = 0
    ready: int = 0
    booting: int = 0
    created: int = 0
    retired: int = 0
    blocked: str | None = None
    skipped: bool = False  # another prewarmer held this pool's lock


@dataclass(frozen=True, kw_only=True)
class PrewarmSettings:
    tick_seconds: float
    batch: int
    max_in_flight: int
    max_warm_age: float
    # Per region (None: no bound): environments booting at once, sessions' and pools' alike,
    # and the VMs the region's pools may hold together.
    region_max_booting: int | None = None
    region_pool_budget_vms: int | None = None


class Prewarmer:
    def __init__(
        self,
        *,
        store: PoolStore,
        templates: Mapping[str, Template],
        regions: Sequence[str],
        settings: PrewarmSettings,
        enqueue: Enqueue,
        clock: Callable[[], float] = time.time,
        claim_is_live: ClaimIsLive | None = None,
        drained_regions: DrainedRegions | None = None,
        sessions_booting: SessionsBooting | None = None,
    ) -> None:
        self._store = store
        self._templates = templates
        self._regions = regions
        self._settings = settings
        self._enqueue = enqueue
        self._clock = clock
        self._claim_is_live = claim_is_live
        self._drained_regions = drained_regions
        self._sessions_booting = sessions_booting

    def tick(self) -> list[PoolTick]:
        """Reconcile every pool of every region once; a drained region's pools as if paused."""
        now = self._clock()
        paused = self._store.globally_paused()
        drained = set(self._drained_regions()) if self._drained_regions is not None else set()
        outcomes = []
        for region in self._regions:
            outcomes += self._tick_region(region, now=now, paused=paused or region in drained)
        return outcomes

    def _tick_region(self, region: str, *, now: float, paused: bool) -> list[PoolTick]:
        keys = [PoolKey(region, name) for name in sorted(self._templates)]
        snapshots = {key: self._store.snapshot(key) for key in keys}
        # The cluster is shared: VMIs of one pool waiting for room stop every pool's growth.
        capacity_blocked = any(b.unschedulable for s in snapshots.values() for b in s.booting)
        targets = self._budgeted_targets(snapshots, now=now)
        boot_room = self._boot_room(region, snapshots)
        budget_room = self._budget_room(snapshots)
        outcomes = []
        for key in keys:
            vms = len(self._templates[key.template].vms)
            outcome = self.reconcile(
                key,
                now=now,
                paused=paused,
                capacity_blocked=capacity_blocked,
                target=targets[key],
                boot_room=boot_room,
                budget_room=None if budget_room is None else budget_room // vms,
            )
            # Retirements give room back only at the next tick: spending less is the safe side.
            if boot_room is not None:
                boot_room -= outcome.created
            if budget_room is not None:
                budget_room -= outcome.created * vms
            outcomes.append(outcome)
        return outcomes

    def _budgeted_targets(
        self, snapshots: Mapping[PoolKey, PoolSnapshot], *, now: float
    ) -> dict[PoolKey, int]:
        """Each pool's target this tick, clipped so that one region's pools fit its budget."""
        wanted = {key: self._wanted(key, snapshot, now=now) for key, snapshot in snapshots.items()}
        budget = self._settings.region_pool_budget_vms
        if budget is None:
            return {key: target for key, (_, target) in wanted.items()}
        fitted = fit_to_budget(
            [
                PoolWant(
                    key.template,
                    target,
                    len(self._templates[key.template].vms),
                    elastic=config.mode is PoolMode.ADAPTIVE,
                )
                for key, (config, target) in wanted.items()
            ],
            budget,
        )
        return {key: fitted[key.template] for key in wanted}

    def _boot_room(self, region: str, snapshots: Mapping[PoolKey, PoolSnapshot]) -> int | None:
        """How many more warm environments may start booting in ``region`` now, leaving
        learners their share of the cap (None: no cap)."""
        cap = self._settings.region_max_booting
        if cap is None:
            return None
        sessions = self._sessions_booting(region) if self._sessions_booting is not None else 0
        reserved = int(cap * LEARNERS_SHARE_OF_BOOTS)
        return cap - reserved - sessions - sum(len(s.booting) for s in snapshots.values())

    def _budget_room(self, snapshots: Mapping[PoolKey, PoolSnapshot]) -> int | None:
        """How many more VMs the region's pools may hold (None: no budget)."""
        budget = self._settings.region_pool_budget_vms
        if budget is None:
            return None
        held = sum(
            (len(s.ready) + len(s.booting)) * len(self._templates[key.template].vms)
            for key, s in snapshots.items()
        )
        return budget - held

    def reconcile(
        self,
        key: PoolKey,
        *,
        now: float,
        paused: bool = False,
        capacity_blocked: bool = False,
        target: int | None = None,
        boot_room: int | None = None,
        budget_room: int | None = None,
    ) -> PoolTick:
        """One pool; ``target`` (already budgeted) instead of the pool's own, and the room its
        region leaves it, in environments, when the caller read the region (``tick``)."""
        template = self._templates[key.template]
        lock_seconds = max(10.0, 2 * self._settings.tick_seconds)
        with self._store.lock(key, seconds=lock_seconds) as held:
            if not held:
                return PoolTick(key=key, skipped=True)
            return self._reconcile(
                key,
                template,
                now=now,
                paused=paused,
                capacity_blocked=capacity_blocked,
                target=target,
                boot_room=boot_room,
                budget_room=budget_room,
            )

    def _wanted(
        self, key: PoolKey, snapshot: PoolSnapshot, *, now: float
    ) -> tuple[PoolConfig, int]:
        """The pool's configuration and the target it asks for by itself, before the budget."""
        config = self._store.config(key, default=self._templates[key.template].pool)
        self._store.fold_profile(key, now=now)
        demand = self._store.demand(key, now=now) if config.mode is PoolMode.ADAPTIVE else Demand()
        target = pool_target(
            config,
            demand,
            now=now,
            refill_seconds=(
                snapshot.refill_seconds
                if snapshot.refill_seconds is not None
                else DEFAULT_REFILL_SECONDS
            ),
            tick_seconds=self._settings.tick_seconds,
        )
        return config, target

    def _reconcile(
        self,
        key: PoolKey,
        template: Template,
        *,
        now: float,
        paused: bool,
        capacity_blocked: bool,
        target: int | None = None,
        boot_room: int | None = None,
        budget_room: int | None = None,
    ) -> PoolTick:
        snapshot = self._store.snapshot(key)
        if target is None:
            config, target = self._wanted(key, snapshot, now=now)
        else:
            config = self._store.config(key, default=template.pool)
        if snapshot.target != target:
            self._store.set_target(key, target)
        limits = PrewarmLimits(
            batch=self._settings.batch,
            max_in_flight=self._settings.max_in_flight,
            max_warm_age=self._settings.max_warm_age,
            boot_timeout=template.startup_timeout_seconds + BOOT_TIMEOUT_MARGIN_SECONDS,
        )
        plan = plan_pool(
            now=now,
            target=target,
            mode=config.mode,
            paused=paused or config.paused,
            ready=snapshot.ready,
            booting=snapshot.booting,
            health=snapshot.health,
            limits=limits,
            capacity_blocked=capacity_blocked,
            boot_room=boot_room,
            budget_room=budget_room,
        )
        retired = 0
        for retirement in plan.retire:
            if self._store.retire(key, retirement.env_id):
                retired += 1
                self._enqueue(
                    RETIRE_ENVIRONMENT, {"environment_id": retirement.env_id, "region": key.region}
                )
                log.info(
                    "pool.retired",
                    pool=str(key),
                    environment_id=retirement.env_id,
                    reason=retirement.reason.value,
                )
        created = 0
        if plan.create:
            wanted = [new_warm_environment(key=key, now=now) for _ in range(plan.create)]
            reserved = self._store.reserve(
                key, wanted, ceiling=plan.ceiling, max_in_flight=limits.max_in_flight
            )
            for env in reserved:
                self._enqueue(PREWARM_ENVIRONMENT, {"environment_id": env.id})
            created = len(reserved)
        if self._claim_is_live is not None:
            self._sweep_unbound_claims(key, now=now)
        if created or retired or plan.blocked:
            log.info(
                "pool.reconciled",
                pool=str(key),
                target=target,
                ready=len(snapshot.ready),
                booting=len(snapshot.booting),
                created=created,
                retired=retired,
                blocked=plan.blocked.value if plan.blocked else None,
            )
        return PoolTick(
            key=key,
            target=target,
            ready=len(snapshot.ready),
            booting=len(snapshot.booting),
            created=created,
            retired=retired,
            blocked=plan.blocked.value if plan.blocked else None,
        )

    def _sweep_unbound_claims(self, key: PoolKey, *, now: float) -> None:
        """Claims whose VMIs were never relabelled: bind again, or remove what nobody holds
        (the API stopped between the claim and storing the session)."""
        assert self._claim_is_live is not None
        for env in self._store.unbound_claims(key, before=now - UNBOUND_CLAIM_GRACE_SECONDS):
            if env.session_id is not None and self._claim_is_live(env):
                self._enqueue(BIND_ENVIRONMENT, {"session_id": env.session_id})
                log.warning("pool.bind_again", pool=str(key), environment_id=env.id)
            else:
                self._enqueue(RETIRE_ENVIRONMENT, {"environment_id": env.id, "region": key.region})
                log.warning("pool.orphaned_claim", pool=str(key), environment_id=env.id)
            self._store.forget_claim(key, env.id)
