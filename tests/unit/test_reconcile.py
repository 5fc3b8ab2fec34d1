"""The reconciler against the simulator over HTTP (on a thread) and fakeredis, with ``now`` in
the test's hands: orphans, vanished and failed VMs, sessions whose readiness went unseen,
rebuilds after Redis lost its data, pools, and that a second pass does nothing.

Sessions are made as the API and the provisioner make them: ``Provisioner.provision`` creates
the environment and the region's informer, reporting to the provisioner's observer, marks it
ready. No informer runs while the reconciler is judged (it would fail or ready sessions first):
``provisioned`` drives the informer's list itself until the session is ready. The tasks a pass
queues (a failed session's teardown) are recorded, not run.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from typing import Any

import fakeredis
import pytest
from kubernetes import client

from labvirt.sim.testing import SimHandle, running_simulator_in_thread, wait_until
from services.provisioner.environments import Provisioner, create_environment
from services.provisioner.observer import EnvironmentObserver
from services.reaper.reconciler import PoolOwnership, Reconciler, Report
from shared.adapters.informer import VmiInformer
from shared.adapters.kube import KubeCluster
from shared.adapters.pool_store import RedisPoolStore
from shared.adapters.session_events import SessionEvents
from shared.adapters.session_store import RedisSessionStore
from shared.adapters.template_files import load_templates
from shared.config import Cluster
from shared.domain.lifecycle import clocks_for, extend, start_session
from shared.domain.manifests import (
    MANAGED_BY_SELECTOR,
    POOL_LABEL,
    build_environment,
    environment_selector,
)
from shared.domain.reasons import Failure, FailureKind
from shared.domain.recovery import EXPIRES_AT_ANNOTATION, session_annotations
from shared.domain.sessions import Session, SessionState
from shared.domain.vmi_status import is_ready
from shared.jobs import TEARDOWN, TEARDOWN_QUEUE, TaskQueue
from shared.session_life import SessionLife
from tests.doubles import RecordingCelery, SentTask

# The shipped templates without their readiness probe (5 s initial delay): they boot at once.
_SHIPPED = load_templates(None)
TEMPLATES = {
    name: dataclasses.replace(
        _SHIPPED[name],
        vms=tuple(dataclasses.replace(vm, readiness_probe=None) for vm in _SHIPPED[name].vms),
    )
    for name in ("ubuntu", "kubernetes")
}
GRACE = 60.0
NAMESPACE = "default"


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimHandle]:
    with running_simulator_in_thread(
        tmp_path_factory.mktemp("reconcile-sim"), boot_seconds=0.2, seed=3
    ) as handle:
        yield handle


@pytest.fixture(scope="module")
def cluster(sim: SimHandle) -> Iterator[KubeCluster]:
    kube = KubeCluster(Cluster("local", sim.kubeconfig_path, None, NAMESPACE))
    yield kube
    kube.close()


@pytest.fixture(autouse=True)
def empty_cluster(cluster: KubeCluster) -> Iterator[None]:
    yield
    cluster.delete_vmis(MANAGED_BY_SELECTOR)
    cluster.delete_services(MANAGED_BY_SELECTOR)
    cluster.delete_network_policies(MANAGED_BY_SELECTOR)
    wait_until(lambda: not cluster.list_vmis(MANAGED_BY_SELECTOR)[0], timeout=10)


@dataclass
class World:
    """The sessions' store, their life (what the reconciler acts through) and its queue."""

    store: RedisSessionStore
    celery: RecordingCelery
    life: SessionLife


@pytest.fixture
def world() -> World:
    client = fakeredis.FakeRedis()
    store = RedisSessionStore(client)
    celery = RecordingCelery()
    life = SessionLife(
        store=store,
        events=SessionEvents(client),
        queue=TaskQueue(celery),  # type: ignore[arg-type]
    )
    return World(store, celery, life)


@pytest.fixture
def store(world: World) -> RedisSessionStore:
    return world.store


