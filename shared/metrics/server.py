"""``GET /metrics`` for processes without an HTTP server of their own: workers and beat.

A small threaded server on ``LABVIRT_METRICS_PORT`` (0: none), started with the process; it
answers scrapes under the same token rule as the API (``shared.metrics.access``) and nothing
else. A port it cannot listen on stops the process at start, naming the variable.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Final

import structlog

from shared.config import Settings
from shared.config_env import ConfigError
from shared.metrics.access import Refusal, scrape_refusal
from shared.metrics.exposition import render
from shared.problems import PROBLEM_MEDIA_TYPE, problem_body

log = structlog.get_logger(__name__)

# Every interface, as the API and the gateway listen: a scraper reaches the pod's address.
ALL_INTERFACES: Final = "0.0.0.0"  # noqa: S104  # nosec B104


class MetricsServer:
    """One listening socket and the thread that serves it (a daemon: it ends with the process)."""

    def __init__(self, settings: Settings, *, host: str = ALL_INTERFACES) -> None:
        handler = type("MetricsHandler", (_Handler,), {"settings": settings})
        try:
            self._server = ThreadingHTTPServer((host, settings.metrics_port), handler)
        except OSError as exc:
            raise ConfigError(
                f"LABVIRT_METRICS_PORT={settings.metrics_port}: cannot listen there ({exc}); "
                "choose another port, or 0 for no metrics server"
            ) from exc
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="metrics-server", daemon=True
        )

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> MetricsServer:
        self._thread.start()
        log.info("metrics.listening", port=self.port)
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def start_metrics_server(settings: Settings) -> MetricsServer | None:
    """The process's metrics server, serving; None when ``LABVIRT_METRICS_PORT`` is 0."""
    if settings.metrics_port == 0:
        return None
    return MetricsServer(settings).start()


class _Handler(BaseHTTPRequestHandler):
    settings: Settings  # set on the subclass each server makes

    def do_GET(self) -> None:
        if self.path.split("?", 1)[0] != "/metrics":
            self._problem(Refusal(404, "not_found", "only /metrics is served here"))
            return
        refusal = scrape_refusal(self.headers.get("Authorization"), self.settings)
        if refusal is not None:
            self._problem(refusal)
            return
        body, content_type = render()
        self._answer(200, content_type, body)

    def send_error(
        self, code: int, message: str | None = None, _explain: str | None = None
    ) -> None:
        """The base class's refusals (a malformed request, a method it has no ``do_`` for) as
        problems too; a method other than GET is the client's mistake (405), not a 501."""
        if code == 501:
            self._problem(Refusal(405, "method_not_allowed", "only GET /metrics is served here"))
            return
        self._problem(Refusal(code, "bad_request", message or "the request is malformed"))

    def _problem(self, refusal: Refusal) -> None:
        body = problem_body(refusal.status, refusal.code, refusal.detail)
        headers = {"WWW-Authenticate": "Bearer"} if refusal.status == 401 else {}
        if refusal.status == 405:
            headers["Allow"] = "GET"
        self._answer(refusal.status, PROBLEM_MEDIA_TYPE, json.dumps(body).encode(), headers)

    def _answer(
        self, status: int, content_type: str, body: bytes, headers: dict[str, str] | None = None
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("metrics.request", line=format % args)
