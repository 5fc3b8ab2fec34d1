"""Warm pools in the domain: configuration, the life of a pooled environment, the sizing math,
demand learning and the prewarmer's plan. Pure functions on fake clocks; hypothesis for the
math and the plan's invariants."""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.domain.pools.config import (
    MAX_POOL_SIZE,
    InvalidPoolConfig,
    PoolConfig,
    PoolKey,
    PoolMode,
)
from shared.domain.pools.demand import (
    RECENT_WINDOW_SECONDS,
    SLOT_SECONDS,
    WEEK_SECONDS,
    Demand,
    SlotDemand,
    absolute_slot,
    fold_slot,
    recent_rate,
    slot_of_week,
    summarise_slot,
)
from shared.domain.pools.environments import (
    EnvironmentState,
    IllegalEnvironmentMove,
    WarmEnvironment,
    can_move,
    new_warm_environment,
)
from shared.domain.pools.plan import (
    BACKOFF_CAP_SECONDS,
    Blocked,
    BootingEntry,
    PoolHealth,
    PrewarmLimits,
    ReadyEntry,
    RetireReason,
    backoff_seconds,
    plan_pool,
)
from shared.domain.pools.sizing import (
    dithered,
    erlang_b,
    fractional_stock,
    poisson_quantile,
    poisson_sf,
    stock_for_hit_rate,
)
from shared.domain.pools.target import (
    BURST_LINGER_SECONDS,
    DITHER_PERIOD_SECONDS,
    LEAD_SECONDS,
    adaptive_target,
    burst_sizes,
    missed_too_often,
    next_refill_estimate,
    pool_target,
)
from shared.domain.sessions import VmView

NOW = 1_700_000_000.0
B, R, C, X = (
    EnvironmentState.BOOTING,
    EnvironmentState.READY,
    EnvironmentState.CLAIMED,
    EnvironmentState.RETIRED,
)
# The life of a pooled environment, written out independently of the module's table.
LEGAL = {(B, R), (B, X), (R, C), (R, X)}
ADAPTIVE = PoolConfig(mode=PoolMode.ADAPTIVE, min_size=0, max_size=100)
LIMITS = PrewarmLimits(batch=10, max_in_flight=20, max_warm_age=3600, boot_timeout=660)


# -- configuration ---------------------------------------------------------------------------


def test_default_pool_is_static_and_empty() -> None:
    config = PoolConfig()
    assert (config.mode, config.size, config.paused, config.hit_rate) == (
        PoolMode.STATIC,
        0,
        False,
        0.95,
    )


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"size": -1}, "size must be between 0"),
        ({"size": MAX_POOL_SIZE + 1}, "size must be between 0"),
        ({"size": True}, "size must be a whole number"),
        ({"min_size": 5, "max_size": 2}, "min (5) must not exceed max (2)"),
        ({"hit_rate": 1.0}, "hit_rate must be between"),
        ({"hit_rate": 0.2}, "hit_rate must be between"),
        ({"hit_rate": float("nan")}, "hit_rate must be between"),
    ],
)
def test_invalid_configs_are_refused(changes: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidPoolConfig, match=re.escape(message)):
        PoolConfig(**changes)  # type: ignore[arg-type]


@given(
    mode=st.sampled_from(PoolMode),
    size=st.integers(0, MAX_POOL_SIZE),
    bounds=st.tuples(st.integers(0, MAX_POOL_SIZE), st.integers(0, MAX_POOL_SIZE)).map(sorted),
    hit_rate=st.floats(0.5, 0.999),
    paused=st.booleans(),
)
def test_config_survives_its_wire_form(
    mode: PoolMode, size: int, bounds: list[int], hit_rate: float, paused: bool
) -> None:
    config = PoolConfig(
        mode=mode,
        size=size,
        min_size=bounds[0],
        max_size=bounds[1],
        hit_rate=hit_rate,
        paused=paused,
    )
    assert PoolConfig.from_dict(config.to_dict()) == config


