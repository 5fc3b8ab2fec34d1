"""Terminals: one upstream console connection per VM, shared by every tab of its learner.

KubeVirt allows one serial console connection per VMI (a new one cuts the old), so the gateway
holds one upstream per VM and fans it out: output goes to every tab, input comes from any, and
a second tab never kicks the first. The upstream is kept alive with websocket pings through
quiet periods; when it drops while tabs are open, it is opened again (with backoff) and the
tabs are told in their terminal. Frames carry the terminal's bytes both ways, nothing wrapped
around them, so xterm.js's attach addon works as it is.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Final

import aiohttp
import structlog
from aiohttp import web

from shared.adapters.kube import load_configuration
from shared.adapters.retrying import Backoff
from shared.config import Cluster

log = structlog.get_logger(__name__)

SUBPROTOCOL: Final = "plain.kubevirt.io"
# Pings through quiet periods: proxies in front of API servers cut idle websockets (~20-60 s).
UPSTREAM_HEARTBEAT_SECONDS: Final = 15.0
NOTICE_RECONNECTING: Final = (
    b"\r\n\x1b[33m[labvirt: console connection lost, reconnecting]\x1b[0m\r\n"
)
NOTICE_RECONNECTED: Final = b"\r\n\x1b[32m[labvirt: console reconnected]\x1b[0m\r\n"
# A VM's upstream stays open this long after its last tab, so a reload reuses it.
LINGER_SECONDS: Final = 5.0
# The tail of a console's output a tab sees when it joins (the prompt, the last command).
REPLAY_BYTES: Final = 4096
# Input typed before the console answers, kept for it.
PENDING_BYTES: Final = 4096

Connect = Callable[[], Awaitable[aiohttp.ClientWebSocketResponse]]


@dataclass(frozen=True)
class ConsoleEndpoint:
    """How to reach the console subresource of one region's cluster."""

    base_url: str  # https://api-server:6443
    namespace: str
    headers: dict[str, str]
    ssl_context: ssl.SSLContext | bool

    def url(self, vmi_name: str) -> str:
        return (
            f"{self.base_url}/apis/subresources.kubevirt.io/v1/namespaces/{self.namespace}"
            f"/virtualmachineinstances/{vmi_name}/console"
        )


def console_endpoint(cluster: Cluster) -> ConsoleEndpoint:
    """Read the cluster's address and credentials the way the official client does."""
    configuration = load_configuration(cluster)
    headers = {}
    authorization = configuration.get_api_key_with_prefix("authorization")
    if authorization:
        headers["Authorization"] = authorization
    context: ssl.SSLContext | bool = False
    if configuration.host.startswith("https"):
        if configuration.verify_ssl:
            context = ssl.create_default_context(cafile=configuration.ssl_ca_cert)
        else:
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        if configuration.cert_file:
            context.load_cert_chain(configuration.cert_file, configuration.key_file)
    return ConsoleEndpoint(configuration.host.rstrip("/"), cluster.namespace, headers, context)


@dataclass
class ConsoleLink:
    """One VM's upstream console and the tabs that share it."""

    key: str
    connect: Connect
    on_idle: Callable[[str], None]
    tabs: set[web.WebSocketResponse] = field(default_factory=set)
    upstream: aiohttp.ClientWebSocketResponse | None = None
    reconnects: int = 0
    recent: bytearray = field(default_factory=bytearray)
    pending: bytearray = field(default_factory=bytearray)
    _task: asyncio.Task[None] | None = None
    _linger: asyncio.TimerHandle | None = None
    _closing: asyncio.Future[None] | None = None

    async def attach(self, tab: web.WebSocketResponse) -> None:
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
        if self.recent:
            with contextlib.suppress(ConnectionError, RuntimeError):
                await tab.send_bytes(bytes(self.recent))
        self.tabs.add(tab)
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"console-{self.key}")

    def detach(self, tab: web.WebSocketResponse) -> None:
        self.tabs.discard(tab)
        if not self.tabs and self._linger is None:
            self._linger = asyncio.get_running_loop().call_later(LINGER_SECONDS, self._expire)

    def _expire(self) -> None:
        self._linger = None
        if not self.tabs:
            self.on_idle(self.key)
            self._closing = asyncio.ensure_future(self.close())

    async def send(self, data: bytes) -> None:
        """Input from any tab. Typed while the upstream (re)connects, it is kept (up to a
        few kilobytes) and sent once the console answers, as a terminal's line would be."""
        upstream = self.upstream
        if upstream is not None and not upstream.closed:
            await upstream.send_bytes(data)
        elif len(self.pending) + len(data) <= PENDING_BYTES:
            self.pending.extend(data)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self.upstream is not None:
            await self.upstream.close()

    async def _broadcast(self, data: bytes) -> None:
        self.recent.extend(data)
        del self.recent[:-REPLAY_BYTES]
        for tab in list(self.tabs):
            if tab.closed:
                continue
            with contextlib.suppress(ConnectionError, RuntimeError):
                await tab.send_bytes(data)

    async def _run(self) -> None:
        backoff = Backoff(base=0.25, cap=5.0)
        rng = random.Random()
        failures = 0
        while self.tabs or self._linger is not None:
            try:
                self.upstream = await self.connect()
            except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                failures += 1
                log.warning("console.connect_failed", vm=self.key, error=str(exc))
                await asyncio.sleep(backoff.delay(failures, rng))
                continue
            if failures or self.reconnects:
                await self._broadcast(NOTICE_RECONNECTED)
            failures = 0
            if self.pending:
                await self.upstream.send_bytes(bytes(self.pending))
                self.pending.clear()
            async for message in self.upstream:
                if message.type is aiohttp.WSMsgType.BINARY:
                    await self._broadcast(message.data)
                elif message.type is aiohttp.WSMsgType.TEXT:
                    await self._broadcast(message.data.encode())
                elif message.type in (aiohttp.WSMsgType.ERROR, aiohttp.WSMsgType.CLOSED):
                    break
            log.info("console.upstream_closed", vm=self.key, code=self.upstream.close_code)
            self.reconnects += 1
            if self.tabs:
                await self._broadcast(NOTICE_RECONNECTING)
                await asyncio.sleep(backoff.delay(1, rng))


class ConsoleHub:
    """Every console link of this gateway process, by region and VMI."""

    def __init__(self, endpoints: dict[str, ConsoleEndpoint]) -> None:
        self._endpoints = endpoints
        self._links: dict[str, ConsoleLink] = {}
        self._http: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        self._http = aiohttp.ClientSession()

    async def stop(self) -> None:
        for link in list(self._links.values()):
            await link.close()
        self._links.clear()
        if self._http is not None:
            await self._http.close()

    def link(self, region: str, vmi_name: str) -> ConsoleLink:
        key = f"{region}/{vmi_name}"
        found = self._links.get(key)
        if found is None:
            endpoint = self._endpoints[region]

            async def connect() -> aiohttp.ClientWebSocketResponse:
                assert self._http is not None
                return await self._http.ws_connect(
                    endpoint.url(vmi_name),
                    protocols=(SUBPROTOCOL,),
                    headers=endpoint.headers,
                    ssl=endpoint.ssl_context,
                    heartbeat=UPSTREAM_HEARTBEAT_SECONDS,
                    timeout=aiohttp.ClientWSTimeout(ws_close=5.0),
                )

            found = self._links[key] = ConsoleLink(key, connect, self._forget)
        return found

    def _forget(self, key: str) -> None:
        self._links.pop(key, None)

    @property
    def open_upstreams(self) -> int:
        return sum(1 for link in self._links.values() if link.upstream and not link.upstream.closed)
