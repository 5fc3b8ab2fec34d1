"""Pool configuration: which pools exist and how big each may be, validated where it is made."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any, Final

DEFAULT_HIT_RATE: Final = 0.95
MIN_HIT_RATE: Final = 0.5
MAX_HIT_RATE: Final = 0.999
MAX_POOL_SIZE: Final = 1000
DEFAULT_ADAPTIVE_MAX: Final = 50


@dataclass(frozen=True, order=True)
class PoolKey:
    """One pool: a template's warm environments in one region."""

    region: str
    template: str

    def __str__(self) -> str:
        return f"{self.region}/{self.template}"


class PoolMode(StrEnum):
    STATIC = "static"
    ADAPTIVE = "adaptive"


class InvalidPoolConfig(ValueError):
    """A pool configuration that cannot be honoured (the message says which field)."""


@dataclass(frozen=True, kw_only=True)
class PoolConfig:
    """How big one (region, template) pool should be, and whether it may grow at all."""

    mode: PoolMode = PoolMode.STATIC
    size: int = 0  # static pools
    min_size: int = 0  # adaptive pools: the target never leaves [min_size, max_size]
    max_size: int = DEFAULT_ADAPTIVE_MAX
    hit_rate: float = DEFAULT_HIT_RATE
    paused: bool = False

    def __post_init__(self) -> None:
        problems = []
        for name in ("size", "min_size", "max_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                problems.append(f"{name} must be a whole number")
            elif not 0 <= value <= MAX_POOL_SIZE:
                problems.append(f"{name} must be between 0 and {MAX_POOL_SIZE}, got {value}")
        if not problems and self.min_size > self.max_size:
            problems.append(f"min ({self.min_size}) must not exceed max ({self.max_size})")
        if not (
            isinstance(self.hit_rate, int | float) and MIN_HIT_RATE <= self.hit_rate <= MAX_HIT_RATE
        ):
            problems.append(
                f"hit_rate must be between {MIN_HIT_RATE} and {MAX_HIT_RATE}, got {self.hit_rate}"
            )
        if problems:
            raise InvalidPoolConfig("; ".join(problems))

    def target(self, aimed_for: int | None) -> int:
        """The target operators see: a static pool's size; an adaptive pool's last aim
        (``aimed_for``, the prewarmer's), its ``min_size`` until it aimed at all."""
        if self.mode is PoolMode.STATIC:
            return self.size
        return aimed_for if aimed_for is not None else self.min_size

    def to_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode.value,
            "size": self.size,
            "min": self.min_size,
            "max": self.max_size,
            "hit_rate": self.hit_rate,
            "paused": self.paused,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PoolConfig:
        defaults = cls()
        return cls(
            mode=PoolMode(data.get("mode", defaults.mode)),
            size=int(data.get("size", defaults.size)),
            min_size=int(data.get("min", defaults.min_size)),
            max_size=int(data.get("max", defaults.max_size)),
            hit_rate=float(data.get("hit_rate", defaults.hit_rate)),
            paused=bool(data.get("paused", defaults.paused)),
        )

    def changed(
        self,
        *,
        size: int | None = None,
        mode: PoolMode | None = None,
        min_size: int | None = None,
        max_size: int | None = None,
        hit_rate: float | None = None,
        paused: bool | None = None,
    ) -> PoolConfig:
        """This config with the given fields replaced (validated again); a ``size`` without a
        ``mode`` makes the pool static."""
        changes: dict[str, Any] = {
            name: value
            for name, value in (
                ("size", size),
                ("mode", mode),
                ("min_size", min_size),
                ("max_size", max_size),
                ("hit_rate", hit_rate),
                ("paused", paused),
            )
            if value is not None
        }
        if size is not None and mode is None:
            changes["mode"] = PoolMode.STATIC
        return replace(self, **changes)
