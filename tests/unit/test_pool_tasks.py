"""Pooled environments on a cluster: booting, binding to a session, removing. The simulator
runs in a thread and answers over real HTTP; pools in the real Redis, sessions in fakeredis."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fakeredis
import pytest
import redis

from labvirt.sim.testing import SimHandle, running_simulator_in_thread, wait_until
from services.provisioner.pool_tasks import PoolEnvironments
from shared.adapters.kube import KubeCluster
from shared.adapters.pool_store import RedisPoolStore
from shared.adapters.session_store import RedisSessionStore
from shared.adapters.template_files import load_templates
from shared.config import Cluster
from shared.domain.lifecycle import clocks_for, start_session
from shared.domain.manifests import (
    MANAGED_BY_SELECTOR,
    POOL_LABEL,
    SESSION_LABEL,
    environment_selector,
)
from shared.domain.pools import EnvironmentState, PoolKey, new_warm_environment
from shared.domain.recovery import USER_ANNOTATION
from shared.domain.sessions import EnvironmentId, Session, SessionState

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
    wait_until(lambda: not cluster.list_vmis(MANAGED_BY_SELECTOR)[0], timeout=10)


@pytest.fixture
def pools(redis_url: str) -> Iterator[RedisPoolStore]:
    client = redis.Redis.from_url(redis_url)
    prefix = f"test-pool-tasks-{uuid.uuid4().hex[:8]}"
    try:
        yield RedisPoolStore(client, prefix=prefix)
    finally:
        keys = list(client.scan_iter(f"{prefix}:*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()


@pytest.fixture
def sessions() -> RedisSessionStore:
    return RedisSessionStore(fakeredis.FakeRedis())


def environments(
    pools: RedisPoolStore,
    sessions: RedisSessionStore,
    cluster: KubeCluster,
    *,
    patience: float = 30.0,
) -> PoolEnvironments:
    return PoolEnvironments(
        pools=pools,
        sessions=sessions,
        templates=TEMPLATES,
        cluster_for=lambda _: cluster,
        teardown_timeout=10,
        unschedulable_patience=patience,
    )


def reserved(pools: RedisPoolStore, key: PoolKey) -> str:
    # The wall clock: the boot waits on it from the record's creation time.
    [env] = pools.reserve(
        key, [new_warm_environment(key=key, now=time.time())], ceiling=1, max_in_flight=1
    )
    return env.id


def test_a_pooled_environment_boots_with_its_records_token(
    pools: RedisPoolStore, sessions: RedisSessionStore, cluster: KubeCluster
) -> None:
    env_id = reserved(pools, KUBERNETES)
    outcome = environments(pools, sessions, cluster).boot(env_id)
    assert outcome.detail == "ready"
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
    snapshot = pools.snapshot(KUBERNETES)
    assert snapshot.refill_seconds is not None
    # Booting it again (a redelivered task) changes nothing.
    assert environments(pools, sessions, cluster).boot(env_id).detail == "nothing to do: ready"


def test_a_retired_environment_is_not_booted(
    pools: RedisPoolStore, sessions: RedisSessionStore, cluster: KubeCluster
) -> None:
    env_id = reserved(pools, UBUNTU)
    assert pools.retire(UBUNTU, env_id)
    assert environments(pools, sessions, cluster).boot(env_id).detail == "nothing to do: retired"
    assert cluster.list_vmis(environment_selector(env_id))[0] == []


def test_an_environment_that_never_fits_fails_and_backs_the_pool_off(
    pools: RedisPoolStore, sessions: RedisSessionStore, tmp_path: Path
) -> None:
    with running_simulator_in_thread(
        tmp_path, boot_seconds=0.2, time_scale=0.05, nodes=1, node_memory="1Gi"
    ) as tiny:
        small = KubeCluster(Cluster("local", tiny.kubeconfig_path, None, NAMESPACE))
        try:
            env_id = reserved(pools, UBUNTU)
            outcome = environments(pools, sessions, small, patience=0.5).boot(env_id)
        finally:
            small.close()
    assert outcome.detail == "failed: no node has room for its VMs (Unschedulable)"
    assert outcome.retire is True
    assert pools.snapshot(UBUNTU).health.failures == 1
    env = pools.environment(env_id)
    assert env is not None
    assert env.state is EnvironmentState.RETIRED


def warm_session(
    pools: RedisPoolStore, sessions: RedisSessionStore, cluster: KubeCluster, key: PoolKey
) -> Session:
    """A session that claimed a booted environment of ``key``'s pool, as the API makes one."""
    env_id = reserved(pools, key)
    assert environments(pools, sessions, cluster).boot(env_id).detail == "ready"
    opened, _ = start_session(
        user="alice",
        template=key.template,
        region=key.region,
        clocks=clocks_for(TEMPLATES[key.template]),
        now=1_700_000_000.0,
    )
    claimed = pools.claim(key, session_id=opened.id, at=opened.created_at)
    assert claimed is not None
    session = opened.warm_start(
        environment_id=EnvironmentId(claimed.id), vms=claimed.vms, at=opened.created_at
    )
    sessions.add(session)
    return session