@dataclass
class FakePools:
    """The pools side as the reconciler sees it (``PoolOwnership``)."""

    owned: set[str] = field(default_factory=set)
    accept: bool = False
    offered: list[dict[str, Any]] = field(default_factory=list)

    def owned_environment_ids(self, region: str) -> Collection[str]:
        return set(self.owned)

    def restore_environment(self, **kwargs: Any) -> bool:
        self.offered.append(kwargs)
        if self.accept:
            self.owned.add(kwargs["environment_id"])
        return self.accept


def reconciler(
    world: World, cluster: KubeCluster, pools: PoolOwnership | None = None
) -> Reconciler:
    return Reconciler(
        life=world.life,
        templates=TEMPLATES,
        cluster_for=lambda region: cluster,
        pools=pools,
        orphan_grace_seconds=GRACE,
    )


@dataclass
class Pass:
    """One reconciler pass: its report and the tasks it queued."""

    report: Report
    queued: list[SentTask]

    @property
    def quiet(self) -> bool:
        return not self.report.changed and not self.report.provisions and not self.queued


def reconcile(
    world: World, cluster: KubeCluster, *, now: float, pools: PoolOwnership | None = None
) -> Pass:
    before = len(world.celery.sent)
    report = reconciler(world, cluster, pools).reconcile("local", now=now)
    return Pass(report, world.celery.sent[before:])


def teardown_of(session_id: str) -> SentTask:
    return SentTask(TEARDOWN, {"session_id": session_id}, TEARDOWN_QUEUE)


def opened(world: World, *, user: str = "alice", template: str = "ubuntu") -> Session:
    """A session as the API opens one (cold: there are no pools here)."""
    session, _ = start_session(
        user=user,
        template=template,
        region="local",
        clocks=clocks_for(TEMPLATES[template]),
        now=time.time(),
    )
    world.store.add(session)
    return session


def provisioned(world: World, cluster: KubeCluster, *, user: str = "alice") -> Session:
    """A session made the way the API and the provisioner make one, ready on the simulator."""
    session = opened(world, user=user)
    outcome = Provisioner(
        life=world.life, templates=TEMPLATES, cluster_for=lambda region: cluster
    ).provision(session.id)
    assert (outcome.state, outcome.detail) == (SessionState.PROVISIONING, "created"), outcome
    # The informer's list, told to the provisioner's observer, until the VMs are seen ready.
    informer = VmiInformer(
        cluster, EnvironmentObserver(life=world.life, templates=TEMPLATES, pools=None)
    )

    def ready() -> bool:
        informer.relist()
        return world.store.require(session.id).state is SessionState.READY

    wait_until(ready, timeout=10)
    assert informer.stats.handler_errors == 0
    assert world.celery.sent == []
    return world.store.require(session.id)


def raw_vmi(cluster: KubeCluster, name: str, labels: dict[str, str]) -> None:
    body = build_environment(
        template=TEMPLATES["ubuntu"],
        environment_id="e" + name.replace("-", "")[:20],
        namespace=NAMESPACE,
        session_id=None,
        environment_token="abcdef.0123456789abcdef",
    ).vmis[0]
    body["metadata"] = {"name": name, "labels": labels}
    cluster.create_vmi(body)


def names(cluster: KubeCluster) -> set[str]:
    return {v["metadata"]["name"] for v in cluster.list_vmis(MANAGED_BY_SELECTOR)[0]}


def network_policies(sim: SimHandle, selector: str) -> list[Any]:
    with sim.api_client() as api_client:
        listed = client.NetworkingV1Api(api_client).list_namespaced_network_policy(
            NAMESPACE, label_selector=selector
        )
    return list(listed.items)


class RecordingCluster:
    """The real cluster, recording every object labvirt asks it to create, in order."""

    def __init__(self, cluster: KubeCluster) -> None:
        self._cluster = cluster
        self.namespace = cluster.namespace
        self.created: list[dict[str, Any]] = []

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._cluster, name)
        if not name.startswith("create_"):
            return attribute

        def create(body: dict[str, Any]) -> Any:
            self.created.append(copy.deepcopy(body))
            return attribute(body)

        return create


