"""When each VMI's create reached the simulator and when it first turned Ready, precisely.

Kubernetes timestamps (``creationTimestamp``, a condition's ``lastTransitionTime``) have
one-second precision: too coarse to tell a client's overhead from a boot. The timeline keeps,
per VMI, the wall-clock seconds (``time.time()`` in the server, the clock every process on the
machine reads, to the microsecond) at which:

- ``createReceived``: the create request reached the server (before its body was read);
- ``created``: the VMI was stored (admitted);
- ``ready``: its ``Ready`` condition first became ``True`` (null until then).

``GET /_sim/timeline`` serves it, oldest first. It is bounded: past ``max_entries`` the oldest
entries go.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any

from labvirt.sim.store import Obj, ResourceType
from labvirt.sim.vmi import VMI

# Set by the server as each request arrives; a create's store listener reads it (same task).
REQUEST_RECEIVED: ContextVar[float | None] = ContextVar("request_received", default=None)
MAX_ENTRIES = 100_000


def is_ready(obj: Obj) -> bool:
    conditions = (obj.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


class VmiTimeline:
    """A store listener that times each VMI's create and first readiness."""

    def __init__(self, now: Callable[[], float], *, max_entries: int = MAX_ENTRIES) -> None:
        self._now = now
        self._max = max_entries
        self._entries: OrderedDict[str, dict[str, Any]] = OrderedDict()

    def on_event(self, event_type: str, resource: ResourceType, obj: Obj, _: Obj | None) -> None:
        if resource != VMI:
            return
        meta = obj.get("metadata", {})
        uid = meta.get("uid", "")
        if event_type == "ADDED":
            now = self._now()
            received = REQUEST_RECEIVED.get()
            self._entries[uid] = {
                "namespace": meta.get("namespace", ""),
                "name": meta.get("name", ""),
                "uid": uid,
                "labels": dict(meta.get("labels") or {}),
                "createReceived": now if received is None else received,
                "created": now,
                "ready": now if is_ready(obj) else None,
            }
            while len(self._entries) > self._max:
                self._entries.popitem(last=False)
            return
        entry = self._entries.get(uid)
        if event_type != "MODIFIED" or entry is None or entry["ready"] is not None:
            return
        if is_ready(obj):
            entry["ready"] = self._now()

    def entries(self) -> list[dict[str, Any]]:
        return [dict(entry) for entry in self._entries.values()]
