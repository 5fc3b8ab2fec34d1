"""The gateway's ``GET /metrics``: what it holds open, read when scraped, and its process's
series, for an admin token or a scrape token (``shared.metrics.access``)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from aiohttp import web
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from services.gateway.access import error
from shared.config import Settings
from shared.metrics.access import scrape_refusal
from shared.metrics.exposition import render


class OpenConnections:
    """This gateway's open event streams, terminals and console upstreams."""

    def __init__(self, open_of: Callable[[str], int], upstreams: Callable[[], int]) -> None:
        self._open_of = open_of
        self._upstreams = upstreams

    def collect(self) -> Iterable[Metric]:
        return [
            GaugeMetricFamily(
                "labvirt_gateway_open_streams",
                "Event streams this gateway holds open",
                value=self._open_of("events"),
            ),
            GaugeMetricFamily(
                "labvirt_gateway_open_terminals",
                "Terminal websockets this gateway holds open (browser tabs)",
                value=self._open_of("terminal"),
            ),
            GaugeMetricFamily(
                "labvirt_gateway_console_upstreams",
                "Serial console connections to VMs this gateway holds (one per VM)",
                value=self._upstreams(),
            ),
        ]


def add_metrics_route(app: web.Application, settings: Settings, opened: OpenConnections) -> None:
    async def scrape(request: web.Request) -> web.Response:
        refusal = scrape_refusal(request.headers.get("Authorization"), settings)
        if refusal is not None:
            problem = error(refusal.status, refusal.code, refusal.detail)
            if refusal.status == 401:
                problem.headers["WWW-Authenticate"] = "Bearer"
            raise problem
        body, content_type = render([opened])
        return web.Response(
            body=body, headers={"Content-Type": content_type, "Cache-Control": "no-store"}
        )

    app.router.add_get("/metrics", scrape)
