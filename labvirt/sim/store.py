"""The API server's storage: objects, one resourceVersion counter, watch history and watchers.

Everything runs on one thread (the server's event loop), so there are no locks. Stored objects
are never mutated after they are stored: an update stores a new dict. That lets watch events
and listeners share them without copying; callers that want to change an object get a clone.
"""

from __future__ import annotations

import base64
import binascii
import json
import random
import re
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from labvirt.sim.clock import Scheduler
from labvirt.sim.errors import (
    ApiError,
    already_exists,
    bad_request,
    conflict,
    expired,
    invalid,
    not_found,
)
from labvirt.sim.selectors import FieldSelector, LabelSelector

Obj = dict[str, Any]

_GENERATE_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"
_DNS1123_SUBDOMAIN = re.compile(
    r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
)
_SERVER_METADATA = (
    "uid",
    "creationTimestamp",
    "generation",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
)


@dataclass(frozen=True)
class ResourceType:
    group: str  # "" for the core group
    version: str
    plural: str
    singular: str
    kind: str
    namespaced: bool
    short_names: tuple[str, ...] = ()
    categories: tuple[str, ...] = ()
    verbs: tuple[str, ...] = (
        "delete",
        "deletecollection",
        "get",
        "list",
        "patch",
        "create",
        "update",
        "watch",
    )
    custom: bool = False  # a CustomResourceDefinition: no strategic merge patch
    # Some built-in registries answer an immediate delete with the object, not a Status.
    returns_deleted_object: bool = False

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def list_kind(self) -> str:
        return f"{self.kind}List"


class Admission(Protocol):
    """Admission webhooks and API-server strategies for one resource type."""

    def on_create(self, obj: Obj) -> None:
        """Mutate ``obj`` in place (defaults, finalizers, status); raise ``ApiError`` to deny."""

    def on_update(self, old: Obj, new: Obj) -> None:
        """Check a user's update; may mutate ``new``; raise ``ApiError`` to deny."""


Listener = Callable[[str, ResourceType, Obj, Obj | None], None]


def clone(obj: Obj) -> Obj:
    """A deep copy; objects are plain JSON, and a JSON round trip beats ``copy.deepcopy``."""
    result: Obj = json.loads(json.dumps(obj))
    return result


