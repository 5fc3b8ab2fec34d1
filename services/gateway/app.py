"""The gateway's wiring: ``create_app(settings)`` and ``serve(settings)`` (``labvirt gateway``).

It serves what a browser keeps open, on one asyncio loop: event streams, terminals, and the
learner page. The short JSON routes stay in the API (Flask); in production an ingress routes
by path, and with ``LABVIRT_GATEWAY_API_URL`` set (``labvirt dev``) the gateway proxies every
other path to the API itself, so one origin serves all.
"""

from __future__ import annotations

import asyncio
import time
from typing import Final

import structlog
from aiohttp import web

from services.gateway.access import admit, error, load_session, problem_errors
from services.gateway.consoles import ConsoleHub, console_endpoint
from services.gateway.events import EventHub, last_event_id, stream_events
from services.gateway.limits import limit_browser_call
from services.gateway.metrics import OpenConnections, add_metrics_route
from services.gateway.presence import Presence
from services.gateway.proxy import ApiProxy
from services.gateway.terminals import Terminals, ended_reason
from services.gateway.ui import add_ui_routes
from shared.adapters.connections import Connections
from shared.adapters.rate_limits import AsyncRateLimiter
from shared.adapters.redis_client import async_client
from shared.config import Settings
from shared.domain.sessions import SessionState

log = structlog.get_logger(__name__)


class Gateway:
    """What the handlers share: Redis, the hubs, and the set of open connections."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.redis = async_client(
            settings.redis_url, socket_connect_timeout=5, health_check_interval=30
        )
        self.events = EventHub(self.redis)
        self.rate_limiter = AsyncRateLimiter(self.redis)
        self.presence = Presence(Connections(self.redis))
        self.consoles = ConsoleHub(
            {cluster.region: console_endpoint(cluster) for cluster in settings.clusters}
        )
        self.terminals = Terminals(self.consoles)
        self.stopping = asyncio.Event()
        self.started = time.time()

    async def start(self) -> None:
        self.events.on_append(self._maybe_end_terminals)
        self.events.start()
        self.presence.start()
        await self.consoles.start()

    async def stop_serving(self) -> None:
        """First step of a shutdown: every open stream and terminal ends now, cleanly."""
        self.stopping.set()
        await self.terminals.close_all()

    async def stop(self) -> None:
        """Last step, once the handlers are done: hubs and Redis."""
        await self.consoles.stop()
        await self.presence.stop()
        await self.events.stop()
        await self.redis.aclose()

    async def _maybe_end_terminals(self, session_id: str) -> None:
        if session_id not in self.terminals.sessions():
            return
        reason = ended_reason(await load_session(self.redis, session_id))
        if reason is not None:
            await self.terminals.close_session(session_id, reason)


STATE: Final = web.AppKey("gateway", Gateway)


async def healthz(request: web.Request) -> web.Response:
    gateway = request.app[STATE]
    return web.json_response(
        {
            "status": "ok",
            "event_streams": gateway.presence.open_of("events"),
            "terminals": gateway.presence.open_of("terminal"),
            "console_upstreams": gateway.consoles.open_upstreams,
        }
    )


async def session_events(request: web.Request) -> web.StreamResponse:
    gateway = request.app[STATE]
    await limit_browser_call(request, gateway.rate_limiter, gateway.settings.limits)
    after = last_event_id(request)  # a refused request never counts as a connection
    session = await admit(
        request, client=gateway.redis, settings=gateway.settings, ticket_only=False
    )
    async with gateway.presence.connected(session.id, "events"):
        return await stream_events(
            request,
            client=gateway.redis,
            hub=gateway.events,
            session_id=session.id,
            after=after,
            live=session.is_live,
            keepalive=gateway.settings.events_keepalive_seconds,
            stopping=gateway.stopping,
        )


async def terminal(request: web.Request) -> web.StreamResponse:
    gateway = request.app[STATE]
    await limit_browser_call(request, gateway.rate_limiter, gateway.settings.limits)
    vm = request.query.get("vm", "")
    session = await admit(
        request, client=gateway.redis, settings=gateway.settings, ticket_only=True
    )
    names = [view.name for view in session.vms]
    if vm not in names:
        raise error(404, "no_such_vm", f"the session has no VM named {vm!r}", vms=names)
    if session.state is not SessionState.READY:
        raise error(409, "session_not_ready", f"the session is {session.state.value}")
    if session.region not in gateway.settings.regions:
        raise error(503, "region_unavailable", f"no cluster serves region {session.region!r}")
    async with gateway.presence.connected(session.id, "terminal"):
        response: web.StreamResponse = await gateway.terminals.serve(request, session, vm)
        return response


def create_app(settings: Settings) -> web.Application:
    app = web.Application(middlewares=[problem_errors])
    gateway = Gateway(settings)
    app[STATE] = gateway

    async def on_startup(_app: web.Application) -> None:
        await gateway.start()

    async def on_shutdown(_app: web.Application) -> None:
        await gateway.stop_serving()

    async def on_cleanup(_app: web.Application) -> None:
        await gateway.stop()

    app.on_startup.append(on_startup)
    app.on_shutdown.append(on_shutdown)
    app.on_cleanup.append(on_cleanup)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/v1/sessions/{session_id}/events", session_events)
    app.router.add_get("/v1/sessions/{session_id}/terminal", terminal)
    opened = OpenConnections(gateway.presence.open_of, lambda: gateway.consoles.open_upstreams)
    add_metrics_route(app, settings, opened)
    add_ui_routes(app, settings)
    if settings.gateway_api_url:
        ApiProxy(settings.gateway_api_url).install(app)
    return app


def serve(settings: Settings) -> None:
    """Run until SIGTERM/SIGINT; open streams and terminals are closed on the way out."""
    app = create_app(settings)
    host = settings.gateway_host
    log.info("gateway.listening", host=host, port=settings.gateway_port)
    web.run_app(
        app,
        host=host,
        port=settings.gateway_port,
        print=None,
        access_log=None,
        shutdown_timeout=5.0,
        handle_signals=True,
        # A browser that goes away cancels its handler at once, so its connection's lease is
        # released then, not at the next keep-alive write that would have failed.
        handler_cancellation=True,
    )
