"""The Kubernetes adapter: KubeVirt VMIs, Services and NetworkPolicies through the official client.

Statuses become typed exceptions; transient ones (429, 5xx, broken connections) are retried by
the one retry layer (``shared.adapters.retrying``) within the task's budget; 409 AlreadyExists
on create and 404 on delete are success, so every operation is safe to repeat. One per region.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import structlog
import urllib3
from kubernetes import client, config, watch
from kubernetes.client.exceptions import ApiException

from shared.adapters.retrying import CountedRetry, Retry
from shared.config import Cluster as ClusterConfig
from shared.domain.vmi import Vmi, as_vmi

log = structlog.get_logger(__name__)

GROUP = "kubevirt.io"
VERSION = "v1"
VMI_PLURAL = "virtualmachineinstances"
T = TypeVar("T")


class KubeError(Exception):
    """A failed Kubernetes call. ``transient`` ones may succeed when tried again."""

    transient = False
    retry_after: float | None = None  # seconds the server asked to wait, when it said

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class NotFound(KubeError):
    pass


class AlreadyExists(KubeError):
    pass


class Conflict(KubeError):
    pass


class Invalid(KubeError):
    def __init__(
        self, message: str, *, status: int | None = None, causes: list[dict[str, Any]] | None = None
    ) -> None:
        super().__init__(message, status=status)
        self.causes = causes or []


class Expired(KubeError):
    """410: the resourceVersion is older than the server's history; list again."""


class TooManyRequests(KubeError):
    transient = True

    def __init__(
        self, message: str, *, status: int | None = None, retry_after: float = 1.0
    ) -> None:
        super().__init__(message, status=status)
        self.retry_after: float | None = retry_after


class Unavailable(KubeError):
    """5xx or a broken connection."""

    transient = True


def translate(exc: ApiException) -> KubeError:
    status = exc.status or 0
    body: dict[str, Any] = {}
    try:
        body = json.loads(exc.body) if exc.body else {}
    except (TypeError, ValueError):
        body = {}
    message = str(body.get("message") or exc.reason or f"HTTP {status}")
    reason = body.get("reason")
    if status == 404:
        return NotFound(message, status=status)
    if status == 409 and reason == "AlreadyExists":
        return AlreadyExists(message, status=status)
    if status == 409:
        return Conflict(message, status=status)
    if status == 410:
        return Expired(message, status=status)
    if status == 422:
        causes = (body.get("details") or {}).get("causes") or []
        return Invalid(message, status=status, causes=causes)
    if status == 429:
        headers = exc.headers or {}
        retry_after = headers.get("Retry-After") or (body.get("details") or {}).get(
            "retryAfterSeconds", 1
        )
        try:
            delay = float(retry_after)
        except (TypeError, ValueError):
            delay = 1.0
        return TooManyRequests(message, status=status, retry_after=delay)
    if status >= 500 or status == 0:
        return Unavailable(message, status=status)
    return KubeError(message, status=status)


def call(operation: Callable[[], T]) -> T:
    """Run one client call, raising ``KubeError`` subclasses instead of client exceptions."""
    try:
        return operation()
    except ApiException as exc:
        raise translate(exc) from exc
    except (urllib3.exceptions.HTTPError, OSError) as exc:
        raise Unavailable(f"connection failed: {exc}") from exc


def load_configuration(cluster: ClusterConfig) -> client.Configuration:
    """The cluster's address and credentials: its kubeconfig, or the in-cluster account."""
    configuration = client.Configuration()  # the loaders below carry no type hints
    if cluster.kubeconfig is None:
        config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
    else:
        config.load_kube_config(  # type: ignore[no-untyped-call]
            config_file=str(cluster.kubeconfig),
            context=cluster.context,
            client_configuration=configuration,
            persist_config=False,
        )
    return configuration


def api_client(cluster: ClusterConfig, *, pool_maxsize: int) -> client.ApiClient:
    configuration = load_configuration(cluster)
    # Workers run many environments at once; the default pool of 4 would serialise them.
    configuration.connection_pool_maxsize = pool_maxsize
    configuration.retries = False
    return client.ApiClient(configuration)


