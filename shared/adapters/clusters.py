"""One Kubernetes client per region, made on first use and shared by a process's threads."""

from __future__ import annotations

import threading

from shared.adapters.kube import KubeCluster
from shared.config import Settings


class UnknownRegionError(LookupError):
    pass


class Clusters:
    """One ``KubeCluster`` per region, created lazily and shared by a process's threads."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._clusters: dict[str, KubeCluster] = {}
        self._lock = threading.Lock()

    def get(self, region: str) -> KubeCluster:
        with self._lock:
            cluster = self._clusters.get(region)
            if cluster is None:
                try:
                    config = self._settings.cluster(region)
                except KeyError:
                    raise UnknownRegionError(region) from None
                cluster = KubeCluster(
                    config,
                    pool_maxsize=self._settings.kube_pool_maxsize,
                    request_timeout=self._settings.kube_request_timeout_seconds,
                )
                self._clusters[region] = cluster
            return cluster

    def close(self) -> None:
        with self._lock:
            for cluster in self._clusters.values():
                cluster.close()
            self._clusters.clear()