def test_a_size_makes_a_pool_static_and_bounds_make_it_adaptive() -> None:
    adaptive = PoolConfig().changed(mode=PoolMode.ADAPTIVE, min_size=2, max_size=9)
    assert (adaptive.mode, adaptive.min_size, adaptive.max_size) == (PoolMode.ADAPTIVE, 2, 9)
    static = adaptive.changed(size=4)
    assert (static.mode, static.size) == (PoolMode.STATIC, 4)
    assert static.changed(paused=True).paused is True
    with pytest.raises(InvalidPoolConfig):
        adaptive.changed(min_size=10)


# -- the life of a pooled environment --------------------------------------------------------


@pytest.mark.parametrize(("current", "wanted"), list(itertools.product(EnvironmentState, repeat=2)))
def test_environment_moves_follow_the_table(
    current: EnvironmentState, wanted: EnvironmentState
) -> None:
    assert can_move(current, wanted) is ((current, wanted) in LEGAL)
    env = replace(warm(), state=current)
    if (current, wanted) in LEGAL:
        assert env.moved(wanted).state is wanted
    else:
        with pytest.raises(IllegalEnvironmentMove):
            env.moved(wanted)


def warm(env_id: str = "e1", **changes: object) -> WarmEnvironment:
    env = WarmEnvironment(
        id=env_id,
        region="local",
        template="ubuntu",
        token="abcdef.0123456789abcdef",
        created_at=NOW,
    )
    return replace(env, **changes)  # type: ignore[arg-type]


@given(st.lists(st.sampled_from(["ready", "claim", "retire"]), max_size=8))
def test_an_environment_is_claimed_at_most_once_and_never_comes_back(moves: list[str]) -> None:
    env = warm()
    claims = 0
    for move in moves:
        before = env.state
        try:
            if move == "ready":
                env = env.ready(at=NOW + 1, vms=[VmView(name="ubuntu", hostname="ubuntu")])
            elif move == "claim":
                env = env.claimed(session_id=f"s-{claims}", at=NOW + 2)
                claims += 1
            else:
                env = env.moved(EnvironmentState.RETIRED)
        except IllegalEnvironmentMove:
            assert env.state is before
        assert before not in (C, X) or env.state is before  # final states stay final
    assert claims <= 1
    if env.state is C:
        assert env.session_id == "s-0"
        assert env.ready_at is not None


def test_new_environments_have_an_id_and_a_kubeadm_token() -> None:
    env = new_warm_environment(key=PoolKey("eu", "kubernetes"), now=NOW)
    assert (env.region, env.template, env.state, env.created_at) == ("eu", "kubernetes", B, NOW)
    assert len(env.id) == 10
    assert env.id.isalnum()
    head, _, tail = env.token.partition(".")
    assert (len(head), len(tail)) == (6, 16)
    assert new_warm_environment(key=PoolKey("eu", "kubernetes"), now=NOW).id != env.id


# -- the sizing math -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("servers", "load", "expected"),
    [(0, 3.0, 1.0), (1, 1.0, 0.5), (2, 1.0, 0.2), (3, 2.0, 4 / 19), (5, 0.0, 0.0)],
)
def test_erlang_b_known_values(servers: int, load: float, expected: float) -> None:
    assert erlang_b(servers, load) == pytest.approx(expected)


@given(st.integers(0, 200), st.floats(0, 300))
def test_erlang_b_is_a_probability_that_falls_with_servers_and_rises_with_load(
    servers: int, load: float
) -> None:
    blocking = erlang_b(servers, load)
    assert 0.0 <= blocking <= 1.0
    assert erlang_b(servers + 1, load) <= blocking + 1e-12
    assert erlang_b(servers, load * 1.5 + 0.1) >= blocking - 1e-12


@given(st.floats(0, 200), st.floats(0.5, 0.999))
def test_stock_is_the_smallest_that_meets_the_hit_rate(load: float, hit_rate: float) -> None:
    stock = stock_for_hit_rate(load, hit_rate)
    assert erlang_b(stock, load) <= 1 - hit_rate or load == 0
    if stock > 0:
        assert erlang_b(stock - 1, load) > 1 - hit_rate


