"""Pool sizing: warm-hit rate and idle VM-minutes per claim, static pools against adaptive.

Arrival traces (steady Poisson, a weekday diurnal curve, a weekly class burst) are replayed on
a simulated clock through labvirt's own code: every claim is a create through the API's
``SessionLife.open`` (sessions in fakeredis), every 5 simulated seconds the real
``Prewarmer`` ticks (target, plan, reservations, retirements), against the in-memory pool
store that passes the same contract tests as the Redis one. A pooled environment is ready
after a boot time drawn from the simulator's own distribution: its KubeVirt controllers boot
the template's VMIs in-process on a fake clock (readiness probe included); nothing sleeps.

Idle VM-minutes count every minute a pooled VM exists without a learner: booting, waiting,
and booting replacements that get retired. Per claim, so traces of different volume compare.

    python -m benchmarks.pool_bench [--quick] [--write-docs] [--json FILE]
"""

from __future__ import annotations

import argparse
import heapq
import json
import logging
import math
import os
import random
import statistics
import sys
import textwrap
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import fakeredis
import structlog

from labvirt.sim.app import Settings as SimSettings
from labvirt.sim.app import build_simulator
from labvirt.sim.clock import FakeScheduler
from labvirt.sim.vmi import VMI
from services.prewarmer.prewarmer import Prewarmer, PrewarmSettings
from shared.adapters.memory_pool_store import MemoryPoolStore
from shared.adapters.session_events import SessionEvents
from shared.adapters.session_store import RedisSessionStore
from shared.adapters.template_files import load_templates
from shared.domain.lifecycle import clocks_for
from shared.domain.manifests import build_environment
from shared.domain.pools.config import PoolConfig, PoolKey, PoolMode
from shared.domain.pools.demand import WEEK_SECONDS
from shared.domain.templates import Template
from shared.domain.vmi_status import is_ready
from shared.jobs import (
    BIND_ENVIRONMENT,
    PREWARM_ENVIRONMENT,
    RETIRE_ENVIRONMENT,
    TaskQueue,
    check_payload,
)
from shared.session_life import SessionLife

DOCS = Path(__file__).resolve().parents[1] / "docs" / "BENCHMARKS.md"
SECTION = "## Warm pools"
COMMAND = "python -m benchmarks.pool_bench"
KEY = PoolKey("local", "ubuntu")
HIT_RATE = 0.95
TICK_SECONDS = 5.0
BOOT_SECONDS = 20.0  # the simulator's median creation -> Running (FACTS: P50 15-25 s)
# A Monday, 00:00 UTC: traces start at a week boundary of the calendar.
START = datetime(2024, 1, 1, tzinfo=UTC).timestamp()
DAY = 86400.0


# -- the simulator's boot times --------------------------------------------------------------


