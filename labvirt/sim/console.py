"""KubeVirt's serial console subresource, as virt-api serves it.

``GET /apis/subresources.kubevirt.io/{v1,v1alpha3}/namespaces/{ns}/virtualmachineinstances/
{name}/console`` is checked before the upgrade (404 for a missing VMI, 409 ``Conflict`` for one
that is not running, as ``Status`` bodies) and then becomes a websocket with subprotocol
``plain.kubevirt.io`` whose binary frames carry raw terminal bytes both ways. virt-handler lets
one client hold a console: a new connection closes the previous one. A console ends when its
VMI stops, crashes or is deleted. Behind each VMI sits a ``Shell`` that lives as long as it.
Everything runs on the server's event loop: one task per connection, no threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import zlib
from dataclasses import dataclass
from typing import Any

from aiohttp import WSCloseCode, WSMsgType, web

from labvirt.sim.errors import ApiError, bad_request, method_not_allowed, not_found
from labvirt.sim.rest import not_found_path
from labvirt.sim.shell import Peer, Shell
from labvirt.sim.store import Obj, ResourceType, Store
from labvirt.sim.vmi import VMI

log = logging.getLogger(__name__)

SUBRESOURCE_GROUP = "subresources.kubevirt.io"
SUBRESOURCE_VERSIONS = ("v1", "v1alpha3")  # virt-api registers both; v1 is preferred
PROTOCOL = "plain.kubevirt.io"
ENVIRONMENT_LABEL = "labvirt.io/environment"
CLUSTER_DOMAIN = "svc.cluster.local"
# virt-api reports a missing VMI under the singular resource name.
_VMI_RESOURCE = "virtualmachineinstance"
MAX_MESSAGE_BYTES = 64 * 1024
_FEED_CHUNK = 4096  # input is echoed in pieces, so the writes wait for a slow reader
_CLOSE_TIMEOUT = 3.0  # how long a closing console waits for the client's close frame

TAKEN_OVER = "another console connection to this VMI took over"
VMI_STOPPED = "the VMI is no longer running"
VMI_DELETED = "the VMI was deleted"
SHUTTING_DOWN = "the server is shutting down"


def subresource_groups() -> dict[str, list[str]]:
    """The group ``GET /apis`` adds for the subresources (an aggregated API upstream)."""
    return {SUBRESOURCE_GROUP: list(SUBRESOURCE_VERSIONS)}


def subresource_resource_list(version: str) -> dict[str, Any]:
    """virt-api's ``APIResourceList``: only name and scope, as its hand-built list has; the
    other fields are what Go writes for their zero values."""
    return {
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": f"{SUBRESOURCE_GROUP}/{version}",
        "resources": [
            {
                "name": "virtualmachineinstances/console",
                "singularName": "",
                "namespaced": True,
                "kind": "",
                "verbs": None,
            }
        ],
    }


def _group_document() -> dict[str, Any]:
    versions = [
        {"groupVersion": f"{SUBRESOURCE_GROUP}/{v}", "version": v} for v in SUBRESOURCE_VERSIONS
    ]
    return {
        "kind": "APIGroup",
        "apiVersion": "v1",
        "name": SUBRESOURCE_GROUP,
        "versions": versions,
        "preferredVersion": versions[0],
    }


def hostname(vmi: Obj) -> str:
    """The guest's hostname: ``spec.hostname``, else the VMI's name, as KubeVirt sets it."""
    return str((vmi.get("spec") or {}).get("hostname") or vmi["metadata"]["name"])


def _not_running(name: str) -> ApiError:
    return ApiError(
        409,
        "Conflict",
        f'Operation cannot be fulfilled on {_VMI_RESOURCE}.{VMI.group} "{name}": '
        "VMI is not running",
        details={"name": name, "group": VMI.group, "kind": _VMI_RESOURCE},
    )


def _check_console(vmi: Obj) -> None:
    """virt-api's checks before it dials virt-handler."""
    name = vmi["metadata"]["name"]
    devices = ((vmi.get("spec") or {}).get("domain") or {}).get("devices") or {}
    if devices.get("autoattachSerialConsole") is False:
        raise bad_request("No serial consoles are present.")
    if (vmi.get("status") or {}).get("phase") != "Running":
        raise _not_running(name)