@given(st.floats(0.01, 100), st.floats(0.5, 0.999))
def test_fractional_stock_mixes_two_sizes_to_land_on_the_budget(
    load: float, hit_rate: float
) -> None:
    whole = stock_for_hit_rate(load, hit_rate)
    stock = fractional_stock(load, hit_rate)
    assert whole - 1 <= stock <= whole
    share_larger = stock - (whole - 1)
    mixed = share_larger * erlang_b(whole, load) + (1 - share_larger) * erlang_b(whole - 1, load)
    assert mixed <= (1 - hit_rate) + 1e-9
    assert mixed == pytest.approx(1 - hit_rate, abs=1e-9) or stock == whole


@given(st.floats(0, 50), st.floats(0, WEEK_SECONDS))
def test_dithered_stock_averages_to_the_fraction_over_a_period(stock: float, start: float) -> None:
    steps = 600
    values = [
        dithered(stock, now=start + i * DITHER_PERIOD_SECONDS / steps, period=DITHER_PERIOD_SECONDS)
        for i in range(steps)
    ]
    assert set(values) <= {math.floor(stock), math.floor(stock) + 1}
    assert sum(values) / steps == pytest.approx(stock, abs=2 / steps + 1e-9)


@given(st.integers(0, 40), st.floats(0, 30))
def test_poisson_tail_matches_the_sum_of_its_terms(k: int, mean: float) -> None:
    terms = sum(math.exp(-mean) * mean**i / math.factorial(i) for i in range(k + 1))
    assert poisson_sf(k, mean) == pytest.approx(max(0.0, 1 - terms), abs=1e-9)
    quantile = poisson_quantile(0.99, mean)
    assert poisson_sf(quantile, mean) <= 0.01
    assert quantile == 0 or poisson_sf(quantile - 1, mean) > 0.01


def test_refill_estimate_moves_towards_new_measurements() -> None:
    assert next_refill_estimate(None, 30.0) == 30.0
    assert 30.0 < next_refill_estimate(30.0, 60.0) < 60.0
    with pytest.raises(ValueError, match="refill time"):
        next_refill_estimate(30.0, -1.0)


# -- demand ----------------------------------------------------------------------------------


def test_a_slot_summary_counts_claims_and_the_densest_minute() -> None:
    times = [0, 10, 20, 30, 100, 101, 102, 103, 104, 155, 400]
    assert summarise_slot(times) == (11, 6)
    assert summarise_slot([]) == (0, 0)


def test_a_class_straddling_two_slots_is_remembered_whole_in_the_later_one() -> None:
    boundary = 10 * SLOT_SECONDS
    learners = [boundary - 25 + 2 * i for i in range(30)]  # 25 s before, 33 s after
    earlier = summarise_slot([t for t in learners if t < boundary], start=boundary - SLOT_SECONDS)
    later = summarise_slot([t for t in learners if t >= boundary - 60], start=boundary)
    assert earlier == (13, 13)
    assert later == (17, 30)


def test_a_class_a_few_minutes_later_than_last_week_is_still_expected() -> None:
    boundary = 40 * SLOT_SECONDS
    last_week = fold_slot(None, claims=30, peak=30)  # it came at 9:57 last week
    this_week = fold_slot(last_week, claims=0, peak=0)  # folded at 10:00: not yet this week
    profile = {slot_of_week(absolute_slot(boundary - 60)): this_week}
    assert burst_sizes(profile, now=boundary + 60, horizon=0) == [30]
    assert burst_sizes(profile, now=boundary + BURST_LINGER_SECONDS + 60, horizon=0) == []


def test_a_burst_is_remembered_at_once_and_forgotten_slowly() -> None:
    first = fold_slot(None, claims=30, peak=30)
    assert first.peak == 30
    assert first.is_burst
    quiet = fold_slot(first, claims=0, peak=0)
    assert quiet.peak == pytest.approx(21)
    assert quiet.rate == pytest.approx(first.rate / 2)
    faded = quiet
    for _ in range(12):
        faded = fold_slot(faded, claims=0, peak=0)
    assert not faded.is_burst


def test_steady_demand_is_not_a_burst() -> None:
    # One claim a minute, and a busy minute of four: what Poisson gives now and then.
    assert not SlotDemand(rate=1 / 60, peak=4).is_burst
    assert SlotDemand(rate=1 / 60, peak=15).is_burst


