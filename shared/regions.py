"""Where new sessions go: the regions' state read from Redis, and the domain's choice over it.

``RegionPicker.choose`` is the one place a session's region is decided (``SessionLife.open``
calls it under the user's lock); ``RegionPicker.overview`` is what operators see.

A region's load, in VMs, is counted from indexes Redis already keeps in the same transactions
that move sessions and pooled environments, so it can never drift from them:

- sessions: ``labvirt:live-template:<region>:<template>``, the sessions not yet final (booting,
  ready or terminating: their VMs exist) of each template, kept beside ``labvirt:live:<region>``
  by the session store; times the template's VM count. Sessions of the region in no template's
  set (stored before that index existed, or of a template since removed) count as the largest
  template.
- warm pools: each pool's ready and booting environments times the template's VM count
  (claimed ones belong to their session, counted above).

That is a few ``SCARD``/``ZCARD`` per region and template in three round trips, whatever the
number of sessions. The capacity is a soft bound: creates racing for the last room may pass
it by the few in flight, as a cluster's own admission would then decide.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from shared.adapters.pool_store import RedisPoolStore
from shared.adapters.region_state import RedisRegionState, RegionFlags
from shared.adapters.session_store import LiveCount, RedisSessionStore
from shared.config import Settings
from shared.domain.pools.config import PoolKey
from shared.domain.regions import (
    RegionChoice,
    RegionHint,
    RegionState,
    UnknownRegion,
    choose_region,
)
from shared.domain.templates import Template


@dataclass(frozen=True, kw_only=True)
class RegionOverview:
    """One region as operators see it (``GET /v1/admin/regions``)."""

    state: RegionState
    flags: RegionFlags

    def to_dict(self) -> dict[str, Any]:
        s = self.state
        return {
            "region": s.name,
            "location": None if s.location is None else s.location.to_dict(),
            "capacity_vms": s.capacity_vms,
            "vms_in_use": s.vms_in_use,
            "alive": self.flags.alive,
            "drained": self.flags.drained,
        }


class RegionPicker:
    def __init__(
        self,
        *,
        settings: Settings,
        state: RedisRegionState,
        sessions: RedisSessionStore,
        templates: Mapping[str, Template],
        pools: RedisPoolStore | None = None,
    ) -> None:
        self._settings = settings
        self._state = state
        self._sessions = sessions
        self._templates = templates
        self._pools = pools

    @property
    def state(self) -> RedisRegionState:
        """Liveness and drain flags in Redis (the admin routes and the prewarmer use them)."""
        return self._state

    def choose(self, hint: RegionHint, *, template: str) -> RegionChoice:
        """The region a new session of ``template`` goes to (``shared.domain.regions``);
        ``UnknownRegion`` or ``NoRegion`` when none can be."""
        vms = len(self._templates[template].vms) if template in self._templates else 1
        if hint.region is not None and hint.region not in self._settings.regions:
            raise UnknownRegion(hint.region, self._settings.regions)  # nothing to read
        states = [o.state for o in self._read(template)]
        return choose_region(
            states, hint=hint, vms=vms, default_region=self._settings.default_region
        )

    def overview(self) -> list[RegionOverview]:
        return self._read(None)

    def _read(self, template: str | None) -> list[RegionOverview]:
        regions = list(self._settings.regions)
        names = sorted(self._templates)
        vm_counts = {name: len(self._templates[name].vms) for name in names}
        largest = max(vm_counts.values(), default=1)
        flags = self._state.flags(regions)
        live = self._sessions.live_counts(regions, names)
        held: dict[PoolKey, tuple[int, int]] = {}
        if self._pools is not None:
            held = self._pools.held_counts([PoolKey(r, t) for r in regions for t in names])
        found = []
        for region in regions:
            cluster = self._settings.cluster(region)
            vms = _session_vms(live[region], vm_counts, largest)
            vms += sum(
                (ready + booting) * vm_counts[t]
                for t in names
                for ready, booting in [held.get(PoolKey(region, t), (0, 0))]
            )
            warm = held.get(PoolKey(region, template), (0, 0))[0] if template else 0
            state = RegionState(
                name=region,
                location=cluster.location,
                capacity_vms=cluster.capacity_vms,
                vms_in_use=vms,
                warm=warm,
                down=flags[region].down,
                drained=flags[region].drained,
            )
            found.append(RegionOverview(state=state, flags=flags[region]))
        return found


def _session_vms(live: LiveCount, vm_counts: Mapping[str, int], largest: int) -> int:
    indexed = sum(count * vm_counts[t] for t, count in live.by_template.items())
    return indexed + live.unindexed * largest


__all__ = ["RegionOverview", "RegionPicker"]
