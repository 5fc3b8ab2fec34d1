"""The API's region choice from a reading kept for a moment (``shared.region_readings``).

Far from every limit, a reading up to a second old decides, with the sessions this process
placed counted in; near a limit, for a refusal, after a drain or once it is too old, the
regions are read afresh. Sessions in fakeredis; time from a fake monotonic clock.
"""

from __future__ import annotations

from collections.abc import Sequence

import fakeredis
import pytest

from shared.adapters.region_state import RedisRegionState
from shared.adapters.session_indexes import LiveCount
from shared.adapters.session_store import RedisSessionStore
from shared.adapters.template_files import load_templates
from shared.config import Cluster, Limits, Mode, Settings
from shared.domain.regions import NoRegion, RegionHint, RegionState, Unusable
from shared.domain.sessions import Session, open_session
from shared.region_readings import NEAR_MINIMUM, ReadingCache, far_from_limits
from shared.regions import RegionPicker

CAP = 40  # live sessions: near from 33 on (the margin is 8, more than a tenth)
MAX_AGE = 1.0
EU = RegionHint(region="eu")


class CountingSessionStore(RedisSessionStore):
    """The real store, counting how often the regions' session counts are read."""

    reads = 0

    def live_counts(self, regions: Sequence[str], templates: Sequence[str]) -> dict[str, LiveCount]:
        self.reads += 1
        return super().live_counts(regions, templates)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Regions:
    def __init__(self) -> None:
        self.redis = fakeredis.FakeRedis()
        self.sessions = CountingSessionStore(self.redis)
        self.state = RedisRegionState(self.redis)
        self.clock = Clock()
        self.picker = RegionPicker(
            settings=Settings(
                mode=Mode.DEV,
                clusters=(Cluster("eu", None, None, "default"),),
                default_region="eu",
                limits=Limits(region_max_live_sessions=CAP, region_max_booting=1000),
            ),
            state=self.state,
            sessions=self.sessions,
            templates=load_templates(None),
            readings=ReadingCache(max_age=MAX_AGE, monotonic=self.clock),
        )
        self.opened = 0

    def open_behind_its_back(self, count: int) -> None:
        """Sessions another process opened: in Redis, not in this picker's reading."""
        for _ in range(count):
            self.sessions.add(self.session())

    def session(self) -> Session:
        self.opened += 1
        session, _ = open_session(
            user=f"u{self.opened}",
            template="ubuntu",
            region="eu",
            max_lifetime_seconds=3600,
            idle_timeout_seconds=300,
            now=1_700_000_000.0,
        )
        return session

    def choose(self) -> str:
        return self.picker.choose(EU, template="ubuntu").region


@pytest.fixture
def regions() -> Regions:
    return Regions()


def test_far_from_every_limit_a_kept_reading_decides(regions: Regions) -> None:
    assert regions.choose() == "eu"
    regions.open_behind_its_back(20)
    for _ in range(5):
        assert regions.choose() == "eu"
    assert regions.sessions.reads == 1  # one reading for six choices


def test_a_kept_reading_is_read_again_once_it_is_too_old(regions: Regions) -> None:
    regions.choose()
    regions.clock.now += MAX_AGE + 0.01
    regions.choose()
    assert regions.sessions.reads == 2


def test_the_sessions_this_process_places_count_until_a_limit_is_near(regions: Regions) -> None:
    regions.choose()
    for _ in range(CAP - NEAR_MINIMUM):
        regions.picker.placed(regions.session())  # in its reading only, not in Redis
    regions.choose()
    assert regions.sessions.reads == 1
    regions.picker.placed(regions.session())  # 33 of 40: near the cap
    regions.choose()
    assert regions.sessions.reads == 2  # and Redis, which has none of them, says far again


def test_near_a_cap_every_choice_reads_afresh_and_the_cap_holds(regions: Regions) -> None:
    regions.open_behind_its_back(CAP - NEAR_MINIMUM + 1)
    regions.choose()
    regions.choose()
    assert regions.sessions.reads == 2
    regions.open_behind_its_back(NEAR_MINIMUM - 1)  # now at the cap
    with pytest.raises(NoRegion) as refused:
        regions.choose()
    assert refused.value.why is Unusable.SESSION_CAP


def test_a_refusal_is_never_made_on_a_kept_reading(regions: Regions) -> None:
    regions.choose()
    for _ in range(CAP):
        regions.picker.placed(regions.session())  # the reading says full; Redis has room
    assert regions.choose() == "eu"
    assert regions.sessions.reads == 2


def test_a_drain_is_seen_by_the_next_choice(regions: Regions) -> None:
    regions.choose()
    regions.state.set_drained("eu", True)  # by any process: the regions' version changes
    with pytest.raises(NoRegion) as refused:
        regions.choose()
    assert refused.value.why is Unusable.DRAINED
    regions.state.set_drained("eu", False)
    assert regions.choose() == "eu"


def test_a_version_read_beside_the_lock_stands_for_its_own_read(regions: Regions) -> None:
    regions.choose()
    version = regions.state.version()
    assert regions.picker.choose(EU, template="ubuntu", version=version).region == "eu"
    assert regions.sessions.reads == 1


@pytest.mark.parametrize(
    ("state", "far"),
    [
        (RegionState(name="eu", live_sessions=31, max_live_sessions=40), True),
        (RegionState(name="eu", live_sessions=33, max_live_sessions=40), False),
        (RegionState(name="eu", live_sessions=800, max_live_sessions=1000), True),
        (RegionState(name="eu", live_sessions=901, max_live_sessions=1000), False),
        (RegionState(name="eu", booting=15, max_booting=20), False),
        # Warm environments enough: a claim boots nothing and needs no room.
        (RegionState(name="eu", booting=20, max_booting=20, warm=NEAR_MINIMUM), True),
        (RegionState(name="eu", booting=20, max_booting=20, warm=NEAR_MINIMUM - 1), False),
        (RegionState(name="eu", capacity_vms=100, vms_in_use=90), False),  # 91 with its VM
        (RegionState(name="eu", capacity_vms=100, vms_in_use=89), True),
        (RegionState(name="eu", live_sessions=10**6), True),  # no limits at all
    ],
)
def test_how_far_is_far_enough(state: RegionState, far: bool) -> None:
    assert far_from_limits(state, 1) is far
