"""What the informer's reports mean for a session: the observer over a real ``SessionLife``
(real Redis), fed hand-built VMIs as an informer would hand them over."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis

from services.provisioner.observer import EnvironmentObserver
from shared.adapters.informer import EnvironmentChange
from shared.adapters.session_events import SessionEvents
from shared.adapters.session_store import RedisSessionStore
from shared.adapters.template_files import load_templates
from shared.domain.lifecycle import Stage, clocks_for, start_session
from shared.domain.manifests import (
    ENVIRONMENT_LABEL,
    MANAGED_BY_LABEL,
    SESSION_LABEL,
    VM_LABEL,
    environment_vmi_name,
)
from shared.domain.reasons import CloseReason, FailureKind
from shared.domain.sessions import Session, SessionState
from shared.session_life import SessionLife

TEMPLATES = load_templates(None)
NOW = 1_700_000_000.0


@dataclass
class RecordingQueue:
    sent: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    def enqueue(self, name: str, payload: Any, *, delay: float | None = None) -> None:
        self.sent.append((name, dict(payload)))


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    connection = redis.Redis.from_url(redis_url)
    yield connection
    connection.flushdb()
    connection.close()


@dataclass
class World:
    life: SessionLife
    queue: RecordingQueue
    events: SessionEvents
    observer: EnvironmentObserver

    def session(self, template: str = "kubernetes") -> Session:
        session, _ = start_session(
            user=f"u{uuid.uuid4().hex[:8]}",
            template=template,
            region="local",
            clocks=clocks_for(TEMPLATES[template]),
            now=NOW,
        )
        self.life.store.add(session)
        return session

    def stages(self, session: Session) -> list[str]:
        return [event.stage.value for _, event in self.events.read(session.id)]


@pytest.fixture
def world(client: redis.Redis) -> World:
    queue = RecordingQueue()
    events = SessionEvents(client)
    life = SessionLife(
        store=RedisSessionStore(client),
        events=events,
        queue=queue,  # type: ignore[arg-type]
        clock=lambda: NOW + 20,
    )
    observer = EnvironmentObserver(life=life, templates=TEMPLATES, pools=None)
    return World(life, queue, events, observer)


def vmi(
    session: Session, vm: str, *, phase: str = "Running", ready: bool = True, **meta: Any
) -> dict[str, Any]:
    return {
        "metadata": {
            "name": environment_vmi_name(session.environment_id, vm),
            "resourceVersion": uuid.uuid4().hex,
            "labels": {
                MANAGED_BY_LABEL: "labvirt",
                ENVIRONMENT_LABEL: session.environment_id,
                SESSION_LABEL: session.id,
                VM_LABEL: vm,
            },
            **meta,
        },
        "spec": {"hostname": vm},
        "status": {
            "phase": phase,
            "interfaces": [{"ipAddress": f"10.0.0.{len(vm)}"}],
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
        },
    }


def change(session: Session, *vmis: dict[str, Any]) -> EnvironmentChange:
    labels = vmis[0]["metadata"]["labels"] if vmis else {SESSION_LABEL: session.id}
    return EnvironmentChange("local", session.environment_id, labels, tuple(vmis))


def test_booting_then_ready_records_progress_once_and_marks_the_session_ready(
    world: World,
) -> None:
    session = world.session()
    booting = change(
        session,
        vmi(session, "controlplane", phase="Scheduled", ready=False),
        vmi(session, "node01", phase="Scheduled", ready=False),
    )
    world.observer(booting)
    world.observer(booting)  # reported again (a list after a dropped watch): nothing new
    half = change(
        session,
        vmi(session, "controlplane"),
        vmi(session, "node01", phase="Scheduled", ready=False),
    )
    world.observer(half)
    world.observer(change(session, vmi(session, "controlplane"), vmi(session, "node01")))
    stored = world.life.get(session.id)
    assert stored is not None
    assert stored.state is SessionState.READY
    assert [vm.ready for vm in stored.vms] == [True, True]
    assert world.stages(session) == ["queued", "booting", "booting", "booting", "ready"]
    booting_counts = [
        event.detail["ready"]
        for _, event in world.events.read(session.id)
        if event.stage is Stage.BOOTING
    ]
    assert booting_counts == [0, 1, 2]
    assert world.queue.sent == []


def test_an_incomplete_environment_is_not_ready_even_if_its_vms_are(world: World) -> None:
    session = world.session()
    world.observer(change(session, vmi(session, "controlplane")))
    stored = world.life.get(session.id)
    assert stored is not None
    assert stored.state is SessionState.PROVISIONING


def test_a_failed_boot_gets_one_fresh_environment_then_fails_for_good(world: World) -> None:
    session = world.session("ubuntu")
    world.observer(change(session, vmi(session, "ubuntu", phase="Failed", ready=False)))
    moved = world.life.get(session.id)
    assert moved is not None
    assert moved.state is SessionState.PROVISIONING
    assert moved.environment_id != session.environment_id
    assert moved.replacements == 1
    assert world.queue.sent == [
        (
            "labvirt.retire_environment",
            {"environment_id": session.environment_id, "region": "local"},
        ),
        ("labvirt.provision", {"session_id": session.id}),
    ]
    world.queue.sent.clear()
    # The fresh environment fails too: that was its second chance.
    world.observer(change(moved, vmi(moved, "ubuntu", phase="Failed", ready=False)))
    world.observer(change(moved, vmi(moved, "ubuntu", phase="Failed", ready=False)))
    stored = world.life.get(session.id)
    assert stored is not None
    assert stored.state is SessionState.FAILED
    assert stored.ended_by == FailureKind.VM_FAILED.value
    assert stored.reason == (
        f"VM {environment_vmi_name(moved.environment_id, 'ubuntu')} reached phase Failed"
    )
    assert world.queue.sent == [("labvirt.teardown", {"session_id": session.id})]


def test_a_ready_session_whose_vm_vanishes_fails(world: World) -> None:
    session = world.session()
    world.observer(change(session, vmi(session, "controlplane"), vmi(session, "node01")))
    world.observer(change(session, vmi(session, "controlplane")))
    stored = world.life.get(session.id)
    assert stored is not None
    assert stored.state is SessionState.FAILED
    assert stored.reason == (
        f"VM {environment_vmi_name(session.environment_id, 'node01')} vanished from the cluster"
    )


def test_a_closing_session_ends_when_its_last_vmi_is_gone(world: World) -> None:
    session = world.session("ubuntu")
    world.observer(change(session, vmi(session, "ubuntu")))
    world.life.close(session.id, CloseReason.DELETED)
    deleting = vmi(session, "ubuntu", deletionTimestamp="2026-01-01T00:00:00Z")
    world.observer(change(session, deleting))
    closing = world.life.get(session.id)
    assert closing is not None
    assert closing.state is SessionState.TERMINATING  # being deleted is not gone
    world.observer(change(session))
    ended = world.life.get(session.id)
    assert ended is not None
    assert ended.state is SessionState.ENDED
    assert ended.reason == "deleted"
    assert world.queue.sent == [("labvirt.teardown", {"session_id": session.id})]


def test_vmis_of_another_environment_never_touch_a_session(world: World) -> None:
    session = world.session("ubuntu")
    stray = vmi(session, "ubuntu", phase="Failed", ready=False)
    world.observer(
        EnvironmentChange("local", "someone-else", stray["metadata"]["labels"], (stray,))
    )
    stored = world.life.get(session.id)
    assert stored is not None
    assert stored.state is SessionState.PROVISIONING
