"""The store: resourceVersion order, paging, watch history and 410, dry runs, finalizers."""

from __future__ import annotations

import json

import pytest

from labvirt.sim.clock import FakeScheduler
from labvirt.sim.errors import ApiError
from labvirt.sim.selectors import parse_label_selector
from labvirt.sim.store import ResourceType, Store

THINGS = ResourceType(
    group="example.com",
    version="v1",
    plural="things",
    singular="thing",
    kind="Thing",
    namespaced=True,
    custom=True,
)


@pytest.fixture
def clock():
    return FakeScheduler()


@pytest.fixture
def store(clock):
    store = Store(clock, history_seconds=75, seed=1)
    store.register(THINGS)
    return store


def thing(name, **labels):
    return {"metadata": {"name": name, "labels": labels}, "spec": {"n": 1}}


def lines(watcher):
    events = [json.loads(line) for line in watcher.lines]
    watcher.lines.clear()
    return [
        (e["type"], e["object"]["metadata"].get("name"), e["object"]["metadata"]["resourceVersion"])
        for e in events
    ]


def test_resource_versions_increase_with_every_write(store):
    a = store.create(THINGS, "ns", thing("a"))
    b = store.create(THINGS, "ns", thing("b"))
    a2 = store.update(THINGS, "ns", "a", {**a, "spec": {"n": 2}})
    rvs = [int(o["metadata"]["resourceVersion"]) for o in (a, b, a2)]
    assert rvs == sorted(rvs)
    assert len(set(rvs)) == 3
    assert a2["metadata"]["generation"] == 2
    listed = store.list(THINGS, "ns")
    assert listed["metadata"]["resourceVersion"] == a2["metadata"]["resourceVersion"]


def test_stale_update_is_a_conflict(store):
    a = store.create(THINGS, "ns", thing("a"))
    store.update(THINGS, "ns", "a", {**a, "spec": {"n": 2}})
    with pytest.raises(ApiError) as caught:
        store.update(THINGS, "ns", "a", {**a, "spec": {"n": 3}})
    assert caught.value.code == 409
    assert caught.value.reason == "Conflict"


def test_paging_walks_every_object_once_across_namespaces(store):
    # "a" is a prefix of "a-b": string order of "ns/name" and tuple order differ here.
    for namespace in ("a", "a-b", "b"):
        for name in ("x", "y", "z"):
            store.create(THINGS, namespace, thing(name))
    seen, token = [], None
    while True:
        page = store.list(THINGS, None, limit=2, continue_token=token)
        seen += [(o["metadata"]["namespace"], o["metadata"]["name"]) for o in page["items"]]
        token = page["metadata"].get("continue")
        if not token:
            break
        assert page["metadata"]["remainingItemCount"] == 9 - len(seen)
    assert sorted(seen) == seen
    assert len(seen) == 9
    assert len(set(seen)) == 9


def test_bad_continue_token_is_400(store):
    with pytest.raises(ApiError) as caught:
        store.list(THINGS, None, continue_token="garbage!")
    assert caught.value.code == 400


def test_watch_from_a_version_replays_exactly_the_later_changes(store):
    a = store.create(THINGS, "ns", thing("a"))
    since = a["metadata"]["resourceVersion"]
    store.create(THINGS, "ns", thing("b"))
    store.delete(THINGS, "ns", "a")
    watcher = store.watch(THINGS, "ns", resource_version=since)
    events = lines(watcher)
    assert [(t, n) for t, n, _ in events] == [("ADDED", "b"), ("DELETED", "a")]
    assert [int(rv) for _, _, rv in events] == sorted(int(rv) for _, _, rv in events)
    store.create(THINGS, "ns", thing("c"))
    assert [(t, n) for t, n, _ in lines(watcher)] == [("ADDED", "c")]


def test_watch_without_version_starts_with_synthetic_added(store):
    store.create(THINGS, "ns", thing("a"))
    store.create(THINGS, "other", thing("b"))
    watcher = store.watch(THINGS, "ns", resource_version="0")
    assert [(t, n) for t, n, _ in lines(watcher)] == [("ADDED", "a")]


def test_leaving_a_label_selector_looks_like_a_deletion(store):
    a = store.create(THINGS, "ns", thing("a", env="one"))
    watcher = store.watch(
        THINGS,
        "ns",
        labels=parse_label_selector("env=one"),
        resource_version=a["metadata"]["resourceVersion"],
    )
    store.update(THINGS, "ns", "a", {**a, "metadata": {**a["metadata"], "labels": {}}})
    assert [(t, n) for t, n, _ in lines(watcher)] == [("DELETED", "a")]


def test_watch_older_than_history_gets_410_expired(store, clock):
    old = store.create(THINGS, "ns", thing("a"))["metadata"]["resourceVersion"]
    store.create(THINGS, "ns", thing("a2"))
    clock.advance(100)  # beyond the 75 s of history: both events above are dropped
    store.create(THINGS, "ns", thing("b"))
    store.create(THINGS, "ns", thing("c"))
    watcher = store.watch(THINGS, "ns", resource_version=old)
    assert watcher.closed
    (line,) = watcher.lines
    event = json.loads(line)
    assert event["type"] == "ERROR"
    assert event["object"]["code"] == 410
    assert event["object"]["reason"] == "Expired"
    assert event["object"]["message"].startswith(f"too old resource version: {old} (")


def test_tiny_history_by_event_count(store):
    first = store.create(THINGS, "ns", thing("a"))["metadata"]["resourceVersion"]
    store.set_history_limit(max_events=1)
    store.create(THINGS, "ns", thing("b"))
    store.create(THINGS, "ns", thing("c"))
    assert store.watch(THINGS, "ns", resource_version=first).closed
    assert not store.watch(THINGS, "ns", resource_version=str(store.oldest_resource_version)).closed


def test_dry_run_stores_nothing(store):
    store.create(THINGS, "ns", thing("a"), dry_run=True)
    assert store.peek(THINGS, "ns", "a") is None
    a = store.create(THINGS, "ns", thing("a"))
    rv = store.resource_version
    store.update(THINGS, "ns", "a", {**a, "spec": {"n": 5}}, dry_run=True)
    store.delete(THINGS, "ns", "a", dry_run=True)
    assert store.resource_version == rv
    assert store.peek(THINGS, "ns", "a")["spec"] == {"n": 1}


def test_delete_with_finalizer_marks_then_last_finalizer_removes(store):
    body = thing("a")
    body["metadata"]["finalizers"] = ["example.com/keep"]
    store.create(THINGS, "ns", body)
    marked, removed = store.delete(THINGS, "ns", "a", grace_period_seconds=5)
    assert not removed
    assert marked["metadata"]["deletionTimestamp"]
    assert marked["metadata"]["deletionGracePeriodSeconds"] == 5
    store.controller_update(THINGS, "ns", "a", lambda o: o["metadata"].pop("finalizers"))
    assert store.peek(THINGS, "ns", "a") is None


def test_generate_name(store):
    body = {"metadata": {"generateName": "lab-"}}
    created = store.create(THINGS, "ns", body)
    name = created["metadata"]["name"]
    assert name.startswith("lab-")
    assert len(name) == len("lab-") + 5
    assert set(name[4:]) <= set("bcdfghjklmnpqrstvwxz2456789")