def test_recent_rate_follows_the_hour_and_jumps_on_a_surge() -> None:
    steady = [NOW - 60 * i for i in range(15)]  # one a minute
    assert recent_rate(steady, now=NOW, usual_rate=0, claims_last_hour=60) == pytest.approx(1 / 60)
    # A class arrives: five claims in ten seconds on a pool that sees one an hour.
    surge = [NOW - 2 * i for i in range(5)]
    rate = recent_rate(surge, now=NOW, usual_rate=1 / 3600, claims_last_hour=6)
    assert rate >= 5 / 15
    # The same five are no surge where the profile expects one a second at this hour.
    busy = recent_rate(surge, now=NOW, usual_rate=1.0, claims_last_hour=0)
    assert busy < 5 / 15


def test_recent_rate_drops_when_demand_stops() -> None:
    # Sixty claims in the hour, none in the last fifteen minutes: demand changed.
    assert recent_rate([], now=NOW, usual_rate=0, claims_last_hour=60) == 0


def class_arrivals(start: float, learners: int = 30, seconds: float = 60) -> list[float]:
    return [start + i * seconds / learners for i in range(learners)]


def test_adaptive_target_reacts_to_a_class_within_seconds() -> None:
    start = NOW
    quiet = Demand(claims_last_hour=2)
    assert adaptive_target(ADAPTIVE, quiet, now=start, refill_seconds=30, tick_seconds=5) <= 1
    arrivals = tuple(t for t in class_arrivals(start) if t <= start + 10)
    demand = Demand(arrivals=arrivals, claims_last_hour=2 + len(arrivals))
    target = adaptive_target(ADAPTIVE, demand, now=start + 10, refill_seconds=30, tick_seconds=5)
    assert target >= 10


def test_adaptive_target_learns_a_weekly_class_and_warms_before_it() -> None:
    lesson = NOW - NOW % SLOT_SECONDS + 10 * SLOT_SECONDS  # a slot boundary
    slot = slot_of_week(absolute_slot(lesson))
    claims, peak = summarise_slot(class_arrivals(lesson))
    profile = {slot: fold_slot(None, claims=claims, peak=peak)}
    demand = Demand(profile=profile)
    next_week = lesson + WEEK_SECONDS
    before = next_week - LEAD_SECONDS  # within the lead, one refill ahead
    assert adaptive_target(ADAPTIVE, demand, now=before, refill_seconds=30, tick_seconds=5) >= 30
    long_before = next_week - 3 * SLOT_SECONDS
    assert (
        adaptive_target(ADAPTIVE, demand, now=long_before, refill_seconds=30, tick_seconds=5) <= 1
    )


@given(
    config=st.builds(
        PoolConfig,
        mode=st.just(PoolMode.ADAPTIVE),
        min_size=st.integers(0, 5),
        max_size=st.integers(5, 60),
        hit_rate=st.floats(0.5, 0.999),
    ),
    arrivals=st.lists(st.floats(0, RECENT_WINDOW_SECONDS), max_size=200),
    claims=st.integers(0, 2000),
    refill=st.floats(0, 600),
    now=st.floats(0, 10 * WEEK_SECONDS),
)
def test_adaptive_target_stays_within_min_and_max(
    config: PoolConfig, arrivals: list[float], claims: int, refill: float, now: float
) -> None:
    demand = Demand(
        arrivals=tuple(now - a for a in arrivals),
        claims_last_hour=claims,
        misses_last_hour=claims // 3,
    )
    target = adaptive_target(config, demand, now=now, refill_seconds=refill, tick_seconds=5)
    assert config.min_size <= target <= config.max_size


@given(st.integers(0, MAX_POOL_SIZE))
def test_a_static_pool_targets_its_size(size: int) -> None:
    target = pool_target(
        PoolConfig(size=size),
        Demand(arrivals=(NOW,) * 50, claims_last_hour=50),
        now=NOW,
        refill_seconds=30,
        tick_seconds=5,
    )
    assert target == size


