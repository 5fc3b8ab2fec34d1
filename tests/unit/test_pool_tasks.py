"""Pooled environments on a cluster: booting, binding to a session, removing. The simulator
runs in a thread and answers over real HTTP; pools in the real Redis, sessions in fakeredis.

``boot`` only creates an environment's objects: the region's informer, reporting to the
provisioner's observer, sees the VMs come up and marks the environment ready (or flags it
while its VMs wait for room). Tests run that informer for as long as they need it
(``observing``). Tasks the services queue are recorded, not run.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fakeredis
import pytest
from kubernetes import client

from labvirt.sim.testing import SimHandle, running_simulator_in_thread, wait_until
from services.provisioner.observer import EnvironmentObserver
from services.provisioner.pool_environments import UNSCHEDULABLE_REASON, PoolEnvironments
from shared.adapters.informer import VmiInformer
from shared.adapters.kube import KubeCluster
from shared.adapters.pool_store import RedisPoolStore
from shared.adapters.retrying import Backoff
from shared.adapters.session_events import SessionEvents
from shared.adapters.session_store import RedisSessionStore
from shared.adapters.template_files import load_templates
from shared.config import Cluster
from shared.domain.lifecycle import clocks_for
from shared.domain.manifests import (
    MANAGED_BY_SELECTOR,
    POOL_LABEL,
    SESSION_LABEL,
    environment_selector,
)
from shared.domain.pools.config import PoolKey
from shared.domain.pools.environments import EnvironmentState, new_warm_environment
from shared.domain.reasons import FailureKind
from shared.domain.recovery import USER_ANNOTATION
from shared.domain.sessions import Session, SessionState
from shared.jobs import (
    BIND_ENVIRONMENT,
    CHECK_ENVIRONMENT,
    PREWARM_QUEUE,
    RETIRE_ENVIRONMENT,
    TEARDOWN,
    TaskQueue,
)
from shared.session_life import SessionLife
from tests.doubles import RecordingCelery, SentTask

NAMESPACE = "default"
TEMPLATES = load_templates(None)
UBUNTU = PoolKey("local", "ubuntu")
KUBERNETES = PoolKey("local", "kubernetes")


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimHandle]:
    with running_simulator_in_thread(
        tmp_path_factory.mktemp("pool-sim"), boot_seconds=0.2, time_scale=0.05, seed=5
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
    """What a worker holds: the pool store, the sessions' life and the (recorded) task queue."""

    pools: RedisPoolStore
    sessions: RedisSessionStore
    celery: RecordingCelery
    life: SessionLife

    def environments(self, cluster: Any, *, patience: float = 30.0) -> PoolEnvironments:
        return PoolEnvironments(
            pools=self.pools,
            life=self.life,
            queue=TaskQueue(self.celery),  # type: ignore[arg-type]
            templates=TEMPLATES,
            cluster_for=lambda _: cluster,
            unschedulable_patience=patience,
        )


@pytest.fixture
def world(pool_store: RedisPoolStore) -> World:
    client = fakeredis.FakeRedis()
    sessions = RedisSessionStore(client)
    celery = RecordingCelery()
    life = SessionLife(
        store=sessions,
        events=SessionEvents(client),
        queue=TaskQueue(celery),  # type: ignore[arg-type]
        pools=pool_store,
    )
    return World(pool_store, sessions, celery, life)


@contextmanager
def observing(
    cluster: KubeCluster, world: World, environments: PoolEnvironments
) -> Iterator[VmiInformer]:
    """The region's informer reporting to the provisioner's observer, while the block runs."""
    observer = EnvironmentObserver(life=world.life, templates=TEMPLATES, pools=environments)
    informer = VmiInformer(cluster, observer, watch_seconds=1, backoff=Backoff(base=0.01, cap=0.05))
    informer.start()
    try:
        assert informer.synced.wait(10)
        yield informer
    finally:
        informer.stop()
    assert informer.stats.handler_errors == 0


def reserved(pools: RedisPoolStore, key: PoolKey) -> str:
    # The wall clock: the pool learns its refill time from the record's creation time.
    [env] = pools.reserve(
        key, [new_warm_environment(key=key, now=time.time())], ceiling=1, max_in_flight=1
    )
    return env.id


def network_policies(sim: SimHandle, selector: str) -> list[str]:
    with sim.api_client() as api_client:
        listed = client.NetworkingV1Api(api_client).list_namespaced_network_policy(
            NAMESPACE, label_selector=selector
        )
    return [policy.metadata.name for policy in listed.items]


