"""Two regions end to end: two simulators, one clusters file, real API, workers and beat.

"eu" is a simulator placed at Frankfurt with room for 2 VMs, "us" another at Virginia with room
for 20. Learners who say where they are land in the nearest region; they go to the other when
the nearest is full, drained (the admin route) or down (its simulator stopped); each session
is torn down in its own region and never touches the other; each region keeps its own pool.
The tests run in order on one system: the last one stops the eu simulator.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from shared.domain.regions import Location, distance_km
from tests.conftest import claim_redis_database
from tests.e2e.harness import (
    ADMIN_TOKEN,
    Simulator,
    System,
    start_simulator,
    start_system,
    wait_until,
)

pytestmark = pytest.mark.e2e

MANAGED = "app.kubernetes.io/managed-by"
FRANKFURT = {"lat": 50.1, "lon": 8.7}
VIRGINIA = {"lat": 38.9, "lon": -77.0}
PARIS = {"lat": 48.86, "lon": 2.35}
NEW_YORK = {"lat": 40.71, "lon": -74.0}
EU_CAPACITY_VMS = 2
# Fast boots (the readiness probe's delays scale with the simulator's time).
SIM_ARGS = ["--time-scale", "0.2"]


@dataclass
class Regions:
    system: System
    eu: Simulator
    us: Simulator

    def sim(self, region: str) -> Simulator:
        return {"eu": self.eu, "us": self.us}[region]


def clusters_file(tmp: Path, eu: Simulator, us: Simulator) -> Path:
    path = tmp / "clusters.yaml"
    document = {
        "clusters": [
            {
                # Relative: found beside the clusters file.
                "region": "eu",
                "kubeconfig": str(eu.kubeconfig.relative_to(tmp)),
                "location": FRANKFURT,
                "capacity_vms": EU_CAPACITY_VMS,
            },
            {
                "region": "us",
                "kubeconfig": str(us.kubeconfig),
                "location": VIRGINIA,
                "capacity_vms": 20,
            },
        ]
    }
    path.write_text(yaml.safe_dump(document))
    return path


@pytest.fixture(scope="module")
def regions(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Regions]:
    tmp = tmp_path_factory.mktemp("regions")
    (tmp / "eu").mkdir()
    (tmp / "us").mkdir()
    eu = start_simulator(tmp / "eu", extra=SIM_ARGS)
    us = start_simulator(tmp / "us", extra=SIM_ARGS)
    env = {
        "LABVIRT_CLUSTERS_FILE": str(clusters_file(tmp, eu, us)),
        "LABVIRT_DEFAULT_REGION": "eu",
        "LABVIRT_REGION_HEARTBEAT_SECONDS": "0.5",
        "LABVIRT_PREWARM_INTERVAL_SECONDS": "1",
    }
    try:
        with claim_redis_database() as url:
            system = start_system(url, tmp, extra_env=env, sim=eu)
            try:
                running = Regions(system, eu, us)
                wait_until(
                    lambda: all(r["alive"] for r in region_views(running).values()),
                    timeout=30,
                    what="both regions reported alive by the workers",
                )
                yield running
            finally:
                system.stop()
    finally:
        eu.proc.stop()
        us.proc.stop()


def region_views(regions: Regions) -> dict[str, dict[str, Any]]:
    response = regions.system.call("GET", "/v1/admin/regions", token=ADMIN_TOKEN)
    assert response.status_code == 200, response.text
    return {r["region"]: r for r in response.json()["regions"]}


def create(regions: Regions, user: str, **where: Any) -> requests.Response:
    return regions.system.call(
        "POST", "/v1/sessions", json={"template": "ubuntu", "user": user, **where}
    )


def created(regions: Regions, user: str, **where: Any) -> dict[str, Any]:
    response = create(regions, user, **where)
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


def session_vmis(sim: Simulator, session_id: str) -> list[dict[str, Any]]:
    return sim.vmis(f"{MANAGED}=labvirt,labvirt.io/session={session_id}")


def ready_in_its_region_only(regions: Regions, session: dict[str, Any]) -> None:
    """Ready, its VMIs in its region's simulator and none in the other."""
    ready = regions.system.wait_state(session["id"], "ready", "failed")
    assert ready["state"] == "ready", ready
    home = session["region"]
    # A warm session is ready at its claim; its VMIs carry its label once the worker has
    # relabelled them (a moment later).
    wait_until(
        lambda: session_vmis(regions.sim(home), session["id"]),
        timeout=30,
        what=f"the VMIs of {session['id']} in {home}",
    )
    for other in ({"eu", "us"} - {home}) & alive_simulators(regions):
        assert session_vmis(regions.sim(other), session["id"]) == []


def alive_simulators(regions: Regions) -> set[str]:
    return {name for name in ("eu", "us") if regions.sim(name).proc.process.poll() is None}