def user_data(vmi: dict[str, Any]) -> str:
    [data] = [
        v["cloudInitNoCloud"]["userData"] for v in vmi["spec"]["volumes"] if "cloudInitNoCloud" in v
    ]
    return str(data)


# -- an environment's objects ----------------------------------------------------------------


def test_a_kubernetes_environment_comes_with_its_policy_and_goes_with_it(
    world: World, cluster: KubeCluster, sim: SimHandle
) -> None:
    session = opened(world, template="kubernetes")
    recording = RecordingCluster(cluster)
    provisioner = Provisioner(
        life=world.life, templates=TEMPLATES, cluster_for=lambda region: recording
    )
    selector = environment_selector(session.environment_id)

    assert provisioner.provision(session.id).detail == "created"

    # The policy first, so booting VMs can reach each other through the namespace's fence.
    kinds = [body["kind"] for body in recording.created]
    assert kinds == ["NetworkPolicy", "Service", "VirtualMachineInstance", "VirtualMachineInstance"]
    [policy] = network_policies(sim, selector)
    assert policy.metadata.name == f"lv-{session.environment_id}"
    members = {
        "app.kubernetes.io/managed-by": "labvirt",
        "labvirt.io/environment": session.environment_id,
    }
    assert policy.spec.pod_selector.match_labels == members
    assert policy.spec.policy_types == ["Ingress", "Egress"]
    vmis, _ = cluster.list_vmis(selector)
    for vmi in vmis:
        assert members.items() <= vmi["metadata"]["labels"].items()
        # The session's own random token, in the user data only.
        assert f"--token {session.environment_token} " in user_data(vmi)
        assert session.environment_token not in json.dumps(vmi["metadata"])

    # A provision asked again after its first run died before recording the creation (a
    # redelivered task) renders the very same objects: all exist.
    first = list(recording.created)
    world.store.update(session.id, lambda s: dataclasses.replace(s, created_environment=None))
    assert provisioner.provision(session.id).detail == "created"
    assert recording.created[len(first) :] == first
    # Once the creation is recorded, one asked again (the reaper's) calls nothing.
    assert provisioner.provision(session.id).detail == "already created"
    assert len(recording.created) == 2 * len(first)
    assert len(network_policies(sim, selector)) == 1
    assert cluster.count_services(selector) == 1

    provisioner.teardown(session.id)

    assert network_policies(sim, selector) == []
    assert cluster.count_services(selector) == 0
    wait_until(lambda: not cluster.list_vmis(selector)[0], timeout=10)


def test_a_single_vm_environment_gets_no_policy(
    world: World, cluster: KubeCluster, sim: SimHandle
) -> None:
    session = provisioned(world, cluster)

    assert network_policies(sim, environment_selector(session.environment_id)) == []


# -- orphans ---------------------------------------------------------------------------------


def test_an_orphaned_kubernetes_environment_goes_with_its_service_and_policy(
    world: World, cluster: KubeCluster, sim: SimHandle
) -> None:
    manifests = build_environment(
        template=TEMPLATES["kubernetes"],
        environment_id="orphan1",
        namespace=NAMESPACE,
        session_id=None,  # and no pool: nobody owns it
        environment_token="abcdef.0123456789abcdef",
    )
    create_environment(cluster, manifests)
    selector = environment_selector("orphan1")
    assert len(network_policies(sim, selector)) == 1

    late = reconcile(world, cluster, now=time.time() + GRACE + 5)

    assert set(late.report.orphans_deleted) == {"lv-orphan1-controlplane", "lv-orphan1-node01"}
    assert network_policies(sim, selector) == []
    assert cluster.count_services(selector) == 0
    wait_until(lambda: not cluster.list_vmis(selector)[0], timeout=10)


