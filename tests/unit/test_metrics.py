"""The series labvirt records: what Redis knows read at scrape time (pools, dead letters,
regions), a session's changes of state, the outcome of each create, Kubernetes calls.

Series are per process and counters only grow: each test reads what its own actions added.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import fakeredis
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from labvirt.sim.testing import SimHandle, running_simulator_in_thread
from shared.adapters.dead_letters import DeadLetters
from shared.adapters.kube import KubeCluster, NotFound, TooManyRequests, Unavailable
from shared.adapters.pool_store import RedisPoolStore
from shared.adapters.region_state import RedisRegionState
from shared.adapters.retrying import CountedRetry, Retry
from shared.adapters.session_store import RedisSessionStore
from shared.config import Cluster
from shared.domain.lifecycle import clocks_for, start_session
from shared.domain.pools.config import PoolConfig, PoolKey
from shared.domain.pools.environments import new_warm_environment
from shared.domain.reasons import CloseReason, Failure
from shared.domain.sessions import Session
from shared.jobs import PROVISION, TEARDOWN
from shared.metrics.exposition import render
from shared.metrics.series import process_registry
from shared.metrics.state import StateCollector
from tests.unit.test_api import ADMIN, FRONTEND, TEMPLATES
from tests.unit.test_pools_api import UBUNTU, VMS, PoolsApi

NOW = 1_700_000_000.0


def sample(name: str, **labels: str) -> float:
    return process_registry().get_sample_value(name, labels) or 0.0


def scraped(collector: StateCollector) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of one scrape, by name and labels."""
    text = render([collector])[0].decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


# -- what Redis knows, read when scraped ---------------------------------------------------


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    connection = redis.Redis.from_url(redis_url)
    connection.flushdb()
    yield connection
    connection.flushdb()
    connection.close()


def collector_for(client: redis.Redis, *, clock: float = NOW) -> StateCollector:
    return StateCollector(
        pools=RedisPoolStore(client, prefix=f"test-metrics-{uuid.uuid4().hex[:8]}"),
        dead_letters=DeadLetters(client, clock=lambda: clock),
        regions=RedisRegionState(client),
        region_names=("local", "eu"),
        templates={
            name: (template.pool, float(template.startup_timeout_seconds))
            for name, template in TEMPLATES.items()
        },
    )


def test_pools_are_read_from_redis_at_scrape_time(client: redis.Redis) -> None:
    collector = collector_for(client)
    assert collector.pools is not None
    api = PoolsApi(collector.pools)
    collector.pools.set_config(UBUNTU, PoolConfig(size=3))
    api.warm_up(2)
    api.warm_up(1, key=PoolKey("eu", "ubuntu"))
    collector.pools.set_config(PoolKey("eu", "ubuntu"), PoolConfig(size=1, paused=True))

    found = scraped(collector)

    local = (("region", "local"), ("template", "ubuntu"))
    eu = (("region", "eu"), ("template", "ubuntu"))
    assert found[("labvirt_pool_target", local)] == 3
    assert found[("labvirt_pool_ready", local)] == 2
    assert found[("labvirt_pool_in_flight", local)] == 0
    assert found[("labvirt_pool_paused", local)] == 0
    assert (found[("labvirt_pool_ready", eu)], found[("labvirt_pool_paused", eu)]) == (1, 1)
    assert found[("labvirt_redis_up", ())] == 1


def test_a_pool_booting_counts_in_flight_until_ready(client: redis.Redis) -> None:
    collector = collector_for(client)
    assert collector.pools is not None
    [booting] = collector.pools.reserve(
        UBUNTU, [new_warm_environment(key=UBUNTU, now=NOW)], ceiling=2, max_in_flight=2
    )
    local = (("region", "local"), ("template", "ubuntu"))
    levels = ("labvirt_pool_in_flight", "labvirt_pool_ready")
    assert [scraped(collector)[(name, local)] for name in levels] == [1, 0]

    assert collector.pools.mark_ready(UBUNTU, booting.id, vms=VMS, at=NOW + 30)
    assert [scraped(collector)[(name, local)] for name in levels] == [0, 1]


