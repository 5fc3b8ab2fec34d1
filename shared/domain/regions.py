"""Which region a new session goes to: pure rules over the regions' state and the request's hint.

A region is *usable* for an environment of ``vms`` VMs when it is neither down (its workers are
silent or its API unreachable) nor drained (an operator's flag), and has room: no
``capacity_vms``, or its VMs in use (sessions' and warm pools', booting ones included) plus
``vms`` stay within it. A ready warm environment of the template makes room by itself: claiming
it adds no VM. It must also be under its caps: fewer sessions than ``max_live_sessions``, and
fewer environments booting than ``max_booting`` (a warm claim boots nothing, so a ready warm
environment of the template passes that cap too).

The rules (``choose_region``):

- ``region`` (explicit): that region if usable; otherwise an error saying why (full, down or
  drained). An explicit choice is never moved silently.
- ``location`` or ``country`` (a country is placed at its approximate centre): the regions with
  a location, nearest first by great-circle distance (ties by name), and the first usable one
  wins; when none is usable, the default region if it has no location (regions without one are
  only ever picked explicitly or as the default).
- no hint: the default region first; then the other regions with a location, nearest to the
  default region first (by name when the default has no location). A learner who says nothing
  stays as close to the operator's default as the regions' load allows.

Every choice carries a reason the API returns (``"nearest with capacity (1,240 km)"``, ``"nearest
region us is full; next nearest (6,200 km)"``), and every refusal names each region it passed
over and why.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Final

from shared.domain.country_centroids import COUNTRY_CENTROIDS

# Mean Earth radius (IUGG), kilometres: the great-circle distance on a sphere is plenty here.
EARTH_RADIUS_KM: Final = 6371.0088
# How long a caller told "full" should wait before asking again (sessions end, pools shrink).
FULL_RETRY_AFTER_SECONDS: Final = 30
# A region at its cap of booting environments has room again as soon as a boot finishes.
BOOTING_RETRY_AFTER_SECONDS: Final = 10


class InvalidHint(ValueError):
    """A hint that cannot be followed: a bad location, or more than one kind of hint."""


class UnknownCountry(InvalidHint):
    def __init__(self, code: str) -> None:
        super().__init__(f"{code!r} is not a known ISO 3166 alpha-2 country code")
        self.code = code


class UnknownRegion(LookupError):
    def __init__(self, region: str, known: Sequence[str]) -> None:
        super().__init__(f"no cluster serves region {region!r}")
        self.region = region
        self.known = tuple(known)


@dataclass(frozen=True)
class Location:
    """A point on Earth in degrees: latitude -90..90, longitude -180..180."""

    lat: float
    lon: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.lat) and -90.0 <= self.lat <= 90.0):
            raise InvalidHint(f"latitude {self.lat} is outside -90..90")
        if not (math.isfinite(self.lon) and -180.0 <= self.lon <= 180.0):
            raise InvalidHint(f"longitude {self.lon} is outside -180..180")

    def to_dict(self) -> dict[str, float]:
        return {"lat": self.lat, "lon": self.lon}


def distance_km(a: Location, b: Location) -> float:
    """Great-circle distance (haversine), in kilometres."""
    lat1, lat2 = math.radians(a.lat), math.radians(b.lat)
    dlat = lat2 - lat1
    dlon = math.radians(b.lon - a.lon)
    h = math.sin(dlat / 2) ** 2 + math.cos(lat1) * math.cos(lat2) * math.sin(dlon / 2) ** 2
    return 2 * EARTH_RADIUS_KM * math.asin(min(1.0, math.sqrt(h)))


def country_location(code: str) -> Location:
    """The approximate centre of a country by its ISO 3166 alpha-2 code (any case)."""
    found = COUNTRY_CENTROIDS.get(code.upper())
    if found is None:
        raise UnknownCountry(code)
    return Location(*found)


class Unusable(StrEnum):
    """Why a region cannot take a session now, most lasting first."""

    DOWN = "down"
    DRAINED = "drained"
    FULL = "full"
    SESSION_CAP = "session_cap"  # as many live sessions as the region may hold
    BOOTING_CAP = "booting_cap"  # as many environments booting as the region may boot at once

    @property
    def retry_after(self) -> int | None:
        """Seconds to wait before asking again; None when waiting will not help."""
        return _RETRY_AFTER.get(self)


_RETRY_AFTER: Final = {
    Unusable.FULL: FULL_RETRY_AFTER_SECONDS,
    Unusable.SESSION_CAP: FULL_RETRY_AFTER_SECONDS,
    Unusable.BOOTING_CAP: BOOTING_RETRY_AFTER_SECONDS,
}
_DESCRIPTIONS: Final = {
    Unusable.SESSION_CAP: "at its cap of live sessions",
    Unusable.BOOTING_CAP: "at its cap of environments booting at once",
}


@dataclass(frozen=True, kw_only=True)
class RegionState:
    """One region as the choice sees it at one moment."""

    name: str
    location: Location | None = None
    capacity_vms: int | None = None  # None: no limit
    vms_in_use: int = 0  # sessions' VMs and warm pools' (booting ones included)
    warm: int = 0  # ready warm environments of the requested template: a claim adds no VM
    down: bool = False
    drained: bool = False
    live_sessions: int = 0  # sessions not yet ended
    max_live_sessions: int | None = None  # None: no cap
    booting: int = 0  # environments booting: sessions' (provisioning) and warm pools'
    max_booting: int | None = None  # None: no cap

    def has_room(self, vms: int) -> bool:
        if self.capacity_vms is None or self.warm > 0:
            return True
        return self.vms_in_use + vms <= self.capacity_vms

    def unusable_for(self, vms: int) -> Unusable | None:
        if self.down:
            return Unusable.DOWN
        if self.drained:
            return Unusable.DRAINED
        if not self.has_room(vms):
            return Unusable.FULL
        if self.max_live_sessions is not None and self.live_sessions >= self.max_live_sessions:
            return Unusable.SESSION_CAP
        if self.max_booting is not None and self.booting >= self.max_booting and not self.warm:
            return Unusable.BOOTING_CAP
        return None


@dataclass(frozen=True)
class RegionHint:
    """What a create request says about where: at most one of an explicit region, a location
    or a country; nothing lets labvirt choose from the default region."""

    region: str | None = None
    location: Location | None = None
    country: str | None = None

    def __post_init__(self) -> None:
        given = [k for k in ("region", "location", "country") if getattr(self, k) is not None]
        if len(given) > 1:
            raise InvalidHint(f"give at most one of region, location and country, not {given}")
        if self.country is not None:
            country_location(self.country)  # an unknown code is refused here, not later

    @property
    def point(self) -> Location | None:
        """Where the learner is, when the hint says."""
        if self.location is not None:
            return self.location
        if self.country is not None:
            return country_location(self.country)
        return None


@dataclass(frozen=True)
class RegionChoice:
    region: str
    reason: str
    distance_km: float | None = None


class NoRegion(Exception):
    """No region can take the session now.

    ``region`` is the explicit region refused (None when labvirt was choosing); ``why`` the
    reason that applies (a passing one, full or at a cap, when any passed-over region has one:
    asking again later may work); ``passed`` every region considered, in order, with why it
    was passed over.
    """

    def __init__(
        self,
        message: str,
        *,
        region: str | None,
        why: Unusable,
        passed: tuple[tuple[str, Unusable], ...],
    ) -> None:
        super().__init__(message)
        self.message = message
        self.region = region
        self.why = why
        self.passed = passed

    @property
    def retry_after(self) -> int | None:
        return self.why.retry_after


def choose_region(
    regions: Sequence[RegionState], *, hint: RegionHint, vms: int, default_region: str
) -> RegionChoice:
    """The region a new session of ``vms`` VMs goes to (see the module's rules).

    Raises ``UnknownRegion`` for an explicit region no cluster serves, and ``NoRegion`` when
    no region can take the session.
    """
    by_name = {r.name: r for r in regions}
    if hint.region is not None:
        return _explicit(by_name, hint.region, vms)
    point = hint.point
    if point is not None:
        candidates = _nearest_first(regions, point)
        default = by_name.get(default_region)
        if default is not None and default.location is None:
            candidates.append((default, None))
        first = "nearest" if hint.country is None else f"nearest to {hint.country.upper()}"
        return _first_usable(candidates, vms, first=first, default_region=default_region)
    return _from_default(regions, by_name, vms, default_region)


def _explicit(by_name: dict[str, RegionState], name: str, vms: int) -> RegionChoice:
    region = by_name.get(name)
    if region is None:
        raise UnknownRegion(name, sorted(by_name))
    why = region.unusable_for(vms)
    if why is not None:
        raise NoRegion(
            f"region {name} is {_describe(why)}", region=name, why=why, passed=((name, why),)
        )
    return RegionChoice(name, "requested")


def _nearest_first(
    regions: Sequence[RegionState], point: Location
) -> list[tuple[RegionState, float | None]]:
    located = [(distance_km(point, r.location), r.name, r) for r in regions if r.location]
    return [(region, km) for km, _, region in sorted(located)]


def _from_default(
    regions: Sequence[RegionState],
    by_name: dict[str, RegionState],
    vms: int,
    default_region: str,
) -> RegionChoice:
    default = by_name.get(default_region)
    others = [r for r in regions if r.name != default_region and r.location is not None]
    candidates: list[tuple[RegionState, float | None]] = []
    if default is not None:
        candidates.append((default, None))
    if default is not None and default.location is not None:
        candidates += _nearest_first(others, default.location)
    else:
        candidates += [(r, None) for r in sorted(others, key=lambda r: r.name)]
    return _first_usable(candidates, vms, first="default", default_region=default_region)


def _first_usable(
    candidates: Sequence[tuple[RegionState, float | None]],
    vms: int,
    *,
    first: str,
    default_region: str,
) -> RegionChoice:
    passed: list[tuple[str, Unusable]] = []
    for region, km in candidates:
        why = region.unusable_for(vms)
        if why is not None:
            passed.append((region.name, why))
            continue
        return RegionChoice(
            region.name, _reason(first, region, km, passed, default_region), distance_km=km
        )
    names = ", ".join(f"{name} is {_describe(why)}" for name, why in passed) or "none is known"
    reasons = {why for _, why in passed}
    passing = [why for why in Unusable if why in reasons and why.retry_after is not None]
    why = passing[0] if passing else (passed[0][1] if passed else Unusable.DOWN)
    raise NoRegion(
        f"no region can take it now: {names}", region=None, why=why, passed=tuple(passed)
    )


def _reason(
    first: str,
    region: RegionState,
    km: float | None,
    passed: Sequence[tuple[str, Unusable]],
    default_region: str,
) -> str:
    distance = "" if km is None else f" ({km:,.0f} km)"
    tail = "".join(f"; {name} is {_describe(why)}" for name, why in passed[1:])
    if first == "default":
        if not passed:
            return "default region"
        how = "next nearest to it" if km is not None else "next by name"
        return f"default region {passed[0][0]} is {_describe(passed[0][1])}{tail}; {how}{distance}"
    if region.name == default_region and region.location is None:
        if not passed:
            return "default region (no region has a location)"
        skipped = ", ".join(f"{name} {_describe(why)}" for name, why in passed)
        return f"no region with a location can take it ({skipped}); default region"
    if not passed:
        return f"{first} with capacity{distance}"
    head = f"nearest region {passed[0][0]} is {_describe(passed[0][1])}"
    return f"{head}{tail}; next nearest{distance}"


def _describe(why: Unusable) -> str:
    return _DESCRIPTIONS.get(why, why.value)