def state_of(pools: RedisPoolStore, env_id: str) -> EnvironmentState | None:
    env = pools.environment(env_id)
    return None if env is None else env.state


def booted(world: World, cluster: KubeCluster, key: PoolKey) -> str:
    """A reserved environment of ``key``'s pool, booted and seen ready by the informer."""
    env_id = reserved(world.pools, key)
    environments = world.environments(cluster)
    with observing(cluster, world, environments):
        assert environments.boot(env_id).detail == "created"
        wait_until(lambda: state_of(world.pools, env_id) is EnvironmentState.READY, timeout=20)
    return env_id


def test_a_pooled_environment_boots_with_its_records_token(
    world: World, cluster: KubeCluster, sim: SimHandle
) -> None:
    pools = world.pools
    env_id = booted(world, cluster, KUBERNETES)
    env = pools.environment(env_id)
    assert env is not None
    assert env.state is EnvironmentState.READY
    assert {vm.hostname for vm in env.vms} == {"controlplane", "node01"}
    assert all(vm.ready and vm.ip for vm in env.vms)
    vmis, _ = cluster.list_vmis(environment_selector(env_id))
    assert len(vmis) == 2
    for vmi in vmis:
        labels = vmi["metadata"]["labels"]
        assert labels[POOL_LABEL] == "kubernetes"
        assert SESSION_LABEL not in labels
        user_data = next(
            v["cloudInitNoCloud"]["userData"]
            for v in vmi["spec"]["volumes"]
            if "cloudInitNoCloud" in v
        )
        assert f"--token {env.token}" in user_data
    assert cluster.count_services(environment_selector(env_id)) == 1
    # Its VMs reach each other through the environment's policy; a claim keeps it valid.
    assert network_policies(sim, environment_selector(env_id)) == [f"lv-{env_id}"]
    snapshot = pools.snapshot(KUBERNETES)
    assert snapshot.refill_seconds is not None
    assert snapshot.health.failures == 0
    # Booting it again (a redelivered task) changes nothing.
    assert world.environments(cluster).boot(env_id).detail == "nothing to do: ready"
    assert world.celery.sent == []  # no check, no retirement


def test_a_retired_environment_is_not_booted(world: World, cluster: KubeCluster) -> None:
    env_id = reserved(world.pools, UBUNTU)
    assert world.pools.retire(UBUNTU, env_id)
    assert world.environments(cluster).boot(env_id).detail == "nothing to do: retired"
    assert cluster.list_vmis(environment_selector(env_id))[0] == []


def test_an_environment_that_never_fits_fails_and_backs_the_pool_off(
    world: World, tmp_path: Path
) -> None:
    pools = world.pools
    with running_simulator_in_thread(
        tmp_path, boot_seconds=0.2, time_scale=0.05, nodes=1, node_memory="1Gi"
    ) as tiny:
        small = KubeCluster(Cluster("local", tiny.kubeconfig_path, None, NAMESPACE))
        try:
            environments = world.environments(small, patience=0.5)
            env_id = reserved(pools, UBUNTU)
            with observing(small, world, environments):
                assert environments.boot(env_id).detail == "created"
                # Its VMs wait for room: the environment is flagged (the prewarmer creates
                # nothing more in the region) and a check is queued for when patience runs out.
                [check] = wait_until(lambda: world.celery.named(CHECK_ENVIRONMENT), timeout=20)
                assert check == SentTask(
                    CHECK_ENVIRONMENT, {"environment_id": env_id}, PREWARM_QUEUE, countdown=0.5
                )
                [booting] = pools.snapshot(UBUNTU).booting
                assert (booting.env_id, booting.unschedulable) == (env_id, True)
                # The queued check runs once the patience is over: the VMs still wait.
                work = environments.check(env_id)
        finally:
            small.close()
    assert work.detail == f"failed: {UNSCHEDULABLE_REASON}"
    assert work.detail == "failed: no node has room for its VMs (Unschedulable)"
    assert world.celery.named(RETIRE_ENVIRONMENT) == [
        SentTask(RETIRE_ENVIRONMENT, {"environment_id": env_id, "region": "local"}, PREWARM_QUEUE)
    ]
    assert pools.snapshot(UBUNTU).health.failures == 1
    assert state_of(pools, env_id) is EnvironmentState.RETIRED
    # A check that comes again (a redelivered task) does nothing more.
    assert environments.check(env_id).detail == "nothing to do"
    assert len(world.celery.named(RETIRE_ENVIRONMENT)) == 1


