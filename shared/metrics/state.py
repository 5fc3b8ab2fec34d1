"""What Redis knows, as gauges read at scrape time: right whichever process answers.

Each warm pool's target, ready and booting environments and pause; the dead letters waiting for
an operator; each region's liveness (from the workers' heartbeats) and drain flag; and each
template's startup timeout, the budget its time to ready is judged against. A scrape that
cannot read Redis answers ``labvirt_redis_up 0`` (and the process's own series) instead.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import redis
import structlog
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from shared.adapters.dead_letters import DeadLetters
from shared.adapters.pool_store import RedisPoolStore
from shared.adapters.region_state import RedisRegionState
from shared.domain.lifecycle import clocks_for
from shared.domain.pools.config import PoolConfig, PoolKey
from shared.runtime import Runtime, clock_overrides

log = structlog.get_logger(__name__)

_POOL = ["region", "template"]


@dataclass(frozen=True, eq=False)  # a registry keys its collectors by identity
class StateCollector:
    pools: RedisPoolStore | None
    dead_letters: DeadLetters
    regions: RedisRegionState
    region_names: Sequence[str]
    # Each template's pool default and startup timeout (with the operator's overrides).
    templates: Mapping[str, tuple[PoolConfig, float]]

    def collect(self) -> Iterable[Metric]:
        up = GaugeMetricFamily("labvirt_redis_up", "1 when this scrape could read Redis")
        try:
            families = [*self._pools(), *self._regions(), self._dead_letters()]
        except redis.RedisError as exc:
            log.warning("metrics.redis_unreadable", error=str(exc))
            up.add_metric([], 0)
            return [up, self._budgets()]
        up.add_metric([], 1)
        return [up, *families, self._budgets()]

    def _pools(self) -> list[Metric]:
        target = GaugeMetricFamily(
            "labvirt_pool_target", "Environments a pool aims at", labels=_POOL
        )
        ready = GaugeMetricFamily(
            "labvirt_pool_ready", "Booted environments waiting for a session", labels=_POOL
        )
        in_flight = GaugeMetricFamily(
            "labvirt_pool_in_flight", "Environments of a pool still booting", labels=_POOL
        )
        paused = GaugeMetricFamily(
            "labvirt_pool_paused", "1 when a pool (or every pool) is paused", labels=_POOL
        )
        if self.pools is not None:
            paused_all = self.pools.globally_paused()
            for region in self.region_names:
                for template, (default, _) in sorted(self.templates.items()):
                    key = PoolKey(region, template)
                    config = self.pools.config(key, default=default)
                    snapshot = self.pools.snapshot(key)
                    labels = [region, template]
                    target.add_metric(labels, config.target(snapshot.target))
                    ready.add_metric(labels, len(snapshot.ready))
                    in_flight.add_metric(labels, len(snapshot.booting))
                    paused.add_metric(labels, int(config.paused or paused_all))
        return [target, ready, in_flight, paused]

    def _regions(self) -> list[Metric]:
        up = GaugeMetricFamily(
            "labvirt_region_up",
            "1 while a worker's heartbeat says the region's cluster can be listed and watched "
            "(also before any worker reported it); 0 once it is down",
            labels=["region"],
        )
        drained = GaugeMetricFamily(
            "labvirt_region_drained", "1 when an operator drained the region", labels=["region"]
        )
        for region, flags in self.regions.flags(self.region_names).items():
            up.add_metric([region], 0 if flags.down else 1)
            drained.add_metric([region], int(flags.drained))
        return [up, drained]

    def _dead_letters(self) -> Metric:
        return GaugeMetricFamily(
            "labvirt_dead_letters_failed",
            "Tasks failed for good and not requeued: waiting for an operator",
            value=self.dead_letters.failed_count(),
        )

    def _budgets(self) -> Metric:
        budget = GaugeMetricFamily(
            "labvirt_template_startup_timeout_seconds",
            "A template's startup timeout: a session not ready by then fails",
            labels=["template"],
        )
        for template, (_, seconds) in sorted(self.templates.items()):
            budget.add_metric([template], seconds)
        return budget


def state_collector(runtime: Runtime) -> StateCollector:
    overrides = clock_overrides(runtime.settings)
    return StateCollector(
        pools=runtime.pools,
        dead_letters=runtime.dead_letters,
        regions=RedisRegionState(runtime.redis),
        region_names=runtime.settings.regions,
        templates={
            name: (template.pool, clocks_for(template, overrides).startup_timeout_seconds)
            for name, template in runtime.templates.items()
        },
    )