def test_an_unowned_vmi_is_deleted_after_the_grace_time_only(
    world: World, cluster: KubeCluster
) -> None:
    raw_vmi(cluster, "stray", {"app.kubernetes.io/managed-by": "labvirt"})
    raw_vmi(cluster, "not-ours", {"team": "someone-else"})
    now = time.time()

    early = reconcile(world, cluster, now=now + GRACE - 5)
    assert early.report.orphans_deleted == []
    late = reconcile(world, cluster, now=now + GRACE + 5)

    assert late.report.orphans_deleted == ["stray"]
    wait_until(lambda: "stray" not in names(cluster), timeout=10)
    assert cluster.get_vmi("not-ours")["metadata"]["name"] == "not-ours"
    cluster.delete_vmi("not-ours")


def test_a_live_sessions_environment_is_kept_and_a_finished_ones_removed(
    world: World, store: RedisSessionStore, cluster: KubeCluster
) -> None:
    live = provisioned(world, cluster, user="alice")
    done = provisioned(world, cluster, user="bob")
    store.update(done.id, lambda s: s.fail(Failure.cluster_error("x"), at=time.time()))
    later = time.time() + GRACE + 5

    first = reconcile(world, cluster, now=later)

    assert set(first.report.orphans_deleted) == {f"lv-{done.environment_id}-ubuntu"}
    assert first.queued == []  # a finished session's teardown is not the reconciler's
    wait_until(lambda: names(cluster) == {f"lv-{live.environment_id}-ubuntu"}, timeout=10)
    assert reconcile(world, cluster, now=later).quiet


# -- sessions whose VMs went away ------------------------------------------------------------


def test_a_ready_session_whose_vmi_was_deleted_fails_with_a_reason(
    world: World, store: RedisSessionStore, cluster: KubeCluster
) -> None:
    session = provisioned(world, cluster)
    cluster.delete_vmis(environment_selector(session.environment_id))
    wait_until(lambda: not names(cluster), timeout=10)

    first = reconcile(world, cluster, now=time.time())

    assert first.report.failed == [session.id]
    assert first.queued == [teardown_of(session.id)]
    failed = store.require(session.id)
    assert failed.state is SessionState.FAILED
    assert failed.reason == f"VM lv-{session.environment_id}-ubuntu vanished from the cluster"
    assert failed.ended_by == FailureKind.VM_VANISHED.value
    assert reconcile(world, cluster, now=time.time()).quiet


def test_a_booting_session_whose_created_vmi_was_deleted_fails_and_one_not_created_waits(
    world: World, store: RedisSessionStore, cluster: KubeCluster
) -> None:
    """Once its provision recorded the environment created, a provisioning session's VMIs must
    be there; before that (a provision lost with its worker) the reaper asks again, and the
    reconciler leaves the session be."""
    created = opened(world)
    Provisioner(life=world.life, templates=TEMPLATES, cluster_for=lambda region: cluster).provision(
        created.id
    )
    cluster.delete_vmis(environment_selector(created.environment_id))
    wait_until(lambda: not names(cluster), timeout=10)
    lost = opened(world, user="bob")

    first = reconcile(world, cluster, now=time.time() + 3600)

    assert first.report.failed == [created.id]
    assert first.queued == [teardown_of(created.id)]
    assert store.require(created.id).ended_by == FailureKind.VM_VANISHED.value
    assert store.require(lost.id).state is SessionState.PROVISIONING
    assert first.report.provisions == []
    assert reconcile(world, cluster, now=time.time() + 3600).quiet


def test_a_vmi_being_deleted_under_a_ready_session_fails_it(
    world: World, cluster: KubeCluster
) -> None:
    session = provisioned(world, cluster)
    vmi = cluster.get_vmi(f"lv-{session.environment_id}-ubuntu")
    vmi["metadata"]["deletionTimestamp"] = "2024-01-01T00:00:00Z"  # as a list may show it
    judge = reconciler(world, cluster)

    assert judge._problem(session, [vmi]) == Failure(
        FailureKind.VM_FAILED, f"VM lv-{session.environment_id}-ubuntu is being deleted"
    )