class KubeCluster:
    """One cluster's VMIs, Services and NetworkPolicies in labvirt's namespace."""

    def __init__(
        self,
        cluster: ClusterConfig,
        *,
        pool_maxsize: int = 32,
        request_timeout: float = 30.0,
        retry: Retry | None = None,
    ) -> None:
        self.region = cluster.region
        self.namespace = cluster.namespace
        self._api_client = api_client(cluster, pool_maxsize=pool_maxsize)
        # Typed as Any: custom objects travel as dicts, which the client's stubs do not admit.
        self._custom: Any = client.CustomObjectsApi(self._api_client)
        self._core: Any = client.CoreV1Api(self._api_client)
        self._networking: Any = client.NetworkingV1Api(self._api_client)
        self._timeout = request_timeout
        self._retry = CountedRetry(retry or Retry(), region=self.region)

    def close(self) -> None:
        self._api_client.close()  # type: ignore[no-untyped-call]

    def _retried(self, operation: Callable[[], T], *, what: str) -> T:
        return self._retry(lambda: call(operation), what=what, error=KubeError)

    # -- VMIs -------------------------------------------------------------------------------

    def create_vmi(self, body: dict[str, Any]) -> dict[str, Any]:
        """Create, or return the one already there (same deterministic name)."""
        name = body["metadata"]["name"]
        try:
            created: dict[str, Any] = self._retried(
                lambda: self._custom.create_namespaced_custom_object(
                    GROUP,
                    VERSION,
                    self.namespace,
                    VMI_PLURAL,
                    body,
                    _request_timeout=self._timeout,
                ),
                what=f"create vmi {name}",
            )
        except AlreadyExists:
            return self.get_vmi(name)
        return created

    def get_vmi(self, name: str) -> dict[str, Any]:
        result: dict[str, Any] = self._retried(
            lambda: self._custom.get_namespaced_custom_object(
                GROUP, VERSION, self.namespace, VMI_PLURAL, name, _request_timeout=self._timeout
            ),
            what=f"get vmi {name}",
        )
        return result

    def list_vmis(self, selector: str) -> tuple[list[Vmi], str]:
        """Every VMI matching ``selector`` (all pages) and the list's resourceVersion."""
        items: list[Vmi] = []
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"label_selector": selector, "limit": 500}
            if token:
                kwargs["_continue"] = token
            page: dict[str, Any] = self._retried(
                lambda kw=kwargs: self._custom.list_namespaced_custom_object(  # type: ignore[misc]
                    GROUP,
                    VERSION,
                    self.namespace,
                    VMI_PLURAL,
                    _request_timeout=self._timeout,
                    **kw,
                ),
                what="list vmis",
            )
            items.extend(as_vmi(item) for item in page.get("items", []))
            token = page.get("metadata", {}).get("continue")
            if not token:
                return items, str(page.get("metadata", {}).get("resourceVersion", ""))

    def watch_vmis(
        self, selector: str, resource_version: str, timeout_seconds: int
    ) -> Iterator[tuple[str, Vmi]]:
        """Changes after ``resource_version`` until the server ends the stream.

        BOOKMARK events come through too (their object carries only a resourceVersion). Raises
        ``Expired`` when the version is too old (list again), and transient errors as they
        come: the caller decides whether to resume or list again. Not retried here.
        """
        stream: Any = watch.Watch()  # type: ignore[no-untyped-call]
        try:
            events = stream.stream(
                self._custom.list_namespaced_custom_object,
                GROUP,
                VERSION,
                self.namespace,
                VMI_PLURAL,
                label_selector=selector,
                resource_version=resource_version,
                allow_watch_bookmarks=True,
                timeout_seconds=timeout_seconds,
                _request_timeout=timeout_seconds + 10,
            )
            while True:
                try:
                    event = call(lambda: next(events))
                except StopIteration:
                    return
                event_type = event["type"]
                if event_type == "BOOKMARK":
                    # Only its resourceVersion matters: where to resume from.
                    raw = event.get("raw_object") or event.get("object") or {}
                    yield event_type, as_vmi(raw if isinstance(raw, dict) else {})
                    continue
                if event_type == "ERROR":
                    status = event.get("raw_object") or event.get("object") or {}
                    code = int(status.get("code", 500)) if isinstance(status, dict) else 500
                    message = (
                        status.get("message", "watch error")
                        if isinstance(status, dict)
                        else str(status)
                    )
                    if code == 410:
                        raise Expired(message, status=410)
                    raise Unavailable(message, status=code)
                yield event_type, as_vmi(event["object"])
        finally:
            stream.stop()

    def delete_vmis(self, selector: str) -> None:
        """Ask for every matching VMI to go (finalizers may keep them a while)."""
        self._retried(
            lambda: self._custom.delete_collection_namespaced_custom_object(
                GROUP,
                VERSION,
                self.namespace,
                VMI_PLURAL,
                label_selector=selector,
                _request_timeout=self._timeout,
                _preload_content=False,
            ).release_conn(),
            what="delete vmis",
        )

    def delete_vmi(self, name: str) -> None:
        """Ask for one VMI to go; already gone is success."""
        try:
            self._retried(
                lambda: self._custom.delete_namespaced_custom_object(
                    GROUP,
                    VERSION,
                    self.namespace,
                    VMI_PLURAL,
                    name,
                    _request_timeout=self._timeout,
                    _preload_content=False,
                ).release_conn(),
                what=f"delete vmi {name}",
            )
        except NotFound:
            return

    def patch_vmi(self, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = self._retried(
            lambda: self._custom.patch_namespaced_custom_object(
                GROUP,
                VERSION,
                self.namespace,
                VMI_PLURAL,
                name,
                patch,
                _request_timeout=self._timeout,
            ),
            what=f"patch vmi {name}",
        )
        return result

    # -- Services and NetworkPolicies ---------------------------------------------------------

    def create_service(self, body: dict[str, Any]) -> None:
        self._create(self._core.create_namespaced_service, body, what="service")

    def delete_services(self, selector: str) -> None:
        self._delete_matching(
            self._core.list_namespaced_service,
            self._core.delete_namespaced_service,
            selector,
            what="service",
        )

    def create_network_policy(self, body: dict[str, Any]) -> None:
        self._create(self._networking.create_namespaced_network_policy, body, what="networkpolicy")

    def delete_network_policies(self, selector: str) -> None:
        self._delete_matching(
            self._networking.list_namespaced_network_policy,
            self._networking.delete_namespaced_network_policy,
            selector,
            what="networkpolicy",
        )

    def _create(self, create: Callable[..., Any], body: dict[str, Any], *, what: str) -> None:
        """Create in labvirt's namespace; one already there (same name) is success."""
        name = body["metadata"]["name"]
        try:
            self._retried(
                lambda: create(self.namespace, body, _request_timeout=self._timeout),
                what=f"create {what} {name}",
            )
        except AlreadyExists:
            return

    def _delete_matching(
        self,
        list_matching: Callable[..., Any],
        delete: Callable[..., Any],
        selector: str,
        *,
        what: str,
    ) -> None:
        """Delete each object ``selector`` lists, one by one (the workers' Role grants list
        and delete, not deletecollection); one gone meanwhile is success."""
        listed = self._retried(
            lambda: list_matching(
                self.namespace, label_selector=selector, _request_timeout=self._timeout
            ),
            what=f"list {what}",
        )
        for item in listed.items:
            name = item.metadata.name
            try:
                self._retried(
                    # The answer is the object or a Status depending on the server's version;
                    # labvirt needs neither, so it is not decoded.
                    lambda n=name: delete(  # type: ignore[misc]
                        n, self.namespace, _request_timeout=self._timeout, _preload_content=False
                    ).release_conn(),
                    what=f"delete {what} {name}",
                )
            except NotFound:
                continue

    def count_services(self, selector: str) -> int:
        services = self._retried(
            lambda: self._core.list_namespaced_service(
                self.namespace, label_selector=selector, _request_timeout=self._timeout
            ),
            what="list services",
        )
        return len(services.items)