def test_dead_letters_count_while_they_wait_for_an_operator(client: redis.Redis) -> None:
    collector = collector_for(client)
    letters = collector.dead_letters
    before = sample("labvirt_dead_letters_recorded_total", task=PROVISION)
    first = letters.record(
        task=PROVISION,
        payload={"session_id": "s-1"},
        task_id=None,
        error=RuntimeError("x"),
        traceback="",
    )
    letters.record(
        task=TEARDOWN,
        payload={"session_id": "s-2"},
        task_id=None,
        error=RuntimeError("y"),
        traceback="",
    )
    assert scraped(collector)[("labvirt_dead_letters_failed", ())] == 2

    letters.requeue(first.id, by="ops", enqueue=lambda *_: None)
    assert scraped(collector)[("labvirt_dead_letters_failed", ())] == 1
    letters.record(
        task=PROVISION,
        payload={"session_id": "s-1"},
        task_id=None,
        error=RuntimeError("x"),
        traceback="",
    )  # the requeued task failed again
    assert scraped(collector)[("labvirt_dead_letters_failed", ())] == 2
    assert sample("labvirt_dead_letters_recorded_total", task=PROVISION) == before + 2


def test_a_dead_letter_past_its_retention_stops_counting(client: redis.Redis) -> None:
    DeadLetters(client, retention_seconds=60, clock=lambda: NOW).record(
        task=PROVISION,
        payload={"session_id": "s-1"},
        task_id=None,
        error=RuntimeError("x"),
        traceback="",
    )
    assert DeadLetters(client, clock=lambda: NOW + 59).failed_count() == 1
    assert DeadLetters(client, clock=lambda: NOW + 61).failed_count() == 0


def test_regions_are_up_while_their_heartbeat_lasts(client: redis.Redis) -> None:
    collector = collector_for(client)
    collector.regions.heartbeat(["local", "eu"], ttl_seconds=60)
    client.delete("labvirt:region:eu:alive")  # eu's workers went silent
    collector.regions.set_drained("local", True)

    found = scraped(collector)

    assert found[("labvirt_region_up", (("region", "local"),))] == 1
    assert found[("labvirt_region_up", (("region", "eu"),))] == 0
    assert found[("labvirt_region_drained", (("region", "local"),))] == 1
    assert found[("labvirt_region_drained", (("region", "eu"),))] == 0


def test_templates_say_their_startup_budget(client: redis.Redis) -> None:
    found = scraped(collector_for(client))
    for name, template in TEMPLATES.items():
        key = ("labvirt_template_startup_timeout_seconds", (("template", name),))
        assert found[key] == template.startup_timeout_seconds


def test_a_redis_that_does_not_answer_is_a_series_not_an_error() -> None:
    gone = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2)
    found = scraped(collector_for(gone))
    assert found[("labvirt_redis_up", ())] == 0
    assert not any(name.startswith("labvirt_pool_") for name, _ in found)
    assert ("labvirt_template_startup_timeout_seconds", (("template", "ubuntu"),)) in found


# -- a session's changes of state -----------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


def opened(store: RedisSessionStore, *, at: float, template: str = "ubuntu") -> Session:
    session, _ = start_session(
        user=f"u-{uuid.uuid4().hex[:6]}",
        template=template,
        region="local",
        clocks=clocks_for(TEMPLATES[template]),
        now=at,
    )
    store.add(session)
    return session


def test_a_cold_session_ready_records_its_time_to_ready() -> None:
    store = RedisSessionStore(fakeredis.FakeRedis())
    labels = {"template": "kubernetes", "region": "local", "path": "cold"}
    count = sample("labvirt_session_time_to_ready_seconds_count", **labels)
    total = sample("labvirt_session_time_to_ready_seconds_sum", **labels)
    slow = sample("labvirt_session_time_to_ready_seconds_bucket", **labels, le="5.0")
    session = opened(store, at=NOW, template="kubernetes")

    store.update(session.id, lambda s: s.mark_ready(vms=VMS, at=NOW + 7.5))
    store.update(session.id, lambda s: s.with_vms(VMS))  # no change of state: nothing more

    assert sample("labvirt_session_time_to_ready_seconds_count", **labels) == count + 1
    assert sample("labvirt_session_time_to_ready_seconds_sum", **labels) == total + 7.5
    assert sample("labvirt_session_time_to_ready_seconds_bucket", **labels, le="5.0") == slow


