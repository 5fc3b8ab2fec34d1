"""This process's open connections (event streams and terminals), held as leases in Redis.

Each connection registers with ``shared.adapters.connections`` when it opens and leaves when it
closes; a background task renews every open lease well within its term, so the reaper can
tell a closed tab (the last connection left) from a gateway that died (its leases ran out).
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable

import structlog

from services.gateway.events import cancel_for_sure
from shared.adapters.connections import LEASE_SECONDS, Connections

log = structlog.get_logger(__name__)


class Presence:
    def __init__(self, connections: Connections, *, clock: Callable[[], float] = time.time) -> None:
        self._connections = connections
        self._clock = clock
        self._open: defaultdict[str, set[str]] = defaultdict(set)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._renew_forever(), name="presence-renewal")

    async def stop(self) -> None:
        if self._task is not None:
            await cancel_for_sure(self._task)

    def open_of(self, kind: str) -> int:
        """How many connections of ``kind`` (``events``, ``terminal``) this process holds."""
        return sum(1 for ids in self._open.values() for c in ids if c.startswith(f"{kind}-"))

    @contextlib.asynccontextmanager
    async def connected(self, session_id: str, kind: str) -> AsyncIterator[str]:
        """Hold a lease on ``session_id`` for as long as the block runs."""
        connection_id = f"{kind}-{secrets.token_hex(8)}"
        await self._connections.open(session_id, connection_id, now=self._clock())
        self._open[session_id].add(connection_id)
        try:
            yield connection_id
        finally:
            ids = self._open.get(session_id)
            if ids is not None:
                ids.discard(connection_id)
                if not ids:
                    del self._open[session_id]
            last = await self._connections.close(session_id, connection_id, now=self._clock())
            if last:
                log.info("session.all_connections_closed", session_id=session_id)

    async def _renew_forever(self) -> None:
        while True:
            await asyncio.sleep(LEASE_SECONDS / 3)
            now = self._clock()
            for session_id, ids in list(self._open.items()):
                try:
                    await self._connections.renew(session_id, sorted(ids), now=now)
                except Exception as exc:  # noqa: BLE001 - the next round tries again
                    log.warning("presence.renew_failed", session_id=session_id, error=str(exc))