def test_misses_count_only_when_clearly_beyond_the_budget() -> None:
    assert not missed_too_often(Demand(claims_last_hour=10, misses_last_hour=10), 0.95)
    assert not missed_too_often(Demand(claims_last_hour=60, misses_last_hour=4), 0.95)
    assert missed_too_often(Demand(claims_last_hour=60, misses_last_hour=12), 0.95)


# -- the plan --------------------------------------------------------------------------------


def ready(n: int, *, age: float = 60, first: int = 0) -> list[ReadyEntry]:
    return [ReadyEntry(f"r{first + i}", NOW - age - i) for i in range(n)]


def booting(n: int, *, age: float = 5, first: int = 0) -> list[BootingEntry]:
    return [BootingEntry(f"b{first + i}", NOW - age - i) for i in range(n)]


def plan(**kwargs: object) -> object:
    arguments: dict[str, object] = {
        "now": NOW,
        "target": 10,
        "mode": PoolMode.STATIC,
        "paused": False,
        "ready": [],
        "booting": [],
        "health": PoolHealth(),
        "limits": LIMITS,
    }
    arguments.update(kwargs)
    return plan_pool(**arguments)  # type: ignore[arg-type]


def test_an_empty_pool_creates_one_batch() -> None:
    result = plan(target=25)
    assert (result.create, result.retire, result.ceiling) == (10, (), 10)  # type: ignore[attr-defined]


def test_a_full_pool_does_nothing() -> None:
    result = plan(ready=ready(6), booting=booting(4))
    assert (result.create, result.retire) == (0, ())  # type: ignore[attr-defined]


def test_max_in_flight_bounds_creation() -> None:
    result = plan(target=40, booting=booting(15))
    assert result.create == 5  # type: ignore[attr-defined]


def test_an_over_target_static_pool_cancels_boots_then_retires_the_oldest() -> None:
    result = plan(target=3, ready=ready(4), booting=booting(2))
    retired = [(r.env_id, r.reason) for r in result.retire]  # type: ignore[attr-defined]
    # Newest boots first, then the oldest ready (r3 is the oldest: largest age).
    assert retired == [
        ("b0", RetireReason.EXCESS),
        ("b1", RetireReason.EXCESS),
        ("r3", RetireReason.EXCESS),
    ]


def test_an_adaptive_pool_keeps_one_spare_for_the_next_claim() -> None:
    result = plan(target=3, mode=PoolMode.ADAPTIVE, ready=ready(4))
    assert result.retire == ()  # type: ignore[attr-defined]
    result = plan(target=3, mode=PoolMode.ADAPTIVE, ready=ready(6))
    assert len(result.retire) == 2  # type: ignore[attr-defined]


def test_stale_environments_are_replaced_before_they_go() -> None:
    stale = ready(4, age=LIMITS.max_warm_age + 10)
    result = plan(target=4, ready=stale)
    assert result.retire == ()  # type: ignore[attr-defined]
    assert result.create == 4  # type: ignore[attr-defined]
    # Two replacements are ready: the two oldest stale ones go.
    result = plan(target=4, ready=stale + ready(2, age=5, first=10))
    assert {r.env_id for r in result.retire} == {"r2", "r3"}  # type: ignore[attr-defined]
    # Twice the age: gone whatever happens.
    result = plan(target=4, ready=ready(1, age=2 * LIMITS.max_warm_age + 1), paused=True)
    assert [r.reason for r in result.retire] == [RetireReason.STALE]  # type: ignore[attr-defined]


def test_lost_boots_are_retired() -> None:
    result = plan(booting=booting(1, age=LIMITS.boot_timeout + 1))
    assert [(r.env_id, r.reason) for r in result.retire] == [("b0", RetireReason.LOST)]  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("kwargs", "blocked"),
    [
        ({"paused": True}, Blocked.PAUSED),
        ({"capacity_blocked": True}, Blocked.CAPACITY),
        ({"booting": [BootingEntry("b", NOW, unschedulable=True)]}, Blocked.CAPACITY),
        ({"health": PoolHealth(failures=3, last_failure_at=NOW - 5)}, Blocked.BACKOFF),
    ],
)
def test_creation_stops_when_paused_out_of_capacity_or_backing_off(
    kwargs: dict[str, object], blocked: Blocked
) -> None:
    result = plan(**kwargs)
    assert result.create == 0  # type: ignore[attr-defined]
    assert result.blocked is blocked  # type: ignore[attr-defined]