def test_a_session_whose_vm_crashed_fails(
    world: World, store: RedisSessionStore, cluster: KubeCluster, sim: SimHandle
) -> None:
    session = provisioned(world, cluster)
    name = f"lv-{session.environment_id}-ubuntu"
    sim.crash(NAMESPACE, name)
    wait_until(lambda: cluster.get_vmi(name)["status"]["phase"] == "Failed", timeout=10)

    first = reconcile(world, cluster, now=time.time())

    assert first.report.failed == [session.id]
    assert first.queued == [teardown_of(session.id)]
    failed = store.require(session.id)
    assert failed.reason == f"VM {name} reached phase Failed"
    assert failed.ended_by == FailureKind.VM_FAILED.value


# -- readiness the informer did not see ------------------------------------------------------


def test_a_provisioning_session_whose_vms_are_all_ready_is_made_ready(
    world: World, store: RedisSessionStore, cluster: KubeCluster
) -> None:
    """No informer followed this environment: the reconciler sees its VMs ready instead."""
    session = opened(world)
    Provisioner(life=world.life, templates=TEMPLATES, cluster_for=lambda _: cluster).provision(
        session.id
    )
    selector = environment_selector(session.environment_id)
    wait_until(
        lambda: (vmis := cluster.list_vmis(selector)[0]) and all(is_ready(v) for v in vmis),
        timeout=10,
    )

    first = reconcile(world, cluster, now=time.time())

    assert first.report.made_ready == [session.id]
    assert first.report.failed == []
    assert first.queued == []
    ready = store.require(session.id)
    assert ready.state is SessionState.READY
    assert [(vm.name, vm.ready) for vm in ready.vms] == [("ubuntu", True)]
    assert reconcile(world, cluster, now=time.time()).quiet


# -- Redis lost its data ---------------------------------------------------------------------


def test_after_a_flush_two_passes_restore_every_live_session(
    world: World, store: RedisSessionStore, cluster: KubeCluster
) -> None:
    sessions = [provisioned(world, cluster, user=f"user{i}") for i in range(3)]
    store._redis.flushdb()
    now = time.time()

    first = reconcile(world, cluster, now=now)
    second = reconcile(world, cluster, now=now + GRACE * 10)

    assert sorted(first.report.restored) == sorted(s.id for s in sessions)
    assert first.report.orphans_deleted == []
    assert first.queued == []
    assert second.quiet
    for original in sessions:
        restored = store.require(original.id)
        assert restored.state is SessionState.READY
        assert restored.token_hash == original.token_hash
        assert restored.expires_at == pytest.approx(original.expires_at, abs=1)
        assert store.deadline("lifetime", original.id) == restored.expires_at
        assert {s.id for s in store.user_sessions(original.user)} == {original.id}
    assert names(cluster) == {f"lv-{s.environment_id}-ubuntu" for s in sessions}


def test_a_session_lost_while_booting_is_restored_and_provisioned_again(
    world: World, store: RedisSessionStore, cluster: KubeCluster
) -> None:
    session, _ = start_session(
        user="alice",
        template="ubuntu",
        region="local",
        clocks=clocks_for(TEMPLATES["ubuntu"]),
        now=time.time(),
    )
    manifests = build_environment(
        template=TEMPLATES["ubuntu"],
        environment_id=session.environment_id,
        namespace=NAMESPACE,
        session_id=session.id,
        environment_token="abcdef.0123456789abcdef",
        extra_annotations=session_annotations(session),
    )
    cluster.create_vmi(manifests.vmis[0])  # created, then Redis lost everything at once

    first = reconcile(world, cluster, now=time.time())

    assert first.report.restored == [session.id]
    assert first.report.provisions == [session.id]
    assert store.require(session.id).state is SessionState.PROVISIONING


def test_an_extension_reaches_the_cluster_so_a_rebuild_keeps_it(
    world: World, store: RedisSessionStore, cluster: KubeCluster
) -> None:
    session = provisioned(world, cluster)
    extended = store.update(session.id, lambda s: extend(s, now=time.time()))

    first = reconcile(world, cluster, now=time.time())

    assert first.report.annotated == [f"lv-{session.environment_id}-ubuntu"]
    vmi = cluster.get_vmi(f"lv-{session.environment_id}-ubuntu")
    assert (
        vmi["metadata"]["annotations"][EXPIRES_AT_ANNOTATION]
        == session_annotations(extended)[EXPIRES_AT_ANNOTATION]
    )
    assert reconcile(world, cluster, now=time.time()).quiet


