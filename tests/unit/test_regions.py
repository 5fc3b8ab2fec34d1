"""Choosing a session's region (``shared.domain.regions``): examples, then properties.

Frankfurt and Virginia are the two regions of most examples; Paris, New York and Sydney the
learners."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.domain.country_centroids import COUNTRY_CENTROIDS
from shared.domain.regions import (
    FULL_RETRY_AFTER_SECONDS,
    InvalidHint,
    Location,
    NoRegion,
    RegionChoice,
    RegionHint,
    RegionState,
    UnknownCountry,
    UnknownRegion,
    Unusable,
    choose_region,
    country_location,
    distance_km,
)

FRANKFURT = Location(50.1, 8.7)
VIRGINIA = Location(38.9, -77.0)
SINGAPORE = Location(1.35, 103.8)
PARIS = Location(48.86, 2.35)
NEW_YORK = Location(40.71, -74.0)
SYDNEY = Location(-33.9, 151.2)


def eu(**kw: object) -> RegionState:
    return RegionState(name="eu", location=FRANKFURT, capacity_vms=10, **kw)  # type: ignore[arg-type]


def us(**kw: object) -> RegionState:
    return RegionState(name="us", location=VIRGINIA, capacity_vms=10, **kw)  # type: ignore[arg-type]


def ap(**kw: object) -> RegionState:
    return RegionState(name="ap", location=SINGAPORE, capacity_vms=10, **kw)  # type: ignore[arg-type]


def choose(*regions: RegionState, hint: RegionHint, vms: int = 1, default: str = "eu") -> str:
    return choose_region(regions, hint=hint, vms=vms, default_region=default).region


# -- distances and countries -------------------------------------------------------------------


def test_great_circle_distances_are_the_known_ones() -> None:
    assert distance_km(PARIS, FRANKFURT) == pytest.approx(480, rel=0.03)
    assert distance_km(NEW_YORK, VIRGINIA) == pytest.approx(330, rel=0.05)
    assert distance_km(FRANKFURT, VIRGINIA) == pytest.approx(6_550, rel=0.03)
    assert distance_km(PARIS, PARIS) == 0
    # Antipodes: half the circumference, whatever the rounding.
    assert distance_km(Location(0, 0), Location(0, 180)) == pytest.approx(math.pi * 6371.0088)


EU = [
    "AT",
    "BE",
    "BG",
    "HR",
    "CY",
    "CZ",
    "DK",
    "EE",
    "FI",
    "FR",
    "DE",
    "GR",
    "HU",
    "IE",
    "IT",
    "LV",
    "LT",
    "LU",
    "MT",
    "NL",
    "PL",
    "PT",
    "RO",
    "SK",
    "SI",
    "ES",
    "SE",
]
OTHERS = [
    "US",
    "CA",
    "MX",
    "BR",
    "AR",
    "GB",
    "CH",
    "NO",
    "IN",
    "CN",
    "JP",
    "KR",
    "SG",
    "AU",
    "NZ",
    "ZA",
    "NG",
    "EG",
    "AE",
    "IL",
    "TR",
    "RU",
    "UA",
    "ID",
    "PH",
    "VN",
    "TH",
]


@pytest.mark.parametrize("code", EU + OTHERS)
def test_the_country_table_covers_the_eu_and_the_main_countries(code: str) -> None:
    where = country_location(code)
    assert COUNTRY_CENTROIDS[code] == (where.lat, where.lon)


def test_country_codes_are_any_case_and_unknown_ones_are_refused() -> None:
    assert country_location("fr") == country_location("FR")
    with pytest.raises(UnknownCountry, match="'XX'"):
        country_location("XX")
    with pytest.raises(UnknownCountry):
        RegionHint(country="ZZ")


def test_country_centres_lie_in_their_part_of_the_world() -> None:
    assert distance_km(country_location("FR"), PARIS) < 400
    assert distance_km(country_location("DE"), FRANKFURT) < 300
    assert country_location("AU").lat < 0 < country_location("JP").lat
    assert country_location("BR").lon < 0 < country_location("CN").lon


@pytest.mark.parametrize(
    "bad", [(91, 0), (-90.5, 0), (0, 180.5), (0, -181), (math.nan, 0), (0, math.inf)]
)
def test_locations_out_of_range_are_refused(bad: tuple[float, float]) -> None:
    with pytest.raises(InvalidHint):
        Location(*bad)


def test_a_hint_gives_at_most_one_kind_of_where() -> None:
    with pytest.raises(InvalidHint, match="at most one"):
        RegionHint(region="eu", location=PARIS)
    with pytest.raises(InvalidHint, match="at most one"):
        RegionHint(location=PARIS, country="FR")


# -- examples ----------------------------------------------------------------------------------


def test_a_location_goes_to_the_nearest_region_and_says_how_far() -> None:
    paris = choose_region([eu(), us()], hint=RegionHint(location=PARIS), vms=1, default_region="us")
    new_york = choose_region(
        [eu(), us()], hint=RegionHint(location=NEW_YORK), vms=1, default_region="eu"
    )

    assert (paris.region, new_york.region) == ("eu", "us")
    assert paris.reason == f"nearest with capacity ({distance_km(PARIS, FRANKFURT):,.0f} km)"
    assert paris.distance_km == pytest.approx(distance_km(PARIS, FRANKFURT))
    assert new_york.reason.startswith("nearest with capacity (3")


def test_a_country_goes_to_the_region_nearest_its_centre() -> None:
    choice = choose_region([eu(), us()], hint=RegionHint(country="br"), vms=1, default_region="eu")

    assert choice.region == "us"
    assert choice.reason.startswith("nearest to BR with capacity (")
    assert choose(eu(), us(), ap(), hint=RegionHint(country="IN")) == "ap"
    assert choose(eu(), us(), ap(), hint=RegionHint(country="UA")) == "eu"


@pytest.mark.parametrize(
    ("eu_state", "why"),
    [
        ({"vms_in_use": 10}, "full"),
        ({"down": True}, "down"),
        ({"drained": True}, "drained"),
    ],
)
def test_the_nearest_unusable_region_is_passed_over_and_said_so(
    eu_state: dict[str, object], why: str
) -> None:
    choice = choose_region(
        [eu(**eu_state), us()], hint=RegionHint(location=PARIS), vms=1, default_region="eu"
    )

    assert choice.region == "us"
    km = distance_km(PARIS, VIRGINIA)
    assert choice.reason == f"nearest region eu is {why}; next nearest ({km:,.0f} km)"


def test_every_passed_region_is_named() -> None:
    choice = choose_region(
        [eu(down=True), us(vms_in_use=10), ap()],
        hint=RegionHint(location=PARIS),
        vms=1,
        default_region="eu",
    )

    assert choice.region == "ap"
    assert choice.reason.startswith("nearest region eu is down; us is full; next nearest (")


def test_room_is_counted_in_the_templates_vms() -> None:
    almost = eu(vms_in_use=9)

    assert choose(almost, us(), hint=RegionHint(location=PARIS), vms=1) == "eu"
    assert choose(almost, us(), hint=RegionHint(location=PARIS), vms=2) == "us"


def test_a_ready_warm_environment_is_room_enough() -> None:
    full_but_warm = eu(vms_in_use=10, warm=1)

    assert choose(full_but_warm, us(), hint=RegionHint(location=PARIS), vms=2) == "eu"


def test_a_region_without_capacity_has_no_limit() -> None:
    unbounded = RegionState(name="eu", location=FRANKFURT, vms_in_use=10_000)

    assert choose(unbounded, us(), hint=RegionHint(location=PARIS)) == "eu"


def test_an_explicit_region_is_taken_when_usable_even_if_far() -> None:
    choice = choose_region([eu(), us()], hint=RegionHint(region="us"), vms=1, default_region="eu")

    assert (choice.region, choice.reason) == ("us", "requested")


@pytest.mark.parametrize(
    ("state", "why", "retry_after"),
    [
        ({"vms_in_use": 10}, Unusable.FULL, FULL_RETRY_AFTER_SECONDS),
        ({"down": True}, Unusable.DOWN, None),
        ({"drained": True}, Unusable.DRAINED, None),
        ({"down": True, "drained": True, "vms_in_use": 10}, Unusable.DOWN, None),
    ],
)
def test_an_unusable_explicit_region_is_refused_not_moved(
    state: dict[str, object], why: Unusable, retry_after: int | None
) -> None:
    with pytest.raises(NoRegion) as refused:
        choose(eu(**state), us(), hint=RegionHint(region="eu"))

    assert refused.value.region == "eu"
    assert refused.value.why is why
    assert refused.value.retry_after == retry_after
    assert refused.value.message == f"region eu is {why.value}"


def test_an_unknown_explicit_region_is_refused_by_name() -> None:
    with pytest.raises(UnknownRegion) as refused:
        choose(eu(), us(), hint=RegionHint(region="mars"))

    assert (refused.value.region, refused.value.known) == ("mars", ("eu", "us"))


def test_no_hint_takes_the_default_then_the_nearest_to_it() -> None:
    regions = [eu(down=True), us(), ap()]

    assert choose(eu(), us(), hint=RegionHint()) == "eu"
    choice = choose_region(regions, hint=RegionHint(), vms=1, default_region="eu")
    # Virginia (6,550 km from Frankfurt) is nearer to it than Singapore (10,260 km).
    assert distance_km(FRANKFURT, VIRGINIA) < distance_km(FRANKFURT, SINGAPORE)
    assert choice.region == "us"
    assert choice.reason.startswith("default region eu is down; next nearest to it (")
    assert choose_region([eu()], hint=RegionHint(), vms=1, default_region="eu").reason == (
        "default region"
    )


def test_regions_without_location_are_only_picked_by_name_or_as_the_default() -> None:
    local = RegionState(name="local")
    lab = RegionState(name="lab")

    assert choose(local, lab, eu(), hint=RegionHint(location=SYDNEY), default="local") == "eu"
    # Every region with a location is unusable: the default, which has none, takes it.
    fallback = choose_region(
        [local, lab, eu(down=True)],
        hint=RegionHint(location=SYDNEY),
        vms=1,
        default_region="local",
    )
    assert fallback.region == "local"
    assert fallback.reason == "no region with a location can take it (eu down); default region"
    # ...but never another region without one.
    with pytest.raises(NoRegion):
        choose(
            RegionState(name="local", down=True),
            lab,
            hint=RegionHint(location=SYDNEY),
            default="local",
        )
    assert choose(local, lab, hint=RegionHint(region="lab"), default="local") == "lab"
    # The one-line form of several regions: no hint is the default alone.
    with pytest.raises(NoRegion):
        choose(RegionState(name="local", down=True), lab, hint=RegionHint(), default="local")


def test_none_usable_is_a_refusal_naming_each_and_retryable_when_any_is_full() -> None:
    with pytest.raises(NoRegion) as full:
        choose(eu(vms_in_use=10), us(down=True), hint=RegionHint(location=PARIS))
    with pytest.raises(NoRegion) as gone:
        choose(eu(drained=True), us(down=True), hint=RegionHint(location=PARIS))

    assert full.value.region is None
    assert full.value.why is Unusable.FULL
    assert full.value.retry_after == FULL_RETRY_AFTER_SECONDS
    assert full.value.passed == (("eu", Unusable.FULL), ("us", Unusable.DOWN))
    assert full.value.message == "no region can take it now: eu is full, us is down"
    assert gone.value.why is Unusable.DRAINED
    assert gone.value.retry_after is None


# -- properties ----------------------------------------------------------------------------------

locations = st.builds(
    Location,
    st.floats(min_value=-90, max_value=90, allow_nan=False),
    st.floats(min_value=-180, max_value=180, allow_nan=False),
)


@st.composite
def region_sets(draw: st.DrawFn) -> list[RegionState]:
    count = draw(st.integers(min_value=1, max_value=6))
    regions = []
    for i in range(count):
        capacity = draw(st.none() | st.integers(min_value=1, max_value=20))
        regions.append(
            RegionState(
                name=f"r{i}",
                location=draw(st.none() | locations),
                capacity_vms=capacity,
                vms_in_use=draw(st.integers(min_value=0, max_value=25)),
                warm=draw(st.sampled_from([0, 0, 0, 1])),
                down=draw(st.booleans()),
                drained=draw(st.booleans()),
            )
        )
    return regions


def usable(region: RegionState, vms: int) -> bool:
    return region.unusable_for(vms) is None


def attempt(
    regions: list[RegionState], hint: RegionHint, vms: int, default: str
) -> RegionChoice | NoRegion:
    """The choice, or the refusal (properties look at both)."""
    try:
        return choose_region(regions, hint=hint, vms=vms, default_region=default)
    except NoRegion as refused:
        return refused


@given(region_sets(), locations, st.integers(min_value=1, max_value=3), st.data())
def test_a_location_gets_the_nearest_usable_region_or_a_refusal(
    regions: list[RegionState], where: Location, vms: int, data: st.DataObject
) -> None:
    default = data.draw(st.sampled_from([r.name for r in regions]))
    by_name = {r.name: r for r in regions}
    eligible_located = [r for r in regions if r.location is not None and usable(r, vms)]
    default_fallback = by_name[default].location is None and usable(by_name[default], vms)
    choice = attempt(regions, RegionHint(location=where), vms, default)
    if isinstance(choice, NoRegion):
        # Refused only when nothing could take it, and never silently: each one is named.
        assert not eligible_located
        assert not default_fallback
        assert choice.passed
        assert all(not usable(by_name[name], vms) for name, _ in choice.passed)
        any_full = any(why is Unusable.FULL for _, why in choice.passed)
        assert (choice.retry_after is not None) == any_full
        return
    chosen = by_name[choice.region]
    # Never a down, drained or full region.
    assert usable(chosen, vms)
    if eligible_located:
        # The nearest of the usable regions with a location.
        assert chosen.location is not None
        nearest = min(distance_km(where, r.location) for r in eligible_located)  # type: ignore[arg-type]
        assert distance_km(where, chosen.location) == pytest.approx(nearest)
        assert choice.distance_km == pytest.approx(nearest)
    else:
        assert choice.region == default
        assert default_fallback


@given(region_sets(), st.integers(min_value=1, max_value=3), st.data())
def test_no_hint_keeps_to_the_default_unless_it_cannot_take_it(
    regions: list[RegionState], vms: int, data: st.DataObject
) -> None:
    default = data.draw(st.sampled_from([r.name for r in regions]))
    by_name = {r.name: r for r in regions}
    choice = attempt(regions, RegionHint(), vms, default)
    if isinstance(choice, NoRegion):
        assert not usable(by_name[default], vms)
        others = [r for r in regions if r.name != default and r.location is not None]
        assert not any(usable(r, vms) for r in others)
        return
    assert usable(by_name[choice.region], vms)
    if usable(by_name[default], vms):
        assert choice.region == default
    else:
        chosen = by_name[choice.region]
        assert chosen.location is not None  # never another region without a location
        home = by_name[default].location
        if home is not None:
            eligible = [
                r
                for r in regions
                if r.name != default and r.location is not None and usable(r, vms)
            ]
            nearest = min(distance_km(home, r.location) for r in eligible)  # type: ignore[arg-type]
            assert distance_km(home, chosen.location) == pytest.approx(nearest)


@given(region_sets(), st.integers(min_value=1, max_value=3), st.data())
def test_an_explicit_region_is_that_region_or_a_refusal_saying_why(
    regions: list[RegionState], vms: int, data: st.DataObject
) -> None:
    target = data.draw(st.sampled_from(regions))
    choice = attempt(regions, RegionHint(region=target.name), vms, regions[0].name)
    if isinstance(choice, NoRegion):
        assert choice.region == target.name
        assert choice.why is target.unusable_for(vms)
        return
    assert choice.region == target.name
    assert usable(target, vms)
