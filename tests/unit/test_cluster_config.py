"""LABVIRT_CLUSTERS_FILE through Settings.from_env: a good file, relative kubeconfigs, and
errors naming the variable and the offending entry; the one-line LABVIRT_CLUSTERS still works;
the region heartbeat's interval."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from shared.config import Cluster, ConfigError, Settings
from shared.domain.regions import Location

EU = {
    "region": "eu",
    "kubeconfig": "eu.kubeconfig",
    "location": {"lat": 50.1, "lon": 8.7},
    "capacity_vms": 200,
}
US = {
    "region": "us",
    "kubeconfig": "/k/us.yaml",
    "context": "admin@us",
    "namespace": "labs-us",
    "location": {"lat": 38.9, "lon": -77},
    "capacity_vms": 50,
}


def write(tmp_path: Path, document: Any, name: str = "clusters.yaml") -> Path:
    path = tmp_path / name
    path.write_text(document if isinstance(document, str) else yaml.safe_dump(document))
    return path


def settings(path: Path, **env: str) -> Settings:
    return Settings.from_env(
        {
            "LABVIRT_MODE": "dev",
            "LABVIRT_CLUSTERS_FILE": str(path),
            "LABVIRT_DEFAULT_REGION": "eu",
            **env,
        }
    )


def refused(path: Path, *fragments: str, **env: str) -> str:
    with pytest.raises(ConfigError) as caught:
        settings(path, **env)
    message = str(caught.value)
    assert message.startswith(f"LABVIRT_CLUSTERS_FILE='{path}'"), message
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_a_clusters_file_gives_each_region_its_cluster_location_and_capacity(
    tmp_path: Path,
) -> None:
    path = write(tmp_path, {"clusters": [EU, US]})

    loaded = settings(path, LABVIRT_NAMESPACE="labs", LABVIRT_KUBECONFIG="/ignored.yaml")

    assert loaded.regions == ("eu", "us")
    assert loaded.clusters == (
        Cluster(
            "eu",
            tmp_path / "eu.kubeconfig",  # relative to the file's folder
            None,
            "labs",  # LABVIRT_NAMESPACE when the entry names none
            location=Location(50.1, 8.7),
            capacity_vms=200,
        ),
        Cluster(
            "us",
            Path("/k/us.yaml"),
            "admin@us",
            "labs-us",
            location=Location(38.9, -77.0),
            capacity_vms=50,
        ),
    )


def test_a_relative_kubeconfig_is_found_beside_the_file_wherever_the_process_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "deploy"
    folder.mkdir()
    write(folder, {"clusters": [{**EU, "kubeconfig": "k/eu.yaml"}]})
    monkeypatch.chdir(tmp_path)

    loaded = settings(Path("deploy/clusters.yaml"))

    assert loaded.cluster("eu").kubeconfig == folder / "k" / "eu.yaml"
    assert loaded.cluster("eu").kubeconfig.is_absolute()  # type: ignore[union-attr]


def test_the_one_line_form_keeps_working_without_locations() -> None:
    loaded = Settings.from_env(
        {
            "LABVIRT_MODE": "dev",
            "LABVIRT_CLUSTERS": "eu=/k/eu.yaml,us=/k/us.yaml@ctx",
            "LABVIRT_DEFAULT_REGION": "eu",
        }
    )

    assert loaded.clusters == (
        Cluster("eu", Path("/k/eu.yaml"), None, "default"),
        Cluster("us", Path("/k/us.yaml"), "ctx", "default"),
    )
    assert all(c.location is None and c.capacity_vms is None for c in loaded.clusters)


def test_the_file_and_the_one_line_form_together_are_refused(tmp_path: Path) -> None:
    path = write(tmp_path, {"clusters": [EU]})

    with pytest.raises(ConfigError, match="LABVIRT_CLUSTERS_FILE and LABVIRT_CLUSTERS"):
        settings(path, LABVIRT_CLUSTERS="eu=/k/eu.yaml")


def test_the_default_region_must_be_in_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, {"clusters": [US]})

    with pytest.raises(ConfigError, match=r"LABVIRT_DEFAULT_REGION='eu' names no .*regions: us"):
        settings(path)


def test_a_missing_file_is_refused(tmp_path: Path) -> None:
    refused(tmp_path / "absent.yaml", "cannot read it")


@pytest.mark.parametrize(
    ("document", "fragment"),
    [
        ("clusters: [", "not valid YAML"),
        ("- region: eu", "a list under 'clusters'"),
        ({"clusters": {"eu": EU}}, "a list under 'clusters'"),
        ({"clusters": []}, "lists no cluster"),
        ({"clusters": [EU], "regions": []}, "unknown top-level key(s): regions"),
        ({"clusters": ["eu"]}, "clusters[0]: expected a mapping, got str"),
    ],
)
def test_a_malformed_file_is_refused(tmp_path: Path, document: Any, fragment: str) -> None:
    refused(write(tmp_path, document), fragment)


@pytest.mark.parametrize(
    ("change", "fragments"),
    [
        ({"kubeconfig": None}, ["clusters[1] (region 'us')", "missing kubeconfig"]),
        ({"location": None, "capacity_vms": None}, ["missing location, capacity_vms"]),
        ({"region": None}, ["clusters[1]:", "missing region"]),
        ({"region": "US East"}, ["region 'US East' must be a DNS-1123 label"]),
        ({"region": "eu"}, ["clusters[1]: region 'eu' is listed twice"]),
        ({"kubeconfig": ""}, ["kubeconfig must be a non-empty string"]),
        ({"context": 7}, ["context must be a non-empty string, got 7"]),
        ({"location": {"lat": 91, "lon": 0}}, ["location: latitude 91.0 is outside -90..90"]),
        ({"location": {"lat": 0, "lon": -200}}, ["longitude -200.0 is outside -180..180"]),
        ({"location": {"lat": "50", "lon": 8}}, ["location.lat must be a number, got '50'"]),
        ({"location": {"lat": 50}}, ["location must be {lat: ..., lon: ...}"]),
        ({"location": [50, 8]}, ["location must be {lat: ..., lon: ...}"]),
        ({"capacity_vms": 0}, ["capacity_vms must be a whole number >= 1, got 0"]),
        ({"capacity_vms": 2.5}, ["capacity_vms must be a whole number >= 1, got 2.5"]),
        ({"capacity_vms": True}, ["capacity_vms must be a whole number >= 1, got True"]),
        ({"capacity": 10}, ["unknown key(s): capacity"]),
    ],
)
def test_a_bad_entry_is_refused_by_position_and_region(
    tmp_path: Path, change: dict[str, Any], fragments: list[str]
) -> None:
    entry = {**US, **change}
    entry = {k: v for k, v in entry.items() if v is not None or k in change}
    path = write(tmp_path, {"clusters": [EU, entry]})

    refused(path, *fragments)


def test_the_region_heartbeat_is_read_and_bounded() -> None:
    assert Settings.from_env({"LABVIRT_MODE": "dev"}).region_heartbeat_seconds == 5.0
    quick = Settings.from_env({"LABVIRT_MODE": "dev", "LABVIRT_REGION_HEARTBEAT_SECONDS": "0.5"})
    assert quick.region_heartbeat_seconds == 0.5
    with pytest.raises(ConfigError, match="LABVIRT_REGION_HEARTBEAT_SECONDS"):
        Settings.from_env({"LABVIRT_MODE": "dev", "LABVIRT_REGION_HEARTBEAT_SECONDS": "0"})