# -- pools -----------------------------------------------------------------------------------


def pool_vmi(cluster: KubeCluster, environment_id: str) -> None:
    manifests = build_environment(
        template=TEMPLATES["ubuntu"],
        environment_id=environment_id,
        namespace=NAMESPACE,
        session_id=None,
        environment_token="abcdef.0123456789abcdef",
        extra_labels={POOL_LABEL: "ubuntu"},
    )
    cluster.create_vmi(manifests.vmis[0])


def test_pool_environments_are_judged_by_the_pool_store(world: World, cluster: KubeCluster) -> None:
    for environment_id in ("owned1", "taken1", "stray1"):
        pool_vmi(cluster, environment_id)
    pools = FakePools(owned={"owned1"})
    later = time.time() + GRACE + 5

    refused = reconcile(world, cluster, now=later, pools=pools).report
    assert sorted(refused.orphans_deleted) == ["lv-stray1-ubuntu", "lv-taken1-ubuntu"]
    assert {o["environment_id"] for o in pools.offered} == {"taken1", "stray1"}
    assert pools.offered[0]["template"] == "ubuntu"

    wait_until(lambda: names(cluster) == {"lv-owned1-ubuntu"}, timeout=10)
    pool_vmi(cluster, "back1")
    pools.accept = True
    accepted = reconcile(world, cluster, now=later, pools=pools).report
    assert accepted.pool_restored == ["back1"]
    assert accepted.orphans_deleted == []
    assert reconcile(world, cluster, now=later, pools=pools).quiet


def test_without_a_pool_store_pool_environments_are_left_alone(
    world: World, cluster: KubeCluster
) -> None:
    pool_vmi(cluster, "lonely1")

    first = reconcile(world, cluster, now=time.time() + 10 * GRACE, pools=None)

    assert first.report.orphans_deleted == []


# -- level-triggered -------------------------------------------------------------------------


def test_two_passes_equal_one(world: World, store: RedisSessionStore, cluster: KubeCluster) -> None:
    keep = provisioned(world, cluster, user="alice")
    vanish = provisioned(world, cluster, user="bob")
    cluster.delete_vmis(environment_selector(vanish.environment_id))
    raw_vmi(cluster, "stray2", {"app.kubernetes.io/managed-by": "labvirt"})
    wait_until(lambda: f"lv-{vanish.environment_id}-ubuntu" not in names(cluster), timeout=10)
    later = time.time() + GRACE + 5

    first = reconcile(world, cluster, now=later)
    second = reconcile(world, cluster, now=later)

    assert first.report.failed == [vanish.id]
    assert first.report.orphans_deleted == ["stray2"]
    assert first.queued == [teardown_of(vanish.id)]
    assert second.quiet  # what the first deleted is still finalizing: left alone
    assert store.require(keep.id).state is SessionState.READY


def test_after_a_flush_pools_are_restored_into_the_real_pool_store(
    world: World, cluster: KubeCluster
) -> None:
    """With the pools side's own store (what ``labvirt.reconcile`` passes): ready warm
    environments go back into their pool; nothing is left that no one owns."""
    pools = RedisPoolStore(fakeredis.FakeRedis())
    for environment_id in ("warm1", "warm2"):
        pool_vmi(cluster, environment_id)
    wait_until(
        lambda: all(is_ready(v) for v in cluster.list_vmis(MANAGED_BY_SELECTOR)[0]), timeout=10
    )
    later = time.time() + GRACE + 5

    first = reconcile(world, cluster, now=later, pools=pools)
    second = reconcile(world, cluster, now=later, pools=pools)

    assert sorted(first.report.pool_restored) == ["warm1", "warm2"]
    assert first.report.orphans_deleted == []
    assert second.quiet
    assert pools.owned_environment_ids("local") == {"warm1", "warm2"}
