"""Time to ready: from creation to the first ``ready``, summed up per template, warm or cold,
as the operators' dashboard charts it (``shared.domain.time_to_ready``, ``ops_chart``)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.api.ops_chart import nice_ceiling, ready_chart, seconds_text
from shared.domain.reasons import CloseReason
from shared.domain.retries import reopened
from shared.domain.sessions import EnvironmentId, Session, SessionState, VmView, open_session
from shared.domain.time_to_ready import ReadyTimes, percentile, ready_times, time_to_ready

NOW = 1_700_000_000.0
VM = VmView(name="ubuntu", hostname="ubuntu", ip="10.0.0.2", phase="Running", ready=True)


def booted(template: str, *, created: float, wait: float | None, warm: bool = False) -> Session:
    """A session created at ``created`` that became ready ``wait`` seconds later (None: never)."""
    session, _ = open_session(
        user="alice",
        template=template,
        region="local",
        max_lifetime_seconds=3600,
        idle_timeout_seconds=600,
        now=created,
    )
    if warm:
        return session.warm_start(environment_id=session.environment_id, vms=[VM], at=created)
    if wait is None:
        return session
    return session.mark_ready(vms=[VM], at=created + wait)


def test_time_to_ready_runs_from_creation_to_the_first_ready() -> None:
    session = booted("ubuntu", created=NOW, wait=42.0)
    ended = session.close(CloseReason.CLOSED, at=NOW + 100).finish(at=NOW + 110)

    assert time_to_ready(session) == 42.0
    assert time_to_ready(ended) == 42.0
    assert time_to_ready(booted("ubuntu", created=NOW, wait=None)) is None


def test_a_requeued_provisioning_counts_from_its_reopening() -> None:
    failed = booted("ubuntu", created=NOW, wait=None).transition(
        SessionState.FAILED, at=NOW + 300, reason="its VM failed"
    )
    again = reopened(failed, environment_id=EnvironmentId("e0e0e0e0e0"), at=NOW + 3000)

    assert time_to_ready(again.mark_ready(vms=[VM], at=NOW + 3040)) == 40.0
    assert time_to_ready(again) is None


def test_a_warm_claim_is_ready_at_creation() -> None:
    assert time_to_ready(booted("ubuntu", created=NOW, wait=None, warm=True)) == 0.0


def test_percentile_is_the_nearest_rank() -> None:
    values = [float(v) for v in range(1, 21)]  # 1..20

    assert percentile(values, 0.5) == 10.0
    assert percentile(values, 0.95) == 19.0
    assert percentile(values, 1.0) == 20.0
    assert percentile([7.0], 0.95) == 7.0
    with pytest.raises(ValueError, match="no values"):
        percentile([], 0.5)
    with pytest.raises(ValueError, match="not in"):
        percentile([1.0], 0.0)


@given(st.lists(st.floats(min_value=0, max_value=1e6), min_size=1, max_size=200))
def test_the_median_never_exceeds_the_95th_percentile_and_both_occurred(
    values: list[float],
) -> None:
    p50, p95 = percentile(values, 0.5), percentile(values, 0.95)

    assert min(values) <= p50 <= p95 <= max(values)
    assert p50 in values
    assert p95 in values


def test_ready_times_groups_by_template_and_start_and_keeps_the_newest() -> None:
    sessions = [
        booted("ubuntu", created=NOW + i, wait=10.0 + i) for i in range(10)
    ]  # cold: 10..19 s
    sessions += [booted("ubuntu", created=NOW + 20 + i, wait=None, warm=True) for i in range(3)]
    sessions += [booted("kubernetes", created=NOW + 30, wait=95.0)]
    sessions += [booted("kubernetes", created=NOW + 40, wait=None)]  # never ready: not counted
    sessions += [booted("ubuntu", created=NOW - 1000, wait=500.0)]  # too old for newest=14

    stats = ready_times(sessions, newest=14)

    assert stats == [
        ReadyTimes("kubernetes", warm=False, count=1, p50_seconds=95.0, p95_seconds=95.0),
        ReadyTimes("ubuntu", warm=False, count=10, p50_seconds=14.0, p95_seconds=19.0),
        ReadyTimes("ubuntu", warm=True, count=3, p50_seconds=0.0, p95_seconds=0.0),
    ]
    assert ready_times([], newest=10) == []


def test_the_chart_puts_every_row_on_one_round_scale() -> None:
    stats = [
        ReadyTimes("kubernetes", warm=False, count=4, p50_seconds=60.0, p95_seconds=130.0),
        ReadyTimes("ubuntu", warm=True, count=9, p50_seconds=0.2, p95_seconds=0.5),
    ]

    chart = ready_chart(stats)

    assert chart is not None
    slow, quick = chart.rows
    assert slow.p95_width == pytest.approx(chart.plot_width * 130 / 200)  # the scale ends at 200 s
    assert slow.p50_width == pytest.approx(chart.plot_width * 60 / 200)
    assert quick.p95_width < quick.p50_width + 1
    assert (slow.label, quick.label) == ("kubernetes · cold", "ubuntu · warm")
    assert (slow.p50_text, slow.p95_text) == ("60 s", "2.2 min")
    assert [tick.text for tick in chart.ticks] == [
        "0.0 s",
        "40 s",
        "80 s",
        "2.0 min",
        "2.7 min",
        "3.3 min",
    ]
    assert chart.rows[1].y > chart.rows[0].y
    assert chart.height > chart.axis_y
    assert ready_chart([]) is None


@given(st.floats(min_value=1e-6, max_value=1e9))
def test_the_scale_ends_on_a_round_figure_at_or_above_the_slowest(value: float) -> None:
    end = nice_ceiling(value)

    assert value <= end < value * 2.5
    mantissa = end / 10 ** math.floor(math.log10(end))
    assert round(mantissa, 6) in (1.0, 2.0, 5.0, 10.0)


def test_durations_read_as_an_operator_says_them() -> None:
    assert [seconds_text(s) for s in (0.04, 9.96, 12.4, 119, 150)] == [
        "0.0 s",
        "10.0 s",
        "12 s",
        "119 s",
        "2.5 min",
    ]