def warm_session(world: World, cluster: KubeCluster, key: PoolKey) -> Session:
    """A session that claimed a booted environment of ``key``'s pool, opened as the API does."""
    env_id = booted(world, cluster, key)
    opened = world.life.open(
        user="alice",
        template=key.template,
        region=key.region,
        clocks=clocks_for(TEMPLATES[key.template]),
        replace=False,
    )
    session = opened.session
    assert (session.warm, session.environment_id, session.state) == (
        True,
        env_id,
        SessionState.READY,
    )
    assert world.celery.payloads(BIND_ENVIRONMENT) == [{"session_id": session.id}]
    return session


def test_binding_labels_every_vmi_with_its_session(world: World, cluster: KubeCluster) -> None:
    pools = world.pools
    session = warm_session(world, cluster, KUBERNETES)
    assert pools.unbound_claims(KUBERNETES, before=2e9) != []
    work = world.environments(cluster).bind(session.id)
    assert work.detail == "bound"
    vmis, _ = cluster.list_vmis(environment_selector(session.environment_id))
    assert len(vmis) == 2
    for vmi in vmis:
        labels = vmi["metadata"]["labels"]
        assert labels[SESSION_LABEL] == session.id
        assert POOL_LABEL not in labels
        assert vmi["metadata"]["annotations"][USER_ANNOTATION] == "alice"
    assert pools.unbound_claims(KUBERNETES, before=2e9) == []
    assert world.environments(cluster).bind(session.id).detail == "bound"
    assert world.sessions.require(session.id).state is SessionState.READY


class ChangingCluster:
    """The real cluster, but someone else edits the VMI just before our first patch lands."""

    def __init__(self, cluster: KubeCluster) -> None:
        self._cluster = cluster
        self.patches = 0
        self.namespace = cluster.namespace

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cluster, name)

    def patch_vmi(self, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        self.patches += 1
        if self.patches == 1:
            self._cluster.patch_vmi(name, {"metadata": {"labels": {"touched": "yes"}}})
        return self._cluster.patch_vmi(name, patch)


def test_binding_reads_again_after_a_conflict(world: World, cluster: KubeCluster) -> None:
    session = warm_session(world, cluster, UBUNTU)
    changing = ChangingCluster(cluster)
    bind = world.environments(changing)
    assert bind.bind(session.id).detail == "bound"
    assert changing.patches == 2  # the first met a 409 (stale resourceVersion)
    [vmi] = cluster.list_vmis(environment_selector(session.environment_id))[0]
    assert vmi["metadata"]["labels"][SESSION_LABEL] == session.id
    assert vmi["metadata"]["labels"]["touched"] == "yes"


def test_a_claimed_environment_that_vanished_fails_its_session(
    world: World, cluster: KubeCluster
) -> None:
    session = warm_session(world, cluster, UBUNTU)
    selector = environment_selector(session.environment_id)
    cluster.delete_vmis(selector)
    wait_until(lambda: not cluster.list_vmis(selector)[0], timeout=10)
    work = world.environments(cluster).bind(session.id)
    assert work.detail.startswith("failed: warm environment lost its VMs")
    # Its teardown is queued, once, by the failing of the session.
    assert world.celery.payloads(TEARDOWN) == [{"session_id": session.id}]
    failed = world.sessions.require(session.id)
    assert failed.state is SessionState.FAILED
    assert failed.reason is not None
    assert "lost its VMs" in failed.reason
    assert failed.ended_by == FailureKind.WARM_ENVIRONMENT_LOST.value
    assert world.pools.unbound_claims(UBUNTU, before=2e9) == []


def test_removing_a_retired_environment_deletes_its_objects(
    world: World, cluster: KubeCluster, sim: SimHandle
) -> None:
    env_id = booted(world, cluster, KUBERNETES)
    warm = world.environments(cluster)
    selector = environment_selector(env_id)
    assert world.pools.retire(KUBERNETES, env_id)
    # Deleted at once; VMIs may linger while their finalizer runs, and the task says so.
    first = warm.remove(env_id, "local")
    assert re.fullmatch(r"removed|deleting [12] VMI\(s\)", first.detail), first.detail
    assert cluster.count_services(selector) == 0
    assert network_policies(sim, selector) == []
    wait_until(lambda: not cluster.list_vmis(selector)[0], timeout=10)
    assert warm.remove(env_id, "local").detail == "removed"