def simulator_boot_times(
    template: Template, *, environments: int, boot_seconds: float, seed: int
) -> list[float]:
    """Seconds from creation until every VM of an environment is Running and Ready, for
    ``environments`` environments booted by the simulator's controllers on a fake clock."""
    scheduler = FakeScheduler(start=0.0)
    vms = environments * len(template.vms)
    # A VM asks for 2 of a node's 16 cores: 8 fit a node.
    settings = SimSettings(boot_seconds=boot_seconds, seed=seed, nodes=vms // 8 + 1)
    simulator = build_simulator(settings, scheduler)
    ready_at: dict[str, float] = {}

    def listen(event_type: str, resource: Any, obj: dict[str, Any], _: Any) -> None:
        name = obj["metadata"]["name"]
        if resource is VMI and event_type == "MODIFIED" and name not in ready_at and is_ready(obj):
            ready_at[name] = scheduler.now()

    simulator.store.add_listener(listen)
    names: list[list[str]] = []
    for index in range(environments):
        manifests = build_environment(
            template=template,
            environment_id=f"bench{index}",
            namespace="default",
            session_id=None,
            environment_token="abcdef.0123456789abcdef",
        )
        for vmi in manifests.vmis:
            simulator.store.create(VMI, "default", vmi)
        names.append([vmi["metadata"]["name"] for vmi in manifests.vmis])
    scheduler.advance(3600)
    return [max(ready_at[name] for name in environment) for environment in names]


# -- arrival traces --------------------------------------------------------------------------


@dataclass(frozen=True)
class Trace:
    name: str
    description: str
    arrivals: list[float]
    end: float
    classes: list[tuple[float, float]] = field(default_factory=list)  # (first, last) arrival

    @property
    def weeks(self) -> float:
        return (self.end - START) / WEEK_SECONDS


def poisson_arrivals(
    rng: random.Random, rate: Callable[[float], float], peak: float, end: float
) -> list[float]:
    """A Poisson process with time-varying ``rate`` (per second), by thinning."""
    arrivals, moment = [], START
    while True:
        moment += rng.expovariate(peak)
        if moment >= end:
            return arrivals
        if rng.random() < rate(moment) / peak:
            arrivals.append(moment)


def steady_trace(rng: random.Random, weeks: float) -> Trace:
    rate = 1 / 60
    end = START + weeks * WEEK_SECONDS
    return Trace(
        "steady",
        "Poisson, 1 claim/min around the clock",
        poisson_arrivals(rng, lambda _: rate, rate, end),
        end,
    )


def diurnal_trace(rng: random.Random, weeks: float) -> Trace:
    peak, night = 4 / 60, 0.05 / 60

    def rate(moment: float) -> float:
        day = datetime.fromtimestamp(moment, UTC)
        hour = day.hour + day.minute / 60
        if day.weekday() < 5 and 8 <= hour <= 20:
            return night + peak * math.sin(math.pi * (hour - 8) / 12) ** 2
        return night

    end = START + weeks * WEEK_SECONDS
    return Trace(
        "diurnal",
        "weekdays 08-20 h, sin² up to 4 claims/min; nights and weekends 0.05/min",
        poisson_arrivals(rng, rate, peak + night, end),
        end,
    )


def burst_trace(rng: random.Random, weeks: float) -> Trace:
    """A class of 30 opening the same scenario within a minute, Tuesdays at 10:00 (give or
    take three minutes), over a quiet background of 2 claims an hour."""
    end = START + weeks * WEEK_SECONDS
    background = 2 / 3600
    arrivals = poisson_arrivals(rng, lambda _: background, background, end)
    lesson = START + 1 * DAY + 10 * 3600
    classes = []
    while lesson < end:
        start = lesson + rng.uniform(-180, 180)
        learners = sorted(start + rng.uniform(0, 60) for _ in range(30))
        arrivals += learners
        classes.append((learners[0], learners[-1]))
        lesson += WEEK_SECONDS
    return Trace(
        "weekly-burst",
        "30 learners within a minute every Tuesday ~10:00, 2 claims/h otherwise",
        sorted(arrivals),
        end,
        classes,
    )


# -- one replay ------------------------------------------------------------------------------


@dataclass
class Result:
    trace: str
    pool: str
    claims: int = 0
    hits: int = 0
    idle_vm_seconds: float = 0.0
    created: int = 0
    seconds: float = 0.0
    class_hits: list[int] = field(default_factory=list)  # warm hits within each class

    @property
    def hit_rate(self) -> float:
        return self.hits / self.claims if self.claims else 0.0

    @property
    def idle_vm_minutes_per_claim(self) -> float:
        return self.idle_vm_seconds / 60 / self.claims if self.claims else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "trace": self.trace,
            "pool": self.pool,
            "claims": self.claims,
            "warm_hits": self.hits,
            "hit_rate": round(self.hit_rate, 4),
            "idle_vm_minutes_per_claim": round(self.idle_vm_minutes_per_claim, 3),
            "environments_booted": self.created,
            "class_hits": self.class_hits,
            "wall_seconds": round(self.seconds, 1),
        }


@dataclass
class _Clock:
    now: float = START

    def __call__(self) -> float:
        return self.now


class _Workers:
    """The Celery port of the API's ``SessionLife``: each task goes straight to the replay."""

    def __init__(self, run: Callable[[str, dict[str, str]], None]) -> None:
        self._run = run

    def send_task(self, name: str, kwargs: dict[str, str], **_: Any) -> None:
        self._run(name, kwargs)