def test_a_session_ended_counts_once_with_its_reason() -> None:
    store = RedisSessionStore(fakeredis.FakeRedis())
    labels = {"template": "ubuntu", "region": "local", "state": "ended", "reason": "idle"}
    before = sample("labvirt_sessions_ended_total", **labels)
    session = opened(store, at=NOW)
    store.update(session.id, lambda s: s.mark_ready(vms=VMS, at=NOW + 1))
    store.update(session.id, lambda s: s.close(CloseReason.IDLE, at=NOW + 2))
    assert sample("labvirt_sessions_ended_total", **labels) == before  # closing, not ended
    store.update(session.id, lambda s: s.finish(at=NOW + 3))
    assert sample("labvirt_sessions_ended_total", **labels) == before + 1


def test_a_session_failed_while_booting_is_a_provisioning_failure() -> None:
    store = RedisSessionStore(fakeredis.FakeRedis())
    failed = {"template": "ubuntu", "region": "local", "reason": "vm_failed"}
    ended = {**failed, "state": "failed"}
    before = sample("labvirt_provisioning_failures_total", **failed)
    ended_before = sample("labvirt_sessions_ended_total", **ended)
    booting = opened(store, at=NOW)
    ready = opened(store, at=NOW)
    store.update(ready.id, lambda s: s.mark_ready(vms=VMS, at=NOW + 1))

    for session in (booting, ready):
        store.update(session.id, lambda s: s.fail(Failure.vm_failed("boom"), at=NOW + 5))

    assert sample("labvirt_provisioning_failures_total", **failed) == before + 1
    assert sample("labvirt_sessions_ended_total", **ended) == ended_before + 2


# -- the outcome of each create --------------------------------------------------------------


def requests_of(
    outcome: str, *, template: str = "ubuntu", region: str = "local", reason: str = ""
) -> float:
    return sample(
        "labvirt_session_requests_total",
        template=template,
        region=region,
        outcome=outcome,
        reason=reason,
    )


def create(api: PoolsApi, user: str, *, token: str | None = FRONTEND, **body: object) -> int:
    response = api.call(
        "POST", "/v1/sessions", token=token, json={"template": "ubuntu", "user": user, **body}
    )
    return response.status_code


def test_creates_count_warm_cold_and_reconnected(pool_store: RedisPoolStore) -> None:
    api = PoolsApi(pool_store)
    api.warm_up(1)
    warm, cold, again = requests_of("warm"), requests_of("cold"), requests_of("reconnected")
    ready = {"template": "ubuntu", "region": "local", "path": "warm"}
    claims = sample("labvirt_session_time_to_ready_seconds_count", **ready)

    assert create(api, "alice") == 201  # the pool's one environment
    assert create(api, "bob") == 201  # the pool is empty: cold
    assert create(api, "alice") == 200  # alice again: her session

    assert (requests_of("warm"), requests_of("cold"), requests_of("reconnected")) == (
        warm + 1,
        cold + 1,
        again + 1,
    )
    assert sample("labvirt_session_time_to_ready_seconds_count", **ready) == claims + 1


def all_requests() -> float:
    return sum(
        s.value
        for family in process_registry().collect()
        if family.name == "labvirt_session_requests"
        for s in family.samples
        if s.name.endswith("_total")
    )


def test_refused_creates_count_as_rejected_with_labvirt_names_only(
    pool_store: RedisPoolStore,
) -> None:
    api = PoolsApi(pool_store)
    made_up = {"template": "unknown", "region": "unknown", "reason": "unknown_template"}
    atlantis = {"region": "unknown", "reason": "unknown_region"}
    limit = {"template": "kubernetes", "region": "unknown", "reason": "session_limit"}
    before = {
        name: requests_of("rejected", **labels)
        for name, labels in (("made_up", made_up), ("atlantis", atlantis), ("limit", limit))
    }

    assert create(api, "carol", template="made-up") == 422
    assert create(api, "carol", region="atlantis") == 422
    assert create(api, "carol") == 201
    assert create(api, "carol", template="kubernetes") == 409  # one session per user

    assert requests_of("rejected", **made_up) == before["made_up"] + 1
    assert requests_of("rejected", **atlantis) == before["atlantis"] + 1
    assert requests_of("rejected", **limit) == before["limit"] + 1


