"""The region informer against the simulator over real HTTP: it lists, then watches; tells the
handler of every change by environment; resumes a dropped watch without listing again; lists
again after a 410; and backs off from a cluster that fails."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest

from labvirt.sim.testing import SimHandle, running_simulator_in_thread, wait_until
from shared.adapters.informer import EnvironmentChange, VmiInformer
from shared.adapters.kube import KubeCluster
from shared.adapters.retrying import Backoff
from shared.config import Cluster
from shared.domain.manifests import ENVIRONMENT_LABEL, MANAGED_BY_SELECTOR
from shared.domain.vmi import vmi_name

NAMESPACE = "default"


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimHandle]:
    with running_simulator_in_thread(
        tmp_path_factory.mktemp("informer-sim"), boot_seconds=0.2, seed=11
    ) as handle:
        yield handle


@pytest.fixture
def cluster(sim: SimHandle) -> Iterator[KubeCluster]:
    kube = KubeCluster(Cluster("local", sim.kubeconfig_path, None, NAMESPACE))
    yield kube
    sim.set_faults(error_rate=0, watch_drop_rate=0)
    kube.delete_vmis(MANAGED_BY_SELECTOR)
    wait_until(lambda: not kube.list_vmis(MANAGED_BY_SELECTOR)[0], timeout=10)
    kube.close()


class Recorder:
    """The handler: every change it was told of, in order."""

    def __init__(self) -> None:
        self.changes: list[EnvironmentChange] = []
        self._lock = threading.Lock()

    def __call__(self, change: EnvironmentChange) -> None:
        with self._lock:
            self.changes.append(change)

    def latest(self, environment_id: str) -> EnvironmentChange | None:
        with self._lock:
            found = [c for c in self.changes if c.environment_id == environment_id]
        return found[-1] if found else None

    def vmis_of(self, environment_id: str) -> set[str] | None:
        latest = self.latest(environment_id)
        return None if latest is None else {vmi_name(v) for v in latest.vmis}


def vmi(name: str, environment_id: str) -> dict[str, Any]:
    return {
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachineInstance",
        "metadata": {
            "name": name,
            "labels": {
                "app.kubernetes.io/managed-by": "labvirt",
                ENVIRONMENT_LABEL: environment_id,
            },
        },
        "spec": {
            "domain": {
                "devices": {"disks": [{"name": "root", "disk": {"bus": "virtio"}}]},
                "resources": {"requests": {"memory": "64Mi"}},
            },
            "volumes": [{"name": "root", "containerDisk": {"image": "quay.io/x/y:1"}}],
        },
    }


@pytest.fixture
def following(cluster: KubeCluster) -> Iterator[tuple[VmiInformer, Recorder]]:
    recorder = Recorder()
    informer = VmiInformer(cluster, recorder, watch_seconds=2, backoff=Backoff(base=0.01, cap=0.05))
    informer.start()
    assert informer.synced.wait(10)
    yield informer, recorder
    informer.stop()


def test_changes_reach_the_handler_grouped_by_environment(
    cluster: KubeCluster, following: tuple[VmiInformer, Recorder]
) -> None:
    informer, recorder = following
    cluster.create_vmi(vmi("env-a-one", "a"))
    cluster.create_vmi(vmi("env-a-two", "a"))
    cluster.create_vmi(vmi("env-b-one", "b"))
    wait_until(lambda: recorder.vmis_of("a") == {"env-a-one", "env-a-two"})
    wait_until(lambda: recorder.vmis_of("b") == {"env-b-one"})
    # Booting shows up as changes of the same environment until the VM runs.
    wait_until(
        lambda: any(
            (v.get("status") or {}).get("phase") == "Running"
            for v in (recorder.latest("b") or EnvironmentChange("", "", {}, ())).vmis
        ),
        timeout=10,
    )
    cluster.delete_vmi("env-b-one")
    wait_until(lambda: recorder.vmis_of("b") == set(), timeout=10)
    assert informer.environment("b") == ()
    assert {vmi_name(v) for v in informer.environment("a")} == {"env-a-one", "env-a-two"}
    assert informer.stats.lists == 1  # one list, then one watch after another


def test_a_dropped_watch_resumes_without_listing_again(
    sim: SimHandle, cluster: KubeCluster, following: tuple[VmiInformer, Recorder]
) -> None:
    informer, recorder = following
    sim.set_faults(watch_drop_rate=1.0)
    for i in range(5):
        cluster.create_vmi(vmi(f"drop-{i}", f"d{i}"))
    for i in range(5):
        wait_until(lambda i=i: recorder.vmis_of(f"d{i}") == {f"drop-{i}"}, timeout=10)
    wait_until(lambda: sim.stats()["droppedWatches"] >= 2, timeout=10)
    assert informer.stats.lists == 1
    assert informer.stats.watches >= 2


def test_a_410_lists_again_and_tells_of_what_changed_meanwhile(
    sim: SimHandle, cluster: KubeCluster
) -> None:
    recorder = Recorder()
    informer = VmiInformer(cluster, recorder, watch_seconds=1)
    cluster.create_vmi(vmi("old-one", "old"))
    informer.relist()  # the informer's version is now the list's
    assert recorder.vmis_of("old") == {"old-one"}
    # While it is not watching, the server forgets its history past that version.
    sim.request("PUT", "/_sim/history", {"seconds": 0, "max_events": 1})
    try:
        cluster.delete_vmi("old-one")
        cluster.create_vmi(vmi("new-one", "new"))
        cluster.create_vmi(vmi("new-two", "new"))
        informer.step()  # the watch answers 410: the version is forgotten
        assert informer.stats.expired == 1
        informer.step()  # lists again, then watches
    finally:
        sim.request("PUT", "/_sim/history", {"seconds": 75, "max_events": 100_000})
    assert informer.stats.lists == 2
    assert recorder.vmis_of("new") == {"new-one", "new-two"}
    wait_until(lambda: recorder.vmis_of("old") == set(), timeout=5)


def test_a_failing_cluster_is_backed_off_from_and_followed_again(
    sim: SimHandle, cluster: KubeCluster
) -> None:
    sim.set_faults(error_rate=1.0)
    recorder = Recorder()
    informer = VmiInformer(cluster, recorder, watch_seconds=2, backoff=Backoff(base=0.01, cap=0.05))
    informer.start()
    try:
        wait_until(lambda: informer.stats.errors >= 3, timeout=10)
        assert not informer.synced.is_set()
        sim.set_faults(error_rate=0)
        assert informer.synced.wait(10)
        cluster.create_vmi(vmi("after-outage", "late"))
        wait_until(lambda: recorder.vmis_of("late") == {"after-outage"}, timeout=10)
    finally:
        informer.stop()


def test_a_handler_that_fails_does_not_stop_the_informer(
    cluster: KubeCluster,
) -> None:
    seen: list[str] = []

    def handler(change: EnvironmentChange) -> None:
        seen.append(change.environment_id)
        if change.environment_id == "bad":
            raise RuntimeError("boom")

    informer = VmiInformer(cluster, handler, watch_seconds=2)
    informer.start()
    try:
        assert informer.synced.wait(10)
        cluster.create_vmi(vmi("bad-one", "bad"))
        cluster.create_vmi(vmi("good-one", "good"))
        wait_until(lambda: "good" in seen, timeout=10)
        assert informer.stats.handler_errors >= 1
    finally:
        informer.stop()


def test_healthy_while_the_cluster_answers_lists_and_watches(
    sim: SimHandle, cluster: KubeCluster
) -> None:
    """What the worker's region heartbeat reports: synced and the last list or watch went well."""
    informer = VmiInformer(
        cluster, Recorder(), watch_seconds=1, backoff=Backoff(base=0.01, cap=0.05)
    )
    assert not informer.healthy  # not synced yet
    informer.start()
    try:
        assert informer.synced.wait(10)
        assert informer.healthy
        sim.set_faults(error_rate=1.0)  # the next watch (a second from now) fails
        wait_until(lambda: not informer.healthy, timeout=10)
        sim.set_faults(error_rate=0)
        # Back without a list: the short probe watch that follows a failure ends normally.
        wait_until(lambda: informer.healthy, timeout=10)
    finally:
        informer.stop()
    assert informer.stopped
    assert not informer.healthy