@dataclass
class _Replay:
    """The world around the prewarmer: boots finish after a sampled time, retirements stop
    the idle clock, claims come from the trace as creates through ``SessionLife.open``."""

    template: Template
    boot_times: Sequence[float]
    rng: random.Random
    clock: _Clock
    store: MemoryPoolStore
    result: Result
    booting: list[tuple[float, str]] = field(default_factory=list)  # (ready at, env id)
    born: dict[str, float] = field(default_factory=dict)  # env id -> reserved at
    life: SessionLife = field(init=False)

    def __post_init__(self) -> None:
        sessions = fakeredis.FakeRedis()
        self.life = SessionLife(
            store=RedisSessionStore(sessions),
            events=SessionEvents(sessions),
            queue=TaskQueue(_Workers(self.enqueue)),  # type: ignore[arg-type]
            clock=self.clock,
            pools=self.store,  # type: ignore[arg-type]
        )

    def enqueue(self, name: str, payload: Mapping[str, str]) -> None:
        """What the workers do with a task, as far as pool sizing is concerned."""
        payload = check_payload(name, payload)
        if name == PREWARM_ENVIRONMENT:
            env_id = payload["environment_id"]
            self.born[env_id] = self.clock.now
            self.result.created += 1
            heapq.heappush(
                self.booting, (self.clock.now + self.rng.choice(self.boot_times), env_id)
            )
        elif name == RETIRE_ENVIRONMENT:
            born = self.born.pop(payload["environment_id"], None)
            if born is not None:
                self.result.idle_vm_seconds += (self.clock.now - born) * len(self.template.vms)
        elif name == BIND_ENVIRONMENT:
            # The claimed environment's VMIs are relabelled: its claim is settled.
            session = self.life.get(payload["session_id"])
            assert session is not None
            assert session.warm
            self.store.forget_claim(KEY, session.environment_id)

    def boot_done(self, at: float, env_id: str) -> None:
        env = self.store.environment(env_id)
        if env is None or env_id not in self.born:
            return
        self.clock.now = at
        if self.store.mark_ready(KEY, env_id, vms=(), at=at):
            self.store.record_success(KEY, refill_seconds=at - env.created_at)

    def claim(self, at: float) -> bool:
        self.clock.now = at
        opened = self.life.open(
            user=f"learner{self.result.claims}",  # one each: nobody reconnects or is refused
            template=KEY.template,
            region=KEY.region,
            clocks=clocks_for(self.template),
            replace=False,
        )
        started = opened.session
        self.result.claims += 1
        if started.warm:
            self.result.hits += 1
            born = self.born.pop(started.environment_id)
            self.result.idle_vm_seconds += (at - born) * len(self.template.vms)
        return started.warm


def replay(
    trace: Trace,
    config: PoolConfig,
    *,
    label: str,
    template: Template,
    boot_times: Sequence[float],
    seed: int,
) -> Result:
    started = time.perf_counter()
    result = Result(trace.name, label, class_hits=[0] * len(trace.classes))
    clock = _Clock()
    store = MemoryPoolStore()
    store.set_config(KEY, config)
    world = _Replay(template, boot_times, random.Random(seed), clock, store, result)
    prewarmer = Prewarmer(
        store=store,
        templates={KEY.template: template},
        regions=[KEY.region],
        settings=PrewarmSettings(
            tick_seconds=TICK_SECONDS, batch=10, max_in_flight=40, max_warm_age=4 * 3600
        ),
        enqueue=world.enqueue,
        clock=clock,
    )
    arrivals = trace.arrivals
    next_arrival = 0
    tick = START
    while tick <= trace.end:
        # Everything that happens before this tick, in time order.
        while True:
            boot_at = world.booting[0][0] if world.booting else math.inf
            arrival_at = arrivals[next_arrival] if next_arrival < len(arrivals) else math.inf
            if min(boot_at, arrival_at) > tick:
                break
            if boot_at <= arrival_at:
                _, env_id = heapq.heappop(world.booting)
                world.boot_done(boot_at, env_id)
            else:
                if world.claim(arrival_at):
                    for index, (first, last) in enumerate(trace.classes):
                        if first <= arrival_at <= last:
                            result.class_hits[index] += 1
                next_arrival += 1
        clock.now = tick
        prewarmer.tick()
        tick += TICK_SECONDS
    vms = len(template.vms)
    result.idle_vm_seconds += sum(trace.end - born for born in world.born.values()) * vms
    result.seconds = time.perf_counter() - started
    return result


# -- the comparison --------------------------------------------------------------------------


