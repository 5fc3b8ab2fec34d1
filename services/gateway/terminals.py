"""``GET /v1/sessions/{id}/terminal?vm=<name>&ticket=<ticket>``: a browser's terminal on a VM.

The ticket (one-time, 30 s, bound to the session) is checked before the upgrade; the VM must
be one of the session's own (by the name the session lists: ``controlplane``, ``node01``).
Then the tab is attached to the VM's shared console link (``consoles.ConsoleHub``). When the
session ends, its terminals are closed with code 4000 and the reason.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from typing import Final

import aiohttp
import structlog
from aiohttp import web

from services.gateway.consoles import ConsoleHub
from shared.domain.manifests import environment_vmi_name
from shared.domain.sessions import Session, SessionState

log = structlog.get_logger(__name__)

# Application close codes (4000-4999): the browser's terminal shows why it closed.
CLOSE_SESSION_ENDED: Final = 4000
CLOSE_GATEWAY_STOPPING: Final = 1001


class Terminals:
    """The open terminal tabs of this process, by session, for closing them when it ends."""

    def __init__(self, hub: ConsoleHub) -> None:
        self.hub = hub
        self._tabs: defaultdict[str, set[web.WebSocketResponse]] = defaultdict(set)

    @property
    def open_count(self) -> int:
        return sum(len(tabs) for tabs in self._tabs.values())

    def sessions(self) -> list[str]:
        return list(self._tabs)

    async def serve(self, request: web.Request, session: Session, vm: str) -> web.StreamResponse:
        tab = web.WebSocketResponse(heartbeat=25.0, max_msg_size=64 * 1024)
        await tab.prepare(request)
        vmi_name = environment_vmi_name(session.environment_id, vm)
        link = self.hub.link(session.region, vmi_name)
        self._tabs[session.id].add(tab)
        await link.attach(tab)
        log.info("terminal.opened", session_id=session.id, vm=vm, tabs=len(link.tabs))
        try:
            async for message in tab:
                if message.type is aiohttp.WSMsgType.BINARY:
                    await link.send(message.data)
                elif message.type is aiohttp.WSMsgType.TEXT:
                    await link.send(message.data.encode())
        finally:
            link.detach(tab)
            tabs = self._tabs.get(session.id)
            if tabs is not None:
                tabs.discard(tab)
                if not tabs:
                    del self._tabs[session.id]
            log.info("terminal.closed", session_id=session.id, vm=vm)
        return tab

    async def close_session(self, session_id: str, reason: str) -> None:
        for tab in list(self._tabs.get(session_id, ())):
            with contextlib.suppress(ConnectionError, RuntimeError):
                await tab.close(code=CLOSE_SESSION_ENDED, message=reason.encode()[:120])

    async def close_all(self) -> None:
        for session_id in list(self._tabs):
            for tab in list(self._tabs.get(session_id, ())):
                with contextlib.suppress(ConnectionError, RuntimeError):
                    await tab.close(code=CLOSE_GATEWAY_STOPPING, message=b"gateway stopping")


def ended_reason(session: Session | None) -> str | None:
    """Why a session's terminals must close now (None: it still serves)."""
    if session is None:
        return "the session is gone"
    if session.state is SessionState.READY:
        return None
    return f"the session is {session.state.value}" + (
        f": {session.reason}" if session.reason else ""
    )