def close_and_wait_gone(regions: Regions, sessions: list[dict[str, Any]]) -> None:
    """Each session ends, its VMIs gone from its own simulator; the other never had them."""
    for session in sessions:
        response = regions.system.call("DELETE", f"/v1/sessions/{session['id']}")
        assert response.status_code == 202, response.text
    for session in sessions:
        regions.system.wait_state(session["id"], "ended")
        home = regions.sim(session["region"])
        wait_until(
            lambda s=session, h=home: session_vmis(h, s["id"]) == [],
            timeout=20,
            what=f"the VMIs of {session['id']} gone from {session['region']}",
        )
        for other in ({"eu", "us"} - {session["region"]}) & alive_simulators(regions):
            assert session_vmis(regions.sim(other), session["id"]) == []


def km(a: dict[str, float], b: dict[str, float]) -> str:
    return f"{distance_km(Location(**a), Location(**b)):,.0f} km"


def test_learners_land_in_the_nearest_region_and_are_torn_down_there(regions: Regions) -> None:
    paris = created(regions, "paris", location=PARIS)
    new_york = created(regions, "newyork", location=NEW_YORK)
    germany = created(regions, "berlin", country="DE")

    assert (paris["region"], new_york["region"], germany["region"]) == ("eu", "us", "eu")
    assert paris["region_reason"] == f"nearest with capacity ({km(PARIS, FRANKFURT)})"
    assert new_york["region_reason"] == f"nearest with capacity ({km(NEW_YORK, VIRGINIA)})"
    for session in (paris, new_york, germany):
        ready_in_its_region_only(regions, session)
    assert region_views(regions)["eu"]["vms_in_use"] == 2

    close_and_wait_gone(regions, [paris, new_york, germany])
    assert region_views(regions)["eu"]["vms_in_use"] == 0


def test_the_next_nearest_region_takes_learners_when_the_nearest_is_full(
    regions: Regions,
) -> None:
    first = [created(regions, f"paris{i}", location=PARIS) for i in range(EU_CAPACITY_VMS)]
    assert [s["region"] for s in first] == ["eu"] * EU_CAPACITY_VMS

    overflow = created(regions, "paris-late", location=PARIS)
    named = create(regions, "insists", region="eu")

    assert overflow["region"] == "us"
    assert overflow["region_reason"] == (
        f"nearest region eu is full; next nearest ({km(PARIS, VIRGINIA)})"
    )
    assert named.status_code == 503, named.text
    assert named.json()["code"] == "region_full"
    assert int(named.headers["Retry-After"]) > 0
    ready_in_its_region_only(regions, overflow)
    close_and_wait_gone(regions, [*first, overflow])


def test_a_drained_region_takes_no_new_session(regions: Regions) -> None:
    drained = regions.system.call(
        "PUT", "/v1/admin/regions/eu", token=ADMIN_TOKEN, json={"drained": True}
    )
    assert drained.status_code == 200, drained.text
    assert drained.json()["drained"] is True
    try:
        moved = created(regions, "paris-drained", location=PARIS)
        named = create(regions, "insists", region="eu")
    finally:
        undrained = regions.system.call(
            "PUT", "/v1/admin/regions/eu", token=ADMIN_TOKEN, json={"drained": False}
        )
        assert undrained.status_code == 200, undrained.text

    assert moved["region"] == "us"
    assert moved["region_reason"].startswith("nearest region eu is drained; next nearest")
    assert named.status_code == 503, named.text
    assert named.json()["code"] == "region_drained"
    ready_in_its_region_only(regions, moved)
    close_and_wait_gone(regions, [moved])


def test_each_region_fills_its_own_pool(regions: Regions) -> None:
    for region in ("eu", "us"):
        response = regions.system.call(
            "PUT", f"/v1/admin/pools/ubuntu?region={region}", token=ADMIN_TOKEN, json={"size": 1}
        )
        assert response.status_code == 200, response.text
        assert (response.json()["region"], response.json()["target"]) == (region, 1)

    def pool_vmis(sim: Simulator) -> list[dict[str, Any]]:
        return sim.vmis(f"{MANAGED}=labvirt,labvirt.io/pool=ubuntu")

    for region in ("eu", "us"):
        wait_until(
            lambda r=region: len(pool_vmis(regions.sim(r))) == 1,
            timeout=30,
            what=f"a warm ubuntu VMI in {region}'s simulator",
        )
    # The eu pool's VM counts towards eu's load.
    assert region_views(regions)["eu"]["vms_in_use"] == 1


def test_a_region_that_goes_down_is_passed_over_and_stops_nothing_elsewhere(
    regions: Regions,
) -> None:
    regions.eu.proc.stop()
    wait_until(
        lambda: region_views(regions)["eu"]["alive"] is False,
        timeout=30,
        what="eu reported down once its simulator stopped",
    )
    assert region_views(regions)["us"]["alive"] is True

    moved = created(regions, "paris-down", location=PARIS)
    named = create(regions, "insists", region="eu")

    assert moved["region"] == "us"
    assert moved["region_reason"].startswith("nearest region eu is down; next nearest")
    assert named.status_code == 503, named.text
    assert named.json()["code"] == "region_down"
    # The other region goes on: the session boots there and is torn down there.
    ready_in_its_region_only(regions, moved)
    close_and_wait_gone(regions, [moved])