@dataclass(eq=False)
class _Connection:
    ws: web.WebSocketResponse
    uid: str
    closing: asyncio.Task[bool] | None = None


class Consoles:
    """Every console connection and every VMI's shell, kept in step with the store."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._shells: dict[str, Shell] = {}  # by VMI uid
        self._active: dict[str, _Connection] = {}  # the one console of each VMI, by uid
        self._open: set[_Connection] = set()  # including ones still closing
        store.add_listener(self._on_event)

    @property
    def enabled(self) -> bool:
        """Consoles exist only where KubeVirt runs (its VMI type is registered)."""
        return self._store.resource(VMI.group, VMI.plural) is not None

    @property
    def count(self) -> int:
        return len(self._open)

    def discovery(self, parts: list[str]) -> dict[str, Any] | None:
        """``/apis/subresources.kubevirt.io[/{version}]``; None for any other path."""
        if len(parts) == 2:
            return _group_document()
        if len(parts) == 3 and parts[2] in SUBRESOURCE_VERSIONS:
            return subresource_resource_list(parts[2])
        return None

    # -- connections ----------------------------------------------------------------------------

    async def serve(self, request: web.Request, parts: list[str]) -> web.StreamResponse:
        """``parts``: the path's segments, ``apis`` first."""
        if (
            len(parts) != 8
            or parts[2] not in SUBRESOURCE_VERSIONS
            or parts[3] != "namespaces"
            or parts[5] != VMI.plural
            or parts[7] != "console"
        ):
            raise not_found_path()
        if request.method != "GET":
            raise method_not_allowed()
        namespace, name = parts[4], parts[6]
        vmi = self._store.peek(VMI, namespace, name)
        if vmi is None:
            raise not_found(_VMI_RESOURCE, VMI.group, name)
        _check_console(vmi)
        ws = web.WebSocketResponse(
            protocols=(PROTOCOL,),
            max_msg_size=MAX_MESSAGE_BYTES,
            timeout=_CLOSE_TIMEOUT,
            compress=False,
        )
        if not ws.can_prepare(request).ok:
            raise bad_request(
                "websocket: the client is not using the websocket protocol: "
                "'upgrade' token not found in 'Connection' header"
            )
        await ws.prepare(request)
        uid = vmi["metadata"]["uid"]
        conn = _Connection(ws, uid)
        self._open.add(conn)
        try:
            await self._attach(conn, namespace, name)
        except ConnectionError:
            pass  # the client went away
        except Exception:  # the upgrade is written: a Status body can no longer be sent
            log.exception("console of %s/%s failed", namespace, name)
        finally:
            if self._active.get(uid) is conn:
                del self._active[uid]
            if conn.closing is None and not ws.closed:
                self._close(conn, WSCloseCode.OK, "")
            try:
                if conn.closing is not None:
                    with contextlib.suppress(Exception):
                        await conn.closing
            finally:  # closing the transport may cancel this handler
                self._open.discard(conn)
        return ws

    async def _attach(self, conn: _Connection, namespace: str, name: str) -> None:
        vmi = self._store.peek(VMI, namespace, name)
        if vmi is None or vmi["metadata"]["uid"] != conn.uid:
            self._close(conn, WSCloseCode.OK, VMI_DELETED)  # gone while the upgrade was written
            return
        if (vmi.get("status") or {}).get("phase") != "Running":
            self._close(conn, WSCloseCode.OK, VMI_STOPPED)
            return
        previous = self._active.get(conn.uid)
        self._active[conn.uid] = conn
        if previous is not None:
            self._close(previous, WSCloseCode.OK, TAKEN_OVER)
        shell = self._shell(vmi)
        ws = conn.ws
        await ws.send_bytes(shell.greeting())
        async for message in ws:
            if message.type is WSMsgType.BINARY:
                data = bytes(message.data)
            elif message.type is WSMsgType.TEXT:
                data = str(message.data).encode()
            else:
                continue
            for start in range(0, len(data), _FEED_CHUNK):
                if conn.closing is not None:
                    return
                output = shell.feed(data[start : start + _FEED_CHUNK])
                if output:
                    await ws.send_bytes(output)

    def _close(self, conn: _Connection, code: int, reason: str) -> None:
        """Send the close frame from a task of its own: the connection's handler may be
        waiting for input, and ``close`` wakes it."""
        if conn.closing is not None:
            return
        if self._active.get(conn.uid) is conn:
            del self._active[conn.uid]
        conn.closing = asyncio.get_running_loop().create_task(
            conn.ws.close(code=code, message=reason.encode()[:123])
        )

    async def close_all(self) -> None:
        """Close every console (the server is stopping) and wait until they are closed."""
        for conn in list(self._open):
            self._close(conn, WSCloseCode.GOING_AWAY, SHUTTING_DOWN)
        tasks = [conn.closing for conn in self._open if conn.closing is not None]
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- VMIs -----------------------------------------------------------------------------------

    def _on_event(self, event_type: str, resource: ResourceType, obj: Obj, _: Obj | None) -> None:
        if resource != VMI:
            return
        uid = obj["metadata"].get("uid", "")
        if event_type == "DELETED":
            self._shells.pop(uid, None)
            reason = VMI_DELETED
        elif (obj.get("status") or {}).get("phase") != "Running":
            reason = VMI_STOPPED
        else:
            return
        conn = self._active.get(uid)
        if conn is not None:
            self._close(conn, WSCloseCode.OK, reason)

    def _shell(self, vmi: Obj) -> Shell:
        meta = vmi["metadata"]
        uid = meta["uid"]
        shell = self._shells.get(uid)
        if shell is None:
            namespace, name = meta.get("namespace", ""), meta["name"]

            def resolve(peer: str) -> Peer | None:
                return self._resolve(namespace, name, uid, peer)

            shell = Shell(hostname(vmi), resolve, seed=zlib.crc32(uid.encode()))
            self._shells[uid] = shell
        return shell

    def _resolve(self, namespace: str, name: str, uid: str, peer: str) -> Peer | None:
        """The cluster DNS as a VM of an environment sees it: the other running VMs of the
        same environment (namespace and ``labvirt.io/environment`` label), by hostname,
        ``hostname.subdomain`` or the full name the headless Service gives them."""
        own = self._store.peek(VMI, namespace, name)
        if own is None or own["metadata"].get("uid") != uid:
            return None
        environment = (own["metadata"].get("labels") or {}).get(ENVIRONMENT_LABEL)
        if not environment:
            return None
        wanted = peer.rstrip(".").lower()
        for obj in self._store.items(VMI):
            meta = obj["metadata"]
            if (
                meta.get("namespace") != namespace
                or meta.get("uid") == uid
                or (meta.get("labels") or {}).get(ENVIRONMENT_LABEL) != environment
            ):
                continue
            host = hostname(obj).lower()
            subdomain = (obj.get("spec") or {}).get("subdomain")
            names = {host}
            fqdn = host
            if subdomain:
                fqdn = f"{host}.{subdomain}.{namespace}.{CLUSTER_DOMAIN}"
                names |= {f"{host}.{subdomain}", f"{host}.{subdomain}.{namespace}", fqdn}
                names.add(f"{host}.{subdomain}.{namespace}.svc")
            if wanted not in names:
                continue
            address = _address(obj)
            if address is None:
                continue  # not ready: the headless Service publishes no record for it
            return Peer(fqdn, address)
        return None


def _address(vmi: Obj) -> str | None:
    status = vmi.get("status") or {}
    if status.get("phase") != "Running":
        return None
    interfaces = status.get("interfaces") or []
    address = interfaces[0].get("ipAddress") if interfaces else None
    return str(address) if address else None
