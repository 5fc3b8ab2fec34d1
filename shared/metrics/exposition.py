"""One scrape's answer: this process group's series, and collectors read at scrape time.

A fresh registry per scrape: in multiprocess mode it merges the group's files, otherwise it
forwards this process's registry; collectors that read Redis or a gateway's connections
(``extra``) join it for this scrape only.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from shared.metrics.series import multiprocess_dir, process_registry


class _Forward:
    """A long-lived registry's series, in a scrape's registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterable[Metric]:
        return self._registry.collect()


def render(extra: Iterable[Collector] = ()) -> tuple[bytes, str]:
    """The text exposition of this process group's series and ``extra``; its content type."""
    registry = CollectorRegistry(auto_describe=False)  # nothing is collected to register
    directory = multiprocess_dir()
    if directory is not None:
        MultiProcessCollector(registry, path=directory)  # type: ignore[no-untyped-call]
    else:
        registry.register(_Forward(process_registry()))
    for collector in extra:
        registry.register(collector)
    return generate_latest(registry), CONTENT_TYPE_LATEST
