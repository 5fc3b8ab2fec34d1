"""Bringing a session's environment up and down on its cluster.

Every step is safe to repeat: names are deterministic, 409 on create means "already there",
404 on delete means "already gone", and state changes go through the session's state machine,
so a redelivered task or a second worker does no harm.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog

from shared.adapters.kube import Expired, KubeCluster, KubeError
from shared.adapters.session_events import SessionEvents
from shared.adapters.session_store import RedisSessionStore, SessionNotFound
from shared.domain.lifecycle import ProgressEvent, Stage, booting_event
from shared.domain.manifests import build_environment, environment_selector
from shared.domain.recovery import session_annotations
from shared.domain.sessions import IllegalTransition, Session, SessionState, VmView
from shared.domain.templates import Template
from shared.domain.vmi_status import failure_of, is_ready, vm_views

log = structlog.get_logger(__name__)

WATCH_SLICE_SECONDS = 30


class EnvironmentFailed(Exception):
    """A VM of the environment failed, or it did not come up in time."""


@dataclass(frozen=True)
class Outcome:
    state: SessionState | None
    detail: str


def environment_token(session: Session) -> str:
    """A per-environment secret for cloud-init (kubeadm's bootstrap token format).

    Derived, not stored, so a retried provision renders the same manifests.
    """
    digest = hashlib.sha256(f"{session.token_hash}:{session.environment_id}".encode()).hexdigest()
    return f"{digest[:6]}.{digest[6:22]}"


class EnvironmentWatch:
    """The VMIs of one environment, kept current by list-then-watch.

    Watches resume from the last seen resourceVersion; a 410 or a broken stream means list
    again. No polling loop: the thread sleeps inside the watch until the server sends news.
    """

    def __init__(
        self, cluster: KubeCluster, selector: str, *, clock: Callable[[], float] = time.time
    ) -> None:
        self._cluster = cluster
        self._selector = selector
        self._clock = clock
        self.vmis: dict[str, dict[str, Any]] = {}
        self._rv = ""

    def relist(self) -> None:
        items, self._rv = self._cluster.list_vmis(self._selector)
        self.vmis = {item["metadata"]["name"]: item for item in items}

    def until(
        self,
        done: Callable[[dict[str, dict[str, Any]]], bool],
        *,
        deadline: float,
        on_change: Callable[[dict[str, dict[str, Any]]], None] | None = None,
    ) -> bool:
        """Follow changes until ``done(vmis)`` holds (True) or the deadline passes (False)."""
        self.relist()
        while True:
            if on_change is not None:
                on_change(self.vmis)
            if done(self.vmis):
                return True
            remaining = deadline - self._clock()
            if remaining <= 0:
                return False
            try:
                if self._follow(done, deadline=deadline, on_change=on_change):
                    return done(self.vmis)
            except Expired:
                log.info("watch.expired", selector=self._selector)
                self.relist()
            except KubeError as exc:
                if not exc.transient:
                    raise
                log.info("watch.interrupted", selector=self._selector, error=str(exc))
                self._backoff()
                self.relist()

    def _follow(
        self,
        done: Callable[[dict[str, dict[str, Any]]], bool],
        *,
        deadline: float,
        on_change: Callable[[dict[str, dict[str, Any]]], None] | None,
    ) -> bool:
        """One watch stream; True when it stopped because ``done`` held or time ran out."""
        remaining = deadline - self._clock()
        for event_type, obj in self._cluster.watch_vmis(
            self._selector,
            self._rv,
            timeout_seconds=max(1, min(WATCH_SLICE_SECONDS, int(remaining) + 1)),
        ):
            name = obj["metadata"]["name"]
            self._rv = obj["metadata"].get("resourceVersion", self._rv)
            if event_type == "DELETED":
                self.vmis.pop(name, None)
            else:
                self.vmis[name] = obj
            if on_change is not None:
                on_change(self.vmis)
            if done(self.vmis) or self._clock() >= deadline:
                return True
        return False

    def _backoff(self) -> None:
        time.sleep(0.2)


class Provisioner:
    def __init__(
        self,
        *,
        sessions: RedisSessionStore,
        templates: dict[str, Template],
        cluster_for: Callable[[str], KubeCluster],
        clock: Callable[[], float] = time.time,
        teardown_timeout: float = 120.0,
        events: SessionEvents | None = None,
    ) -> None:
        self._sessions = sessions
        self._templates = templates
        self._cluster_for = cluster_for
        self._clock = clock
        self._teardown_timeout = teardown_timeout
        self._events = events

    # -- up ---------------------------------------------------------------------------------

    def provision(self, session_id: str) -> Outcome:
        session = self._sessions.get(session_id)
        if session is None:
            return Outcome(None, "no such session")
        if session.state is not SessionState.PROVISIONING:
            return Outcome(session.state, "nothing to do")
        template = self._templates.get(session.template)
        if template is None:
            return self.fail(session.id, f"template {session.template!r} is not configured")
        cluster = self._cluster_for(session.region)
        manifests = build_environment(
            template=template,
            environment_id=session.environment_id,
            namespace=cluster.namespace,
            session_id=session.id,
            environment_token=environment_token(session),
            # What the reconciler needs to rebuild the session should Redis lose it.
            extra_annotations=session_annotations(session),
        )
        self._emit(
            session.id, ProgressEvent(Stage.CREATING, self._clock(), {"vms": len(manifests.vmis)})
        )
        if manifests.service is not None:
            cluster.create_service(manifests.service)
        for vmi in manifests.vmis:
            cluster.create_vmi(vmi)
        log.info("environment.created", vms=len(manifests.vmis), region=session.region)

        deadline = session.startup_expires_at or (
            session.created_at + template.startup_timeout_seconds
        )
        selector = environment_selector(session.environment_id)
        expected = {vmi["metadata"]["name"] for vmi in manifests.vmis}
        failure: list[str] = []
        last_views: list[list[VmView]] = [[]]
        last_count: list[int | None] = [None]

        def progress(vmis: dict[str, dict[str, Any]]) -> None:
            views = vm_views(template, vmis.values())
            if views != last_views[0]:
                last_views[0] = views
                self._record_vms(session.id, views)
            ready_count = sum(1 for view in views if view.ready)
            if ready_count != last_count[0]:
                last_count[0] = ready_count
                self._emit(
                    session.id,
                    booting_event(ready=ready_count, total=len(views), at=self._clock()),
                )

        def settled(vmis: dict[str, dict[str, Any]]) -> bool:
            for name in expected:
                vmi = vmis.get(name)
                reason = failure_of(vmi) if vmi is not None else None
                if reason:
                    failure.append(reason)
                    return True
            if self._gone_elsewhere(session.id):
                return True
            return expected <= vmis.keys() and all(is_ready(vmis[n]) for n in expected)

        ready = EnvironmentWatch(cluster, selector, clock=self._clock).until(
            settled, deadline=deadline, on_change=progress
        )
        if self._gone_elsewhere(session.id):
            # Closed while it booted; a teardown may have finished before our creates landed.
            cluster.delete_services(selector)
            cluster.delete_vmis(selector)
            return Outcome(None, "closed while booting")
        if failure:
            return self.fail(session.id, failure[0])
        if not ready:
            return self.fail(
                session.id,
                f"environment did not become ready within {template.startup_timeout_seconds} s",
            )
        return self._mark_ready(session.id, last_views[0])

    def _emit(self, session_id: str, event: ProgressEvent) -> None:
        if self._events is not None:
            self._events.emit(session_id, event)

    def _gone_elsewhere(self, session_id: str) -> bool:
        """True when someone else moved the session on (closed while booting)."""
        current = self._sessions.get(session_id)
        return current is None or current.state is not SessionState.PROVISIONING

    def _record_vms(self, session_id: str, views: list[VmView]) -> None:
        def change(current: Session) -> Session:
            if current.state is not SessionState.PROVISIONING:
                return current
            return current.with_vms(views)

        try:
            self._sessions.update(session_id, change)
        except SessionNotFound:
            return

    def _mark_ready(self, session_id: str, views: list[VmView]) -> Outcome:
        now = self._clock()

        def change(current: Session) -> Session:
            return current.with_vms(views).transition(SessionState.READY, at=now)

        try:
            session = self._sessions.update(session_id, change)
        except IllegalTransition as exc:
            # Closed while it booted: the teardown already queued takes it from here.
            log.info("session.ready_too_late", state=exc.current)
            return Outcome(exc.current, "closed while booting")
        except SessionNotFound:
            return Outcome(None, "session vanished")
        log.info("session.ready", seconds=round(now - session.created_at, 2))
        return Outcome(SessionState.READY, "ready")

    def fail(self, session_id: str, reason: str) -> Outcome:
        """Fail a session that is not final yet; its resources are the teardown's job."""
        now = self._clock()
        try:
            self._sessions.update(
                session_id, lambda s: s.transition(SessionState.FAILED, at=now, reason=reason)
            )
        except (IllegalTransition, SessionNotFound):
            return Outcome(None, reason)
        log.warning("session.failed", reason=reason)
        return Outcome(SessionState.FAILED, reason)

    # -- down -------------------------------------------------------------------------------

    def teardown(self, session_id: str) -> Outcome:
        session = self._sessions.get(session_id)
        if session is None:
            return Outcome(None, "no such session")
        if session.state is SessionState.ENDED:
            return Outcome(session.state, "nothing to do")
        if session.state in (SessionState.PROVISIONING, SessionState.READY):
            now = self._clock()
            try:
                session = self._sessions.update(
                    session_id,
                    lambda s: (
                        s
                        if s.state
                        in (SessionState.TERMINATING, SessionState.FAILED, SessionState.ENDED)
                        else s.transition(SessionState.TERMINATING, at=now, reason="closed")
                    ),
                )
            except SessionNotFound:
                return Outcome(None, "session vanished")
        cluster = self._cluster_for(session.region)
        selector = environment_selector(session.environment_id)
        self.delete_environment(cluster, selector)
        if session.state is SessionState.FAILED:
            log.info("environment.removed", state="failed")
            return Outcome(SessionState.FAILED, "resources removed")
        now = self._clock()
        try:
            self._sessions.update(
                session_id,
                lambda s: s if s.is_final else s.transition(SessionState.ENDED, at=now),
            )
        except SessionNotFound:
            return Outcome(None, "session vanished")
        log.info("session.ended")
        return Outcome(SessionState.ENDED, "ended")

    def delete_environment(self, cluster: KubeCluster, selector: str) -> None:
        """Delete every object of the environment and wait until the VMIs are gone."""
        cluster.delete_services(selector)
        cluster.delete_vmis(selector)
        gone = EnvironmentWatch(cluster, selector, clock=self._clock).until(
            lambda vmis: not vmis, deadline=self._clock() + self._teardown_timeout
        )
        if not gone:
            raise EnvironmentStuck(
                f"VMIs matching {selector} still exist after {self._teardown_timeout} s"
            )


class EnvironmentStuck(Exception):
    """Deletion was asked for but the objects did not go in time; the task retries."""
