"""The dashboard's time-to-ready chart, laid out for an inline SVG the page template draws.

One row per (template, warm or cold): a bar to the 95th percentile with the median drawn
over it, on one scale for every row so that rows compare at a glance. Coordinates are
computed here; the template only writes them out (no script draws anything).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from shared.domain.time_to_ready import ReadyTimes

WIDTH: Final = 720
LABEL_WIDTH: Final = 190
RIGHT_MARGIN: Final = 70  # room for the p95 figure after the longest bar
ROW_HEIGHT: Final = 30
TOP: Final = 8
AXIS_HEIGHT: Final = 26
TICKS: Final = 5


@dataclass(frozen=True)
class ChartRow:
    label: str
    count: int
    warm: bool
    y: float
    p50_width: float
    p95_width: float
    p50_text: str
    p95_text: str


@dataclass(frozen=True)
class Tick:
    x: float
    text: str


@dataclass(frozen=True)
class ReadyChart:
    width: int
    height: int
    plot_left: int
    plot_width: int
    axis_y: float
    bar_height: float
    rows: tuple[ChartRow, ...]
    ticks: tuple[Tick, ...]


def seconds_text(seconds: float) -> str:
    """A duration as an operator reads it: 0.4 s, 12 s, 3.5 min."""
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min"


def nice_ceiling(value: float) -> float:
    """The smallest 1, 2 or 5 times a power of ten that is at least ``value`` (the scale's
    end, so the ticks fall on round figures)."""
    if value <= 0:
        return 1.0
    power = 10.0 ** math.floor(math.log10(value))
    for step in (1.0, 2.0, 5.0, 10.0):
        if value <= step * power:
            return step * power
    return 10.0 * power  # not reached: value <= 10 * power by the choice of power


def ready_chart(stats: Sequence[ReadyTimes]) -> ReadyChart | None:
    """The chart of ``stats``; None when no recent session became ready."""
    if not stats:
        return None
    plot_width = WIDTH - LABEL_WIDTH - RIGHT_MARGIN
    scale = nice_ceiling(max(s.p95_seconds for s in stats))
    rows = tuple(
        ChartRow(
            label=f"{s.template} · {'warm' if s.warm else 'cold'}",
            count=s.count,
            warm=s.warm,
            y=TOP + index * ROW_HEIGHT,
            p50_width=round(s.p50_seconds / scale * plot_width, 1),
            p95_width=round(s.p95_seconds / scale * plot_width, 1),
            p50_text=seconds_text(s.p50_seconds),
            p95_text=seconds_text(s.p95_seconds),
        )
        for index, s in enumerate(stats)
    )
    axis_y = TOP + len(rows) * ROW_HEIGHT
    ticks = tuple(
        Tick(
            x=round(LABEL_WIDTH + plot_width * step / TICKS, 1),
            text=seconds_text(scale * step / TICKS),
        )
        for step in range(TICKS + 1)
    )
    return ReadyChart(
        width=WIDTH,
        height=int(axis_y + AXIS_HEIGHT),
        plot_left=LABEL_WIDTH,
        plot_width=plot_width,
        axis_y=axis_y,
        bar_height=ROW_HEIGHT * 0.6,
        rows=rows,
        ticks=ticks,
    )
