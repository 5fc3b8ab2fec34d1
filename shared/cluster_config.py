"""The clusters labvirt runs environments in, one per region: ``Cluster`` and its two sources.

- ``LABVIRT_CLUSTERS_FILE``: a YAML file, the full form::

      clusters:
        - region: eu
          kubeconfig: eu.kubeconfig   # relative to this file's folder, or absolute
          context: admin@eu           # optional: the kubeconfig's current context otherwise
          namespace: labs             # optional: LABVIRT_NAMESPACE otherwise
          location: {lat: 50.1, lon: 8.7}
          capacity_vms: 200           # most VMs (sessions' and warm pools') at once

- ``LABVIRT_CLUSTERS``: the one-line form ``eu=/k/eu.yaml,us=/k/us.yaml@ctx``, without
  locations or capacities: such regions are only used when named or as the default.

``shared.config`` reads the variables and wraps ``ClusterConfigError`` in its ``ConfigError``
naming the variable; the messages here name the offending entry.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import yaml

from shared.domain.regions import InvalidHint, Location
from shared.domain.templates import is_dns1123_label

_FILE_KEYS: Final = frozenset(
    {"region", "kubeconfig", "context", "namespace", "location", "capacity_vms"}
)
_REQUIRED_KEYS: Final = ("region", "kubeconfig", "location", "capacity_vms")


class ClusterConfigError(ValueError):
    """A clusters specification that cannot be used; the message names the entry."""


@dataclass(frozen=True)
class Cluster:
    """One Kubernetes cluster with KubeVirt, serving one region."""

    region: str
    kubeconfig: Path | None  # None: the in-cluster service account
    context: str | None
    namespace: str
    location: Location | None = None  # None: picked only when named or as the default
    capacity_vms: int | None = None  # None: no limit


def clusters_from_spec(spec: str, *, namespace: str) -> tuple[Cluster, ...]:
    """``eu=/k/eu.yaml,us=/k/us.yaml[@context]``: regions without location or capacity."""
    clusters: list[Cluster] = []
    for item in spec.split(","):
        region, sep, rest = item.strip().partition("=")
        if not sep or not region or not rest:
            raise ClusterConfigError(f"{item!r} is not REGION=KUBECONFIG[@CONTEXT]")
        path, _, context = rest.partition("@")
        if not path:
            raise ClusterConfigError(f"{item!r} is not REGION=KUBECONFIG[@CONTEXT]")
        if region in {c.region for c in clusters}:
            raise ClusterConfigError(f"region {region!r} is listed twice")
        clusters.append(Cluster(region, Path(path), context or None, namespace))
    return tuple(clusters)


def clusters_from_file(path: Path, *, namespace: str) -> tuple[Cluster, ...]:
    """The clusters of a clusters file (see the module's doc); relative kubeconfig paths are
    taken from the file's folder."""
    try:
        document = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ClusterConfigError(f"cannot read it: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise ClusterConfigError(f"not valid YAML: {exc}") from None
    if not isinstance(document, Mapping) or not isinstance(document.get("clusters"), list):
        raise ClusterConfigError("expected a mapping with a list under 'clusters'")
    entries: list[Any] = document["clusters"]
    if not entries:
        raise ClusterConfigError("'clusters' lists no cluster")
    unknown_top = sorted(set(document) - {"clusters"})
    if unknown_top:
        raise ClusterConfigError(f"unknown top-level key(s): {', '.join(unknown_top)}")
    folder = path.expanduser().absolute().parent
    clusters: list[Cluster] = []
    for index, entry in enumerate(entries):
        cluster = _entry(entry, index, folder=folder, namespace=namespace)
        if cluster.region in {c.region for c in clusters}:
            raise ClusterConfigError(
                f"clusters[{index}]: region {cluster.region!r} is listed twice"
            )
        clusters.append(cluster)
    return tuple(clusters)


def _entry(entry: Any, index: int, *, folder: Path, namespace: str) -> Cluster:
    where = f"clusters[{index}]"
    if not isinstance(entry, Mapping):
        raise ClusterConfigError(f"{where}: expected a mapping, got {type(entry).__name__}")
    region = entry.get("region")
    if isinstance(region, str) and region:
        where = f"{where} (region {region!r})"
    unknown = sorted(str(k) for k in set(entry) - _FILE_KEYS)
    if unknown:
        raise ClusterConfigError(f"{where}: unknown key(s): {', '.join(unknown)}")
    missing = [k for k in _REQUIRED_KEYS if entry.get(k) is None]
    if missing:
        raise ClusterConfigError(f"{where}: missing {', '.join(missing)}")
    if not isinstance(region, str) or not is_dns1123_label(region):
        raise ClusterConfigError(
            f"{where}: region {region!r} must be a DNS-1123 label (lowercase letters, "
            "digits and '-', at most 63 characters)"
        )
    kubeconfig = _text(entry, "kubeconfig", where)
    context = _optional_text(entry, "context", where)
    own_namespace = _optional_text(entry, "namespace", where)
    resolved = Path(kubeconfig).expanduser()
    if not resolved.is_absolute():
        resolved = folder / resolved
    return Cluster(
        region=region,
        kubeconfig=resolved,
        context=context,
        namespace=own_namespace or namespace,
        location=_location(entry["location"], where),
        capacity_vms=_capacity(entry["capacity_vms"], where),
    )


def _text(entry: Mapping[str, Any], key: str, where: str) -> str:
    value = entry[key]
    if not isinstance(value, str) or not value.strip():
        raise ClusterConfigError(f"{where}: {key} must be a non-empty string, got {value!r}")
    return value.strip()


def _optional_text(entry: Mapping[str, Any], key: str, where: str) -> str | None:
    return None if entry.get(key) is None else _text(entry, key, where)


def _location(raw: Any, where: str) -> Location:
    if not isinstance(raw, Mapping) or set(raw) != {"lat", "lon"}:
        raise ClusterConfigError(f"{where}: location must be {{lat: ..., lon: ...}}, got {raw!r}")
    for key in ("lat", "lon"):
        value = raw[key]
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ClusterConfigError(f"{where}: location.{key} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise ClusterConfigError(f"{where}: location.{key} must be finite, got {value!r}")
    try:
        return Location(float(raw["lat"]), float(raw["lon"]))
    except InvalidHint as exc:
        raise ClusterConfigError(f"{where}: location: {exc}") from None


def _capacity(raw: Any, where: str) -> int:
    if isinstance(raw, bool) or not isinstance(raw, int) or raw < 1:
        raise ClusterConfigError(f"{where}: capacity_vms must be a whole number >= 1, got {raw!r}")
    return raw
