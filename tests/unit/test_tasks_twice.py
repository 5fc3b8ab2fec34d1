"""Every labvirt task is safe to repeat: each runs twice at the same moment (a redelivery
racing the original) against the simulator over HTTP and the suite's real Redis, and the
outcome is what one run gives. That is what makes ``acks_late`` and reject-on-worker-lost safe."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from labvirt.sim.testing import SimHandle, running_simulator_in_thread, wait_until
from services.prewarmer.prewarmer import Prewarmer, PrewarmSettings
from services.provisioner.environments import Provisioner
from services.provisioner.pool_environments import PoolEnvironments
from services.reaper.reconciler import Reconciler
from shared.adapters.kube import KubeCluster
from shared.adapters.pool_store import RedisPoolStore
from shared.adapters.session_events import SessionEvents
from shared.adapters.session_store import RedisSessionStore
from shared.adapters.template_files import load_templates
from shared.config import Cluster
from shared.domain.lifecycle import clocks_for
from shared.domain.manifests import MANAGED_BY_SELECTOR, environment_selector
from shared.domain.pools.config import PoolConfig, PoolKey
from shared.domain.reasons import CloseReason
from shared.domain.sessions import SessionState
from shared.jobs import PROVISION, TEARDOWN, TaskQueue
from shared.session_life import SessionLife
from tests.doubles import RecordingCelery

TEMPLATES = load_templates(None)
UBUNTU = PoolKey("local", "ubuntu")


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimHandle]:
    with running_simulator_in_thread(
        tmp_path_factory.mktemp("twice-sim"), boot_seconds=0.2, time_scale=0.05, seed=21
    ) as handle:
        yield handle


@pytest.fixture
def cluster(sim: SimHandle) -> Iterator[KubeCluster]:
    kube = KubeCluster(Cluster("local", sim.kubeconfig_path, None, "default"))
    yield kube
    kube.delete_vmis(MANAGED_BY_SELECTOR)
    kube.delete_services(MANAGED_BY_SELECTOR)
    kube.delete_network_policies(MANAGED_BY_SELECTOR)
    wait_until(lambda: not kube.list_vmis(MANAGED_BY_SELECTOR)[0], timeout=10)
    kube.close()


class World:
    def __init__(self, client: redis.Redis, cluster: KubeCluster) -> None:
        self.celery = RecordingCelery()
        self.store = RedisSessionStore(client)
        self.pools = RedisPoolStore(client)
        queue = TaskQueue(self.celery)  # type: ignore[arg-type]
        self.life = SessionLife(
            store=self.store, events=SessionEvents(client), queue=queue, pools=self.pools
        )
        self.cluster = cluster
        self.provisioner = Provisioner(
            life=self.life, templates=TEMPLATES, cluster_for=lambda _r: cluster
        )
        self.pool_environments = PoolEnvironments(
            pools=self.pools,
            life=self.life,
            queue=queue,
            templates=TEMPLATES,
            cluster_for=lambda _r: cluster,
        )
        self.queue = queue

    def sent(self, name: str) -> list[dict[str, Any]]:
        return [t.payload for t in self.celery.sent if t.name == name]


@pytest.fixture
def world(redis_url: str, cluster: KubeCluster) -> Iterator[World]:
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    yield World(client, cluster)
    client.flushdb()
    client.close()


def twice(run: Callable[[], Any]) -> list[Any]:
    """``run`` on two threads released at the same moment; both results (or errors)."""
    start = threading.Barrier(2)
    results: list[Any] = [None, None]

    def go(i: int) -> None:
        start.wait()
        try:
            results[i] = run()
        except Exception as exc:  # the test asserts on it
            results[i] = exc

    threads = [threading.Thread(target=go, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not any(isinstance(r, Exception) for r in results), results
    return results


def open_session(world: World, template: str = "kubernetes") -> str:
    opened = world.life.open(
        user=f"twice-{template}",
        template=template,
        region="local",
        clocks=clocks_for(TEMPLATES[template]),
        replace=True,
    )
    return opened.session.id


def test_provision_twice_makes_one_environment(world: World) -> None:
    session_id = open_session(world)
    twice(lambda: world.provisioner.provision(session_id))
    session = world.store.require(session_id)
    selector = environment_selector(session.environment_id)
    vmis, _ = world.cluster.list_vmis(selector)
    assert sorted(v["metadata"]["name"] for v in vmis) == sorted(
        f"lv-{session.environment_id}-{vm}" for vm in ("controlplane", "node01")
    )
    assert world.cluster.count_services(selector) == 1
    assert session.state is SessionState.PROVISIONING


def test_teardown_twice_ends_the_session_once(world: World) -> None:
    session_id = open_session(world, "ubuntu")
    world.provisioner.provision(session_id)
    world.life.close(session_id, CloseReason.DELETED)
    twice(lambda: world.provisioner.teardown(session_id))
    wait_until(
        lambda: (
            not world.cluster.list_vmis(
                environment_selector(world.store.require(session_id).environment_id)
            )[0]
        ),
        timeout=10,
    )
    world.provisioner.teardown(session_id)  # the one that finds nothing left ends it
    ended = world.store.require(session_id)
    assert ended.state is SessionState.ENDED
    assert [h.state for h in ended.history].count(SessionState.TERMINATING) == 1
    assert [h.state for h in ended.history].count(SessionState.ENDED) == 1
    assert world.sent(TEARDOWN) == [{"session_id": session_id}]  # only the close queued one


def test_a_pool_boot_twice_creates_one_environment(world: World) -> None:
    world.pools.set_config(UBUNTU, PoolConfig(size=1))
    prewarmer = Prewarmer(
        store=world.pools,
        templates=TEMPLATES,
        regions=("local",),
        settings=PrewarmSettings(tick_seconds=5, batch=5, max_in_flight=5, max_warm_age=3600),
        enqueue=world.queue.enqueue,
    )
    twice(prewarmer.tick)  # two beats at once reserve one environment, not two
    [payload] = world.sent("labvirt.prewarm_environment")
    env_id = payload["environment_id"]
    twice(lambda: world.pool_environments.boot(env_id))
    vmis, _ = world.cluster.list_vmis(environment_selector(env_id))
    assert len(vmis) == 1


def test_reconcile_twice_restores_and_fails_once(world: World, redis_url: str) -> None:
    session_id = open_session(world, "ubuntu")
    world.provisioner.provision(session_id)
    session = world.store.require(session_id)
    [vmi] = world.cluster.list_vmis(environment_selector(session.environment_id))[0]
    world.cluster.delete_vmi(vmi["metadata"]["name"])  # someone deleted the learner's VM
    wait_until(
        lambda: (
            world.cluster.list_vmis(environment_selector(session.environment_id))[0] == []
            or all(
                v["metadata"].get("deletionTimestamp")
                for v in world.cluster.list_vmis(environment_selector(session.environment_id))[0]
            )
        ),
        timeout=10,
    )
    world.store.update(session_id, lambda s: s.mark_ready(vms=(), at=s.created_at + 1))
    reconciler = Reconciler(
        life=world.life, templates=TEMPLATES, cluster_for=lambda _r: world.cluster
    )
    reports = twice(lambda: reconciler.reconcile("local", now=session.created_at + 5))
    failed = world.store.require(session_id)
    assert failed.state is SessionState.FAILED
    assert sum(len(r.failed) for r in reports) == 1
    assert world.sent(TEARDOWN) == [{"session_id": session_id}]


def test_reap_twice_closes_once(world: World) -> None:
    session_id = open_session(world, "ubuntu")
    session = world.store.require(session_id)
    life = SessionLife(
        store=world.store,
        events=SessionEvents(world.store._redis),
        queue=world.queue,
        clock=lambda: session.expires_at + 1,
    )
    results = twice(lambda: life.reap(batch=100))
    assert sorted(len(r.teardowns) for r in results) == [0, 1]
    assert world.sent(TEARDOWN) == [{"session_id": session_id}]
    assert world.sent(PROVISION) == [{"session_id": session_id}]  # from the open, once