def test_a_create_without_a_platform_token_is_no_session_request(
    pool_store: RedisPoolStore,
) -> None:
    api = PoolsApi(pool_store)
    before = all_requests()
    assert create(api, "frank", token=None) == 401
    assert create(api, "frank", token=ADMIN[::-1]) == 401
    assert all_requests() == before


def test_a_replayed_create_counts_once(pool_store: RedisPoolStore) -> None:
    api = PoolsApi(pool_store)
    cold = requests_of("cold")
    for _ in range(3):
        response = api.call(
            "POST",
            "/v1/sessions",
            token=FRONTEND,
            json={"template": "ubuntu", "user": "dave"},
            headers={"Idempotency-Key": "create-dave-1"},
        )
        assert response.status_code == 201
    assert requests_of("cold") == cold + 1


def test_the_api_serves_its_series_and_redis_state_to_a_scraper(pool_store: RedisPoolStore) -> None:
    api = PoolsApi(pool_store)
    assert create(api, "erin") == 201
    answer = api.client.get("/metrics", headers={"Authorization": f"Bearer {ADMIN}"})
    assert answer.status_code == 200
    assert answer.mimetype == "text/plain"
    names = {
        s.name
        for f in text_string_to_metric_families(answer.get_data(as_text=True))
        for s in f.samples
    }
    assert {"labvirt_session_requests_total", "labvirt_pool_target", "labvirt_redis_up"} <= names
    refused = api.client.get("/metrics")
    assert (refused.status_code, refused.mimetype) == (401, "application/problem+json")


# -- Kubernetes calls ------------------------------------------------------------------------


class Answers:
    """An operation that fails with ``errors`` in turn, then answers."""

    def __init__(self, *errors: Exception) -> None:
        self.errors = list(errors)

    def __call__(self) -> str:
        if self.errors:
            raise self.errors.pop(0)
        return "ok"


def calls(verb: str, code: str, region: str = "metrics-test") -> float:
    return sample("labvirt_kube_calls_total", region=region, verb=verb, code=code)


def test_every_attempt_is_counted_by_verb_and_answer() -> None:
    counted = CountedRetry(Retry(sleep=lambda _: None), region="metrics-test")
    before = {code: calls("create", code) for code in ("2xx", "429", "unreachable")}
    slow = TooManyRequests("slow down", status=429, retry_after=0.0)
    broken = Unavailable("connection refused")

    assert counted(Answers(slow, broken), what="create vmi x", error=Unavailable.__mro__[1]) == "ok"

    assert {code: calls("create", code) for code in before} == {
        "2xx": before["2xx"] + 1,
        "429": before["429"] + 1,
        "unreachable": before["unreachable"] + 1,
    }


def test_a_permanent_answer_is_counted_and_raised() -> None:
    counted = CountedRetry(Retry(sleep=lambda _: None), region="metrics-test")
    before = calls("delete", "404")
    with pytest.raises(NotFound):
        counted(Answers(NotFound("gone", status=404)), what="delete vmi x", error=NotFound)
    assert calls("delete", "404") == before + 1


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimHandle]:
    with running_simulator_in_thread(
        tmp_path_factory.mktemp("metrics-sim"), boot_seconds=0.2, seed=5
    ) as handle:
        yield handle


def test_the_kubernetes_adapter_counts_its_calls(sim: SimHandle) -> None:
    cluster = KubeCluster(Cluster("metrics-sim", sim.kubeconfig_path, None, "default"))
    listed = calls("list", "2xx", region="metrics-sim")
    missing = calls("get", "404", region="metrics-sim")
    try:
        cluster.list_vmis("app.kubernetes.io/managed-by=labvirt")
        with pytest.raises(NotFound):
            cluster.get_vmi("lv-nothing-here")
    finally:
        cluster.close()
    assert calls("list", "2xx", region="metrics-sim") == listed + 1
    assert calls("get", "404", region="metrics-sim") == missing + 1