def test_after_the_backoff_one_probe_at_a_time() -> None:
    failures = 3
    health = PoolHealth(failures=failures, last_failure_at=NOW - backoff_seconds(failures))
    assert plan(health=health).create == 1  # type: ignore[attr-defined]


def test_backoff_doubles_up_to_a_cap() -> None:
    assert backoff_seconds(0) == 0
    delays = [backoff_seconds(n) for n in range(1, 12)]
    assert delays == sorted(delays)
    assert delays[1] == 2 * delays[0]
    assert delays[-1] == BACKOFF_CAP_SECONDS


entries = st.integers(0, 30)


@settings(max_examples=300)
@given(
    target=st.integers(0, 60),
    mode=st.sampled_from(PoolMode),
    n_ready=entries,
    n_booting=entries,
    ages=st.lists(st.floats(0, 5 * 3600), min_size=60, max_size=60),
    unschedulable=st.booleans(),
    failures=st.integers(0, 5),
    batch=st.integers(1, 15),
    max_in_flight=st.integers(1, 30),
    paused=st.booleans(),
)
def test_plan_invariants(
    target: int,
    mode: PoolMode,
    n_ready: int,
    n_booting: int,
    ages: list[float],
    unschedulable: bool,
    failures: int,
    batch: int,
    max_in_flight: int,
    paused: bool,
) -> None:
    limits = PrewarmLimits(
        batch=batch, max_in_flight=max_in_flight, max_warm_age=3600, boot_timeout=660
    )
    ready_entries = [ReadyEntry(f"r{i}", NOW - ages[i]) for i in range(n_ready)]
    booting_entries = [
        BootingEntry(f"b{i}", NOW - ages[30 + i] / 20, unschedulable=unschedulable and i == 0)
        for i in range(n_booting)
    ]
    health = PoolHealth(failures=failures, last_failure_at=NOW - 30 if failures else None)
    result = plan_pool(
        now=NOW,
        target=target,
        mode=mode,
        paused=paused,
        ready=ready_entries,
        booting=booting_entries,
        health=health,
        limits=limits,
    )
    retired = [r.env_id for r in result.retire]
    assert len(retired) == len(set(retired))
    assert set(retired) <= {e.env_id for e in ready_entries} | {e.env_id for e in booting_entries}
    kept_booting = [b for b in booting_entries if b.env_id not in retired]
    kept_ready = [r for r in ready_entries if r.env_id not in retired]
    held = len(kept_booting) + len(kept_ready)
    assert result.ceiling == held + result.create
    assert 0 <= result.create <= batch
    assert len(kept_booting) + result.create <= max(max_in_flight, len(kept_booting))
    # Growth never takes a pool beyond target + one batch.
    assert result.create == 0 or result.ceiling <= target + batch
    # Never more than target (+ one spare when adaptive) of fresh ready and booting remain.
    slack = 1 if mode is PoolMode.ADAPTIVE else 0
    fresh = [r for r in kept_ready if NOW - r.ready_at < limits.max_warm_age]
    assert len(fresh) + len(kept_booting) <= max(target + slack, 0) or result.retire == ()
    if paused or any(b.unschedulable for b in kept_booting):
        assert result.create == 0
    if failures:
        assert result.create <= 1
    for entry in booting_entries:
        if NOW - entry.started_at > limits.boot_timeout:
            assert entry.env_id in retired
    for entry in ready_entries:
        if NOW - entry.ready_at >= 2 * limits.max_warm_age:
            assert entry.env_id in retired
    # Level-triggered: planning again once applied creates only what is still missing.
    again = plan_pool(
        now=NOW,
        target=target,
        mode=mode,
        paused=paused,
        ready=kept_ready,
        booting=kept_booting + [BootingEntry(f"n{i}", NOW) for i in range(result.create)],
        health=health,
        limits=limits,
    )
    still_missing = target - (len(fresh) + len(kept_booting) + result.create)
    assert again.create <= max(0, still_missing)