def test_binding_labels_every_vmi_with_its_session(
    pools: RedisPoolStore, sessions: RedisSessionStore, cluster: KubeCluster
) -> None:
    session = warm_session(pools, sessions, cluster, KUBERNETES)
    assert pools.unbound_claims(KUBERNETES, before=2e9) != []
    outcome = environments(pools, sessions, cluster).bind(session.id)
    assert outcome.detail == "bound"
    vmis, _ = cluster.list_vmis(environment_selector(session.environment_id))
    assert len(vmis) == 2
    for vmi in vmis:
        labels = vmi["metadata"]["labels"]
        assert labels[SESSION_LABEL] == session.id
        assert POOL_LABEL not in labels
        assert vmi["metadata"]["annotations"][USER_ANNOTATION] == "alice"
    assert pools.unbound_claims(KUBERNETES, before=2e9) == []
    assert environments(pools, sessions, cluster).bind(session.id).detail == "bound"


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


def test_binding_reads_again_after_a_conflict(
    pools: RedisPoolStore, sessions: RedisSessionStore, cluster: KubeCluster
) -> None:
    session = warm_session(pools, sessions, cluster, UBUNTU)
    changing = ChangingCluster(cluster)
    bind = PoolEnvironments(
        pools=pools,
        sessions=sessions,
        templates=TEMPLATES,
        cluster_for=lambda _: changing,  # type: ignore[arg-type,return-value]
    )
    assert bind.bind(session.id).detail == "bound"
    assert changing.patches == 2  # the first met a 409 (stale resourceVersion)
    [vmi] = cluster.list_vmis(environment_selector(session.environment_id))[0]
    assert vmi["metadata"]["labels"][SESSION_LABEL] == session.id
    assert vmi["metadata"]["labels"]["touched"] == "yes"


def test_a_claimed_environment_that_vanished_fails_its_session(
    pools: RedisPoolStore, sessions: RedisSessionStore, cluster: KubeCluster
) -> None:
    session = warm_session(pools, sessions, cluster, UBUNTU)
    selector = environment_selector(session.environment_id)
    cluster.delete_vmis(selector)
    wait_until(lambda: not cluster.list_vmis(selector)[0], timeout=10)
    outcome = environments(pools, sessions, cluster).bind(session.id)
    assert outcome.teardown_session == session.id
    failed = sessions.require(session.id)
    assert failed.state is SessionState.FAILED
    assert failed.reason is not None
    assert "lost its VMs" in failed.reason


def test_removing_a_retired_environment_deletes_its_objects(
    pools: RedisPoolStore, sessions: RedisSessionStore, cluster: KubeCluster
) -> None:
    env_id = reserved(pools, KUBERNETES)
    warm = environments(pools, sessions, cluster)
    assert warm.boot(env_id).detail == "ready"
    assert pools.retire(KUBERNETES, env_id)
    assert warm.remove(env_id, "local").detail == "removed"
    assert cluster.list_vmis(environment_selector(env_id))[0] == []
    assert cluster.count_services(environment_selector(env_id)) == 0
