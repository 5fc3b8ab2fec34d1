"""Nearest-rank percentiles, as every benchmark here reports them."""

from __future__ import annotations


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def quantiles_ms(values: list[float]) -> dict[str, float | None]:
    """p50 and p99 of durations in seconds, in milliseconds (None for no values)."""
    if not values:
        return {"p50": None, "p99": None}
    return {
        "p50": round(percentile(values, 0.5) * 1000, 1),
        "p99": round(percentile(values, 0.99) * 1000, 1),
    }