@dataclass
class Comparison:
    trace: Trace
    adaptive: Result
    statics: list[Result]

    @property
    def smallest_static_meeting_target(self) -> Result | None:
        meeting = [r for r in self.statics if r.hit_rate >= HIT_RATE]
        return min(meeting, key=lambda r: int(r.pool.split()[-1])) if meeting else None

    @property
    def adaptive_wins(self) -> bool:
        best = self.smallest_static_meeting_target
        return self.adaptive.hit_rate >= HIT_RATE and (
            best is None or self.adaptive.idle_vm_seconds < best.idle_vm_seconds
        )


def compare(
    trace: Trace,
    *,
    template: Template,
    boot_times: Sequence[float],
    sizes: Sequence[int],
    seed: int,
    log: Callable[[str], None],
) -> Comparison:
    adaptive = replay(
        trace,
        PoolConfig(mode=PoolMode.ADAPTIVE, min_size=0, max_size=60, hit_rate=HIT_RATE),
        label="adaptive (0-60, 95%)",
        template=template,
        boot_times=boot_times,
        seed=seed,
    )
    log(_line(adaptive))
    statics: dict[int, Result] = {}

    def static(size: int) -> Result:
        if size not in statics:
            statics[size] = replay(
                trace,
                PoolConfig(size=size),
                label=f"static {size}",
                template=template,
                boot_times=boot_times,
                seed=seed,
            )
            log(_line(statics[size]))
        return statics[size]

    for size in sizes:
        static(size)
    # The smallest static size that meets the hit rate (hit rate grows with the size).
    low, high = 0, max(sizes)
    while static(high).hit_rate < HIT_RATE and high < 200:
        low, high = high, high * 2
    while high - low > 1:
        middle = (low + high) // 2
        if static(middle).hit_rate >= HIT_RATE:
            high = middle
        else:
            low = middle
    return Comparison(
        trace, adaptive, sorted(statics.values(), key=lambda r: int(r.pool.split()[-1]))
    )


def _print(line: str) -> None:
    print(line, flush=True)


def _line(result: Result) -> str:
    return (
        f"  {result.trace:<13} {result.pool:<22} hit {result.hit_rate:7.2%}   "
        f"idle VM-min/claim {result.idle_vm_minutes_per_claim:8.2f}   ({result.seconds:.0f} s)"
    )