def rfc3339(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


@dataclass
class WatchEvent:
    type: str
    rv: int
    at: float
    resource: ResourceType
    obj: Obj
    previous: Obj | None
    _encoded: dict[str, bytes] = field(default_factory=dict, repr=False)

    def encode(self, event_type: str) -> bytes:
        """The newline-terminated JSON line for this event, computed once per type."""
        line = self._encoded.get(event_type)
        if line is None:
            line = json.dumps({"type": event_type, "object": self.obj}).encode() + b"\n"
            self._encoded[event_type] = line
        return line


class Watcher:
    """One watch stream's view: a filter and a queue of encoded lines the server drains."""

    def __init__(  # noqa: PLR0917 - constructed by Store.watch only
        self,
        store: Store,
        resource: ResourceType,
        namespace: str | None,
        labels: LabelSelector,
        fields: FieldSelector,
        max_queue: int,
    ) -> None:
        self.store = store
        self.resource = resource
        self.namespace = namespace
        self.labels = labels
        self.fields = fields
        self.lines: deque[bytes] = deque()
        self.closed = False
        self.last_rv = 0
        self.notify: Callable[[], None] = lambda: None
        self._max_queue = max_queue

    def _matches(self, obj: Obj | None) -> bool:
        if obj is None:
            return False
        meta = obj.get("metadata", {})
        if self.namespace is not None and meta.get("namespace") != self.namespace:
            return False
        return self.labels.matches(meta.get("labels")) and self.fields.matches(obj)

    def offer(self, event: WatchEvent) -> None:
        if self.closed or event.resource != self.resource:
            return
        now_matches = self._matches(event.obj)
        if event.type == "DELETED":
            event_type = "DELETED" if now_matches else None
        else:
            was = self._matches(event.previous)
            if now_matches:
                event_type = "MODIFIED" if was else "ADDED"
            else:
                # Leaving the selector looks like a deletion to this watcher, as upstream.
                event_type = "DELETED" if was else None
        if event_type is not None:
            self.push(event.encode(event_type), event.rv)

    def push(self, line: bytes, rv: int) -> None:
        if len(self.lines) >= self._max_queue:
            # A reader this far behind is cut off, as the API server drops slow watchers.
            self.close()
            return
        self.lines.append(line)
        self.last_rv = max(self.last_rv, rv)
        self.notify()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.store.unwatch(self)
            self.notify()


class Store:
    def __init__(
        self,
        scheduler: Scheduler,
        *,
        history_seconds: float = 75.0,
        history_max_events: int = 100_000,
        watch_queue_max: int = 50_000,
        seed: int | None = None,
    ) -> None:
        self.scheduler = scheduler
        self._rng = random.Random(seed)
        self._types: dict[tuple[str, str], ResourceType] = {}
        self._admission: dict[ResourceType, Admission] = {}
        self._objects: dict[ResourceType, dict[tuple[str, str], Obj]] = {}
        self._rv = 100
        self._history: deque[WatchEvent] = deque()
        self._history_seconds = history_seconds
        self._history_max = history_max_events
        self._compacted_rv = self._rv
        self._watchers: set[Watcher] = set()
        self._watch_queue_max = watch_queue_max
        self._listeners: list[Listener] = []
        self._pending: deque[tuple[str, ResourceType, Obj, Obj | None]] = deque()
        self._dispatching = False

    # -- registry ---------------------------------------------------------------------------

    def register(self, resource: ResourceType, admission: Admission | None = None) -> None:
        self._types[(resource.group, resource.plural)] = resource
        self._objects[resource] = {}
        if admission is not None:
            self._admission[resource] = admission

    def resource(self, group: str, plural: str) -> ResourceType | None:
        return self._types.get((group, plural))

    def resources(self) -> list[ResourceType]:
        return list(self._types.values())

    def add_listener(self, listener: Listener) -> None:
        """Call ``listener(type, resource, obj, previous)`` after every change.

        Listeners run after the change is stored, never re-entrantly: a listener that writes
        to the store sees its own change delivered after it returns. They must not mutate
        the objects they are given.
        """
        self._listeners.append(listener)

    @property
    def resource_version(self) -> int:
        return self._rv

    @property
    def oldest_resource_version(self) -> int:
        """Watches may resume from this version or any later one."""
        return self._compacted_rv

    # -- reads ------------------------------------------------------------------------------

    def get(self, resource: ResourceType, namespace: str | None, name: str) -> Obj:
        return clone(self._stored(resource, namespace, name))

    def peek(self, resource: ResourceType, namespace: str | None, name: str) -> Obj | None:
        """The stored object itself, read-only, or None."""
        return self._objects[resource].get((namespace or "", name))

    def items(self, resource: ResourceType) -> Iterable[Obj]:
        """Every stored object of a type, read-only."""
        return self._objects[resource].values()

    def list(
        self,
        resource: ResourceType,
        namespace: str | None,
        *,
        labels: LabelSelector | None = None,
        fields: FieldSelector | None = None,
        limit: int | None = None,
        continue_token: str | None = None,
        copy_items: bool = True,
    ) -> Obj:
        """A list response. ``copy_items=False`` hands out the stored (read-only) objects, for
        a caller that only serialises them."""
        labels = labels or LabelSelector()
        fields = fields or FieldSelector()
        start_after: tuple[str, str] | None = None
        if continue_token:
            # Keys sort as (namespace, name) tuples; comparing "ns/name" strings would skip
            # objects when one namespace's name is a prefix of another's ("a" and "a-b").
            ns_after, _, name_after = self._decode_continue(continue_token).partition("/")
            start_after = (ns_after, name_after)
        if limit is not None and limit < 0:
            raise bad_request("limit must be a non-negative integer")
        objects = self._objects[resource]
        keys = sorted(objects)
        items: list[Obj] = []
        remaining = 0
        last_key = ""
        for key in keys:
            ns, name = key
            if namespace is not None and ns != namespace:
                continue
            flat = f"{ns}/{name}"
            if start_after is not None and key <= start_after:
                continue
            obj = objects[key]
            if not labels.matches(obj.get("metadata", {}).get("labels")):
                continue
            if not fields.matches(obj):
                continue
            if limit and len(items) >= limit:
                remaining += 1
                continue
            items.append(obj)
            last_key = flat
        metadata: Obj = {"resourceVersion": str(self._rv)}
        if remaining:
            metadata["continue"] = self._encode_continue(last_key)
            metadata["remainingItemCount"] = remaining
        return {
            "kind": resource.list_kind,
            "apiVersion": resource.api_version,
            "metadata": metadata,
            "items": [clone(o) for o in items] if copy_items else items,
        }

    def _encode_continue(self, last_key: str) -> str:
        raw = json.dumps({"v": "meta.k8s.io/v1", "rv": self._rv, "start": last_key})
        return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")

    def _decode_continue(self, token: str) -> str:
        try:
            padded = token + "=" * (-len(token) % 4)
            data = json.loads(base64.urlsafe_b64decode(padded.encode()))
            rv = int(data["rv"])
            start = str(data["start"])
        except (ValueError, KeyError, TypeError, binascii.Error) as exc:
            raise bad_request(f"continue key is not valid: {exc}") from exc
        if rv < self._compacted_rv:
            raise ApiError(
                410,
                "Expired",
                "The provided continue parameter is too old to display a consistent list "
                "result. You can start a new list without the continue parameter.",
            )
        return start

    # -- writes -----------------------------------------------------------------------------

    def create(
        self, resource: ResourceType, namespace: str | None, body: Obj, *, dry_run: bool = False
    ) -> Obj:
        """Store a new object; ``dry_run`` runs every check and admission but stores nothing."""
        obj = clone(body)
        self._check_kind(resource, obj)
        meta = obj.setdefault("metadata", {})
        if not isinstance(meta, dict):
            raise bad_request("metadata must be an object")
        namespace = self._check_namespace(resource, namespace, meta)
        if not meta.get("name"):
            prefix = meta.get("generateName")
            if not prefix:
                raise invalid(
                    resource.kind,
                    resource.group,
                    None,
                    [
                        {
                            "type": "FieldValueRequired",
                            "message": "Required value: name or generateName is required",
                            "field": "metadata.name",
                        }
                    ],
                )
            meta["name"] = self._generate_name(resource, namespace, str(prefix))
        name = str(meta["name"])
        self._check_name(resource, name)
        if (namespace or "", name) in self._objects[resource]:
            raise already_exists(resource.plural, resource.group, name)
        if meta.get("resourceVersion"):
            raise bad_request("resourceVersion should not be set on objects to be created")
        for key in _SERVER_METADATA:
            meta.pop(key, None)
        obj["apiVersion"] = resource.api_version
        obj["kind"] = resource.kind
        now = self.scheduler.now()
        meta["uid"] = str(uuid.UUID(int=self._rng.getrandbits(128), version=4))
        meta["creationTimestamp"] = rfc3339(now)
        meta["generation"] = 1
        admission = self._admission.get(resource)
        if admission is not None:
            admission.on_create(obj)
        if dry_run:
            return obj
        self._commit(resource, "ADDED", obj, None)
        return clone(obj)

    def update(
        self,
        resource: ResourceType,
        namespace: str | None,
        name: str,
        body: Obj,
        *,
        require_resource_version: bool = True,
        dry_run: bool = False,
    ) -> Obj:
        """A user's PUT (or a patch result): optimistic concurrency, admission, generation."""
        current = self._stored(resource, namespace, name)
        new = clone(body)
        self._check_kind(resource, new)
        meta = new.setdefault("metadata", {})
        if meta.get("name", name) != name:
            raise bad_request(
                f"the name of the object ({meta.get('name')}) does not match the name on "
                f"the URL ({name})"
            )
        meta["name"] = name
        self._check_namespace(resource, namespace, meta)
        given_rv = meta.get("resourceVersion")
        if not given_rv:
            if require_resource_version:
                raise invalid(
                    resource.kind,
                    resource.group,
                    name,
                    [
                        {
                            "type": "FieldValueInvalid",
                            "message": "Invalid value: 0x0: must be specified for an update",
                            "field": "metadata.resourceVersion",
                        }
                    ],
                )
        elif str(given_rv) != current["metadata"]["resourceVersion"]:
            raise conflict(resource.plural, resource.group, name)
        old_meta = current["metadata"]
        for key in _SERVER_METADATA:
            if key in old_meta:
                meta[key] = old_meta[key]
            else:
                meta.pop(key, None)
        new["apiVersion"] = resource.api_version
        new["kind"] = resource.kind
        if old_meta.get("deletionTimestamp") and len(meta.get("finalizers") or []) > len(
            old_meta.get("finalizers") or []
        ):
            raise invalid(
                resource.kind,
                resource.group,
                name,
                [
                    {
                        "type": "FieldValueForbidden",
                        "message": "Forbidden: no new finalizers can be added if the object is "
                        "being deleted",
                        "field": "metadata.finalizers",
                    }
                ],
            )
        admission = self._admission.get(resource)
        if admission is not None:
            admission.on_update(current, new)
        if _without_rv(new) == _without_rv(current):
            return clone(current)
        if new.get("spec") != current.get("spec"):
            meta["generation"] = int(old_meta.get("generation", 1)) + 1
        if dry_run:
            return new
        self._commit(resource, "MODIFIED", new, current)
        return clone(self._objects[resource].get((namespace or "", name), new))

    def controller_update(
        self,
        resource: ResourceType,
        namespace: str | None,
        name: str,
        mutate: Callable[[Obj], None],
    ) -> Obj | None:
        """A controller's write: no admission, no precondition. None if the object is gone."""
        current = self._objects[resource].get((namespace or "", name))
        if current is None:
            return None
        new = clone(current)
        mutate(new)
        if new == current:
            return current
        self._commit(resource, "MODIFIED", new, current)
        return self._objects[resource].get((namespace or "", name), new)

    def delete(
        self,
        resource: ResourceType,
        namespace: str | None,
        name: str,
        *,
        grace_period_seconds: int | None = None,
        preconditions: Obj | None = None,
        dry_run: bool = False,
    ) -> tuple[Obj, bool]:
        """Returns (object, removed). With finalizers left, deletion only marks the object."""
        current = self._stored(resource, namespace, name)
        meta = current["metadata"]
        if preconditions:
            uid = preconditions.get("uid")
            if uid and uid != meta.get("uid"):
                raise ApiError(
                    409,
                    "Conflict",
                    f"Precondition failed: UID in precondition: {uid}, UID in object meta: "
                    f"{meta.get('uid')}",
                )
            rv = preconditions.get("resourceVersion")
            if rv and str(rv) != meta.get("resourceVersion"):
                raise ApiError(
                    409,
                    "Conflict",
                    f"Precondition failed: ResourceVersion in precondition: {rv}, "
                    f"ResourceVersion in object meta: {meta.get('resourceVersion')}",
                )
        if meta.get("finalizers"):
            if meta.get("deletionTimestamp"):
                return clone(current), False
            new = clone(current)
            new["metadata"]["deletionTimestamp"] = rfc3339(self.scheduler.now())
            new["metadata"]["deletionGracePeriodSeconds"] = (
                grace_period_seconds if grace_period_seconds is not None else 0
            )
            if dry_run:
                return new, False
            self._commit(resource, "MODIFIED", new, current)
            return clone(new), False
        if not dry_run:
            self._remove(resource, current)
        return clone(current), True

    # -- watch ------------------------------------------------------------------------------

    def watch(
        self,
        resource: ResourceType,
        namespace: str | None,
        *,
        labels: LabelSelector | None = None,
        fields: FieldSelector | None = None,
        resource_version: str | None = None,
    ) -> Watcher:
        watcher = Watcher(
            self,
            resource,
            namespace,
            labels or LabelSelector(),
            fields or FieldSelector(),
            self._watch_queue_max,
        )
        if not resource_version or resource_version == "0":
            for obj in sorted(
                self._objects[resource].values(),
                key=lambda o: int(o["metadata"]["resourceVersion"]),
            ):
                if watcher._matches(obj):
                    line = json.dumps({"type": "ADDED", "object": obj}).encode() + b"\n"
                    watcher.push(line, int(obj["metadata"]["resourceVersion"]))
            watcher.last_rv = self._rv
            self._watchers.add(watcher)
            return watcher
        try:
            since = int(resource_version)
        except ValueError as exc:
            raise bad_request(f"invalid resource version: {resource_version}") from exc
        if since < self._compacted_rv:
            error = expired(resource_version, str(self._compacted_rv + 1))
            line = json.dumps({"type": "ERROR", "object": error.status()}).encode() + b"\n"
            watcher.push(line, since)
            watcher.closed = True
            return watcher
        watcher.last_rv = since
        for event in self._history:
            if event.rv > since:
                watcher.offer(event)
        self._watchers.add(watcher)
        return watcher

    def unwatch(self, watcher: Watcher) -> None:
        self._watchers.discard(watcher)

    @property
    def watcher_count(self) -> int:
        return len(self._watchers)

    def bookmark(self, resource: ResourceType) -> bytes:
        """A BOOKMARK line at the current resourceVersion."""
        return (
            json.dumps(
                {
                    "type": "BOOKMARK",
                    "object": {
                        "apiVersion": resource.api_version,
                        "kind": resource.kind,
                        "metadata": {"resourceVersion": str(self._rv)},
                    },
                }
            ).encode()
            + b"\n"
        )

    # -- internals --------------------------------------------------------------------------

    def _stored(self, resource: ResourceType, namespace: str | None, name: str) -> Obj:
        obj = self._objects[resource].get((namespace or "", name))
        if obj is None:
            raise not_found(resource.plural, resource.group, name)
        return obj

    def _check_kind(self, resource: ResourceType, obj: Obj) -> None:
        kind = obj.get("kind")
        api_version = obj.get("apiVersion")
        if kind and kind != resource.kind:
            raise bad_request(
                f"the API version in the data ({api_version}) does not match the expected API "
                f"version ({resource.api_version}) or kind {kind} is not {resource.kind}"
            )
        if api_version and api_version != resource.api_version:
            raise bad_request(
                f"the API version in the data ({api_version}) does not match the expected API "
                f"version ({resource.api_version})"
            )

    def _check_namespace(
        self, resource: ResourceType, namespace: str | None, meta: Obj
    ) -> str | None:
        if not resource.namespaced:
            meta.pop("namespace", None)
            return None
        given = meta.get("namespace")
        if given and namespace and given != namespace:
            raise bad_request(
                "the namespace of the provided object does not match the namespace sent on "
                "the request"
            )
        namespace = namespace or given
        if not namespace:
            raise bad_request("a namespace is required for a namespaced resource")
        namespaces = self._types.get(("", "namespaces"))
        if namespaces is not None and ("", namespace) not in self._objects[namespaces]:
            raise not_found("namespaces", "", namespace)
        meta["namespace"] = namespace
        return namespace

    def _check_name(self, resource: ResourceType, name: str) -> None:
        if len(name) > 253 or not _DNS1123_SUBDOMAIN.match(name):
            raise invalid(
                resource.kind,
                resource.group,
                name,
                [
                    {
                        "type": "FieldValueInvalid",
                        "message": f'Invalid value: "{name}": a lowercase RFC 1123 subdomain must '
                        "consist of lower case alphanumeric characters, '-' or '.', and must start "
                        "and end with an alphanumeric character",
                        "field": "metadata.name",
                    }
                ],
            )

    def _generate_name(self, resource: ResourceType, namespace: str | None, prefix: str) -> str:
        for _ in range(8):
            suffix = "".join(self._rng.choice(_GENERATE_ALPHABET) for _ in range(5))
            name = prefix[:58] + suffix
            if (namespace or "", name) not in self._objects[resource]:
                return name
        raise already_exists(resource.plural, resource.group, prefix)

    def _next_rv(self) -> int:
        self._rv += 1
        return self._rv

    def _commit(
        self, resource: ResourceType, event_type: str, obj: Obj, previous: Obj | None
    ) -> None:
        meta = obj["metadata"]
        key = (meta.get("namespace") or "", meta["name"])
        if meta.get("deletionTimestamp") and not meta.get("finalizers"):
            # The last finalizer is gone: the object goes away now.
            if previous is not None:
                self._remove(resource, obj, previous=previous)
            return
        rv = self._next_rv()
        meta["resourceVersion"] = str(rv)
        self._objects[resource][key] = obj
        self._emit(WatchEvent(event_type, rv, self.scheduler.now(), resource, obj, previous))

    def _remove(self, resource: ResourceType, obj: Obj, previous: Obj | None = None) -> None:
        meta = obj["metadata"]
        key = (meta.get("namespace") or "", meta["name"])
        self._objects[resource].pop(key, None)
        final = clone(obj)
        rv = self._next_rv()
        final["metadata"]["resourceVersion"] = str(rv)
        self._emit(
            WatchEvent("DELETED", rv, self.scheduler.now(), resource, final, previous or obj)
        )

    def _emit(self, event: WatchEvent) -> None:
        self._history.append(event)
        cutoff = event.at - self._history_seconds
        while self._history and (
            len(self._history) > self._history_max or self._history[0].at < cutoff
        ):
            self._compacted_rv = self._history.popleft().rv
        for watcher in list(self._watchers):
            watcher.offer(event)
        self._pending.append((event.type, event.resource, event.obj, event.previous))
        self._dispatch()

    def _dispatch(self) -> None:
        if self._dispatching:
            return
        self._dispatching = True
        try:
            while self._pending:
                event_type, resource, obj, previous = self._pending.popleft()
                for listener in self._listeners:
                    listener(event_type, resource, obj, previous)
        finally:
            self._dispatching = False

    def set_history_limit(
        self, *, seconds: float | None = None, max_events: int | None = None
    ) -> None:
        """Shrink or grow the kept history (tests force the 410 path with a tiny one)."""
        if seconds is not None:
            self._history_seconds = seconds
        if max_events is not None:
            self._history_max = max_events
        while self._history and len(self._history) > self._history_max:
            self._compacted_rv = self._history.popleft().rv


def _without_rv(obj: Obj) -> Obj:
    stripped = dict(obj)
    stripped["metadata"] = {
        k: v for k, v in obj.get("metadata", {}).items() if k != "resourceVersion"
    }
    return stripped
