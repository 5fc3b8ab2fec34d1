"""Where new sessions go: the regions' state read from Redis, and the domain's choice over it.

``RegionPicker.choose`` is the one place a session's region is decided (``SessionLife.open``
calls it under the user's lock); ``RegionPicker.overview`` is what operators see.

A region's load, in VMs, is counted from indexes Redis already keeps in the same transactions
that move sessions and pooled environments, so it can never drift from them:

- sessions: ``labvirt:live-template:{sNN}:<region>:<template>``, the sessions not yet final
  (booting, ready or terminating: their VMs exist) of each template, kept beside
  ``labvirt:live:{sNN}:<region>`` by the session store, one part per session shard
  (``session_indexes``); times the template's VM count. Sessions of the region in no template's
  set (stored before that index existed, or of a template since removed) count as the largest
  template.
- warm pools: each pool's ready and booting environments times the template's VM count
  (claimed ones belong to their session, counted above).

That is a few ``SCARD``/``ZCARD`` per region and template in three round trips, whatever the
number of sessions. The API keeps a reading for a moment and counts in the sessions it places
meanwhile, deciding from it only far from every limit (``shared.region_readings``). The
capacity is a soft bound: creates racing for the last room may pass it by the few in flight, as
a cluster's own admission would then decide.

The per-region caps (``Settings.limits``) are read from the same round trips and are the same
kind of soft bound: live sessions are the size of the region's live index (sessions not yet
ended, closing ones included until their VMs are gone); environments booting are the size of
its booting index (provisioning sessions, kept by the session store in the transactions that
move them) plus each warm pool's booting ones. Creates racing for the last place may
pass a cap by the few in flight; none waits in a queue: a region at a cap answers 503 with
``Retry-After``, as a full one does. The sessions a ``replace`` closes do not count against the
caps: the create gives back as many as it takes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
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
from shared.domain.sessions import Session, SessionState
from shared.domain.templates import Template
from shared.region_readings import ReadingCache, RegionReading, far_from_limits


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
        readings: ReadingCache | None = None,
    ) -> None:
        """``readings``: keep a reading for a moment (``shared.region_readings``); without
        it every choice reads Redis afresh."""
        self._settings = settings
        self._state = state
        self._sessions = sessions
        self._templates = templates
        self._pools = pools
        self._readings = readings

    @property
    def state(self) -> RedisRegionState:
        """Liveness and drain flags in Redis (the admin routes and the prewarmer use them)."""
        return self._state

    @property
    def keeps_readings(self) -> bool:
        return self._readings is not None

    def likely_region(self, hint: RegionHint) -> str | None:
        """Where a create with ``hint`` most likely goes, for what may be read before
        ``choose``: the named region, else the default one; None for a location or a country
        (the nearest with room is not guessed)."""
        if hint.region is not None:
            return hint.region
        return None if hint.point is not None else self._settings.default_region

    def queue_version(self, pipe: Any) -> Callable[[Iterator[Any]], int]:
        """Queue the read of the regions' version on ``pipe`` (``choose`` takes it)."""
        return self._state.queue_version(pipe)

    def choose(
        self,
        hint: RegionHint,
        *,
        template: str,
        replacing: Sequence[Session] = (),
        version: int | None = None,
    ) -> RegionChoice:
        """The region a new session of ``template`` goes to (``shared.domain.regions``);
        ``UnknownRegion`` or ``NoRegion`` when none can be. ``replacing``: the user's sessions
        this create closes, which do not count against the caps; ``version``: the regions'
        version, if just read (``queue_version``)."""
        vms = len(self._templates[template].vms) if template in self._templates else 1
        if hint.region is not None and hint.region not in self._settings.regions:
            raise UnknownRegion(hint.region, self._settings.regions)  # nothing to read
        default = self._settings.default_region
        if self._readings is not None:
            version = self._state.version() if version is None else version
            kept = self._readings.get(version)
            if kept is not None:
                states = [_without(o.state, replacing) for o in self._states(kept, template)]
                if all(far_from_limits(state, vms) for state in states):
                    return choose_region(states, hint=hint, vms=vms, default_region=default)
            reading = self._read(version)
            self._readings.put(reading)
        else:
            reading = self._read(0)
        states = [_without(o.state, replacing) for o in self._states(reading, template)]
        return choose_region(states, hint=hint, vms=vms, default_region=default)

    def placed(self, session: Session) -> None:
        """``session`` was placed in its region: counted into the kept reading until the next."""
        if self._readings is not None:
            self._readings.placed(session)

    def overview(self) -> list[RegionOverview]:
        return self._states(self._read(0), None)

    def _read(self, version: int) -> RegionReading:
        taken_at = self._readings.now() if self._readings is not None else 0.0
        regions = list(self._settings.regions)
        names = sorted(self._templates)
        held: dict[PoolKey, tuple[int, int]] = {}
        if self._pools is not None:
            held = self._pools.held_counts([PoolKey(r, t) for r in regions for t in names])
        return RegionReading(
            version=version,
            taken_at=taken_at,
            flags=self._state.flags(regions),
            live=self._sessions.live_counts(regions, names),
            held=held,
        )

    def _states(self, reading: RegionReading, template: str | None) -> list[RegionOverview]:
        regions = list(self._settings.regions)
        names = sorted(self._templates)
        vm_counts = {name: len(self._templates[name].vms) for name in names}
        largest = max(vm_counts.values(), default=1)
        flags, live, held = reading.flags, reading.live, reading.held
        limits = self._settings.limits
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
            pools_booting = sum(held.get(PoolKey(region, t), (0, 0))[1] for t in names)
            state = RegionState(
                name=region,
                location=cluster.location,
                capacity_vms=cluster.capacity_vms,
                vms_in_use=vms,
                warm=warm,
                down=flags[region].down,
                drained=flags[region].drained,
                live_sessions=live[region].total,
                max_live_sessions=limits.region_max_live_sessions,
                booting=live[region].booting + pools_booting,
                max_booting=limits.region_max_booting,
            )
            found.append(RegionOverview(state=state, flags=flags[region]))
        return found


def pick_region(
    picker: RegionPicker | None,
    hint: RegionHint,
    *,
    template: str,
    replacing: Sequence[Session] = (),
    version: int | None = None,
) -> RegionChoice:
    """``picker``'s choice; without a picker (tests, benchmarks) the region the hint names."""
    if picker is not None:
        return picker.choose(hint, template=template, replacing=replacing, version=version)
    if hint.region is None:
        raise ValueError("this SessionLife has no region picker: name the region")
    return RegionChoice(hint.region, "requested")


def _without(state: RegionState, leaving: Sequence[Session]) -> RegionState:
    """The region's counts once the sessions a replace closes have gone: a learner who swaps
    one environment for another is not refused for the place their own session takes."""
    mine = [s for s in leaving if s.region == state.name and not s.is_final]
    if not mine:
        return state
    provisioning = sum(1 for s in mine if s.state is SessionState.PROVISIONING)
    return replace(
        state,
        live_sessions=max(0, state.live_sessions - len(mine)),
        booting=max(0, state.booting - provisioning),
    )


def _session_vms(live: LiveCount, vm_counts: Mapping[str, int], largest: int) -> int:
    indexed = sum(count * vm_counts[t] for t, count in live.by_template.items())
    return indexed + live.unindexed * largest


__all__ = ["RegionOverview", "RegionPicker", "pick_region"]