def markdown(
    comparisons: Sequence[Comparison], *, boot_times: Sequence[float], quick: bool, seed: int
) -> str:
    ordered = sorted(boot_times)
    flags = " --quick" if quick else ""
    intro = (
        f"Command: `.venv/bin/python -m benchmarks.pool_bench --seed {seed}{flags} --write-docs` "
        "(`make bench` runs it without writing). Arrival traces are replayed on a simulated clock "
        "through the API's create (`SessionLife.open`) and the real `Prewarmer` (a tick "
        "every 5 s, batch 10, at most 40 booting) against the in-memory pool store, which passes "
        "the same contract tests as the Redis one. Boot times are sampled from the simulator's "
        "own controllers booting the `ubuntu` template on a fake clock with `--boot-seconds 20` "
        f"(median {statistics.median(ordered):.1f} s, P95 "
        f"{ordered[int(0.95 * len(ordered))]:.1f} s to Running and Ready, readiness probe "
        "included). Idle VM-minutes count every minute a pooled VM exists without a learner "
        "(booting, waiting, or booted and then retired), divided by the claims. Hit-rate target "
        f"95 %. Measured {datetime.now(UTC):%Y-%m-%d}; the figures are deterministic for a seed."
    )
    lines = [
        SECTION,
        "",
        *textwrap.wrap(intro, width=100, break_on_hyphens=False),
        "",
        "| trace | pool | claims | warm-hit rate | idle VM-min / claim |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for comparison in comparisons:
        best = comparison.smallest_static_meeting_target
        for result in [comparison.adaptive, *comparison.statics]:
            name = result.pool
            if result is best:
                name += " (smallest static ≥ 95 %)"
            lines.append(
                f"| {comparison.trace.name} | {name} | {result.claims} | "
                f"{result.hit_rate:.1%} | {result.idle_vm_minutes_per_claim:.2f} |"
            )
    lines += ["", "Traces:", ""]
    for comparison in comparisons:
        trace = comparison.trace
        lines.append(f"- `{trace.name}`: {trace.description}; {trace.weeks:g} week(s).")
    lines += [
        "",
        "Adaptive against the smallest static pool that reaches 95 % on the same trace:",
        "",
    ]
    for comparison in comparisons:
        best = comparison.smallest_static_meeting_target
        adaptive = comparison.adaptive
        if best is None:
            verdict = "no static size tried reaches 95 %"
        else:
            saving = 1 - adaptive.idle_vm_seconds / best.idle_vm_seconds
            verdict = (
                f"{best.pool}: {best.hit_rate:.1%} at {best.idle_vm_minutes_per_claim:.2f} "
                f"idle VM-min/claim; adaptive {adaptive.hit_rate:.1%} at "
                f"{adaptive.idle_vm_minutes_per_claim:.2f} ({saving:.0%} fewer idle VM-minutes)"
            )
        mark = "meets" if comparison.adaptive_wins else "MISSES"
        item = f"`{comparison.trace.name}` ({mark} the acceptance): {verdict}."
        if comparison.trace.classes:
            weeks = ", ".join(f"{hits}/30" for hits in adaptive.class_hits)
            item += (
                f" Warm hits per class, week by week, adaptive: {weeks}. The first class is met "
                "by reaction alone (a cold start outlasts most of its minute); from the second "
                "week the profile warms the pool before it arrives."
            )
        wrapped = textwrap.wrap(item, width=98, break_on_hyphens=False)
        lines += [f"- {wrapped[0]}", *(f"  {line}" for line in wrapped[1:])]
    return "\n".join(lines) + "\n"


def write_docs(section: str) -> None:
    """Replace the "Warm pools" section of docs/BENCHMARKS.md (or append it); the rest of the
    file belongs to other benchmarks."""
    text = DOCS.read_text() if DOCS.exists() else "# Benchmarks\n"
    start = text.find(SECTION + "\n")
    if start == -1:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        following = text.find("\n## ", start + len(SECTION))
        end = len(text) if following == -1 else following + 1
        text = text[:start] + section + ("\n" + text[end:] if following != -1 else "")
    DOCS.parent.mkdir(parents=True, exist_ok=True)
    DOCS.write_text(text)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pool_bench", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="shorter traces (a smoke run)")
    parser.add_argument("--write-docs", action="store_true", help=f"update {SECTION!r} in docs")
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    parser.add_argument("--seed", type=int, default=4)
    parser.add_argument("--only", help="run one trace: steady, diurnal or weekly-burst")
    args = parser.parse_args(argv)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL))

    template = load_templates(None)["ubuntu"]
    boot_times = simulator_boot_times(
        template, environments=2000, boot_seconds=BOOT_SECONDS, seed=args.seed
    )
    print(
        f"boot times from the simulator: median {statistics.median(boot_times):.1f} s, "
        f"max {max(boot_times):.1f} s over {len(boot_times)} environments",
        flush=True,
    )
    rng = random.Random(args.seed)
    scale = 0.5 if args.quick else 1.0
    traces = [
        (steady_trace(rng, 1 * scale), [1, 2, 4]),
        (diurnal_trace(rng, 2 * scale + (1 if not args.quick else 0)), [2, 4, 8]),
        (burst_trace(rng, 4 * scale), [1, 5, 10, 20]),
    ]
    traces = [(t, sizes) for t, sizes in traces if args.only in (None, t.name)]
    for trace, _ in traces:
        print(f"== {trace.name}: {trace.description} ({len(trace.arrivals)} claims)", flush=True)
    # One process per trace: the replays are independent and CPU-bound.
    with ProcessPoolExecutor(max_workers=min(len(traces), os.cpu_count() or 1)) as executor:
        futures = [
            executor.submit(
                compare,
                trace,
                template=template,
                boot_times=boot_times,
                sizes=sizes,
                seed=args.seed,
                log=_print,
            )
            for trace, sizes in traces
        ]
        comparisons = [future.result() for future in futures]
    section = markdown(comparisons, boot_times=boot_times, quick=args.quick, seed=args.seed)
    print()
    print(section)
    results = [r.to_dict() for c in comparisons for r in [c.adaptive, *c.statics]]
    print(json.dumps(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    if args.write_docs:
        write_docs(section)
    return 0 if all(c.adaptive_wins for c in comparisons) else 1


if __name__ == "__main__":
    sys.exit(main())
