"""Injected trouble: latency, failed requests and the counters that report them.

The faults change at runtime (``PUT /_sim/faults``) and every roll of the dice comes from the
server's one seeded RNG, so a seeded run fails the same requests each time. The boot failure
rate belongs to the KubeVirt controllers; the faults only mirror it.
"""

from __future__ import annotations

import asyncio
import math
import random
from dataclasses import dataclass, field
from typing import Any, Protocol

from labvirt.sim.errors import (
    ApiError,
    bad_request,
    internal_error,
    service_unavailable,
    too_many_requests,
)


class Controllers(Protocol):
    """What the server needs of the KubeVirt controllers (``labvirt.sim.controllers.KubeVirt``)."""

    boot_failure_rate: float

    def crash(self, namespace: str, name: str) -> dict[str, Any]: ...


@dataclass
class Faults:
    """Injected trouble; changed at runtime through ``PUT /_sim/faults``."""

    error_rate: float = 0.0
    latency_ms: float = 0.0
    watch_drop_rate: float = 0.0
    boot_failure_rate: float = 0.0  # mirrored into the controllers, which own it


_FAULT_LIMITS = {
    "error_rate": 1.0,
    "boot_failure_rate": 1.0,
    "watch_drop_rate": 1.0,
    "latency_ms": 60_000.0,
}


@dataclass
class Counters:
    """What ``/_sim/stats`` reports of the traffic served and the trouble injected into it."""

    requests: int = 0
    injected_errors: int = 0
    dropped_watches: int = 0
    watches_started: int = 0
    by_code: dict[int, int] = field(default_factory=dict)


class FaultInjector:
    """Applies the current ``Faults`` to requests and keeps them in step with the controllers."""

    def __init__(
        self,
        faults: Faults | None,
        controllers: Controllers | None,
        rng: random.Random,
        counters: Counters,
    ) -> None:
        if faults is None:
            rate = controllers.boot_failure_rate if controllers is not None else 0.0
            faults = Faults(boot_failure_rate=rate)
        elif controllers is not None:
            controllers.boot_failure_rate = faults.boot_failure_rate
        self.faults = faults
        self._controllers = controllers
        self._rng = rng
        self._counters = counters

    async def delay(self) -> None:
        if self.faults.latency_ms > 0:
            await asyncio.sleep(self.faults.latency_ms / 1000.0)

    def strike(self, *, is_watch: bool) -> bool:
        """Raise an injected error at ``error_rate``; for half the struck watches answer True
        instead: the watch starts and is dropped soon after."""
        if self.faults.error_rate > 0 and self._rng.random() < self.faults.error_rate:
            if is_watch and self._rng.random() < 0.5:
                return True
            raise self._injected_error()
        return False

    def _injected_error(self) -> ApiError:
        self._counters.injected_errors += 1
        roll = self._rng.random()
        if roll < 0.5:
            return too_many_requests(1)
        if roll < 0.75:
            error = service_unavailable()
            error.headers["Retry-After"] = "1"
            return error
        return internal_error()

    def settings(self) -> dict[str, float]:
        if self._controllers is not None:
            self.faults.boot_failure_rate = self._controllers.boot_failure_rate
        return {
            "error_rate": self.faults.error_rate,
            "boot_failure_rate": self.faults.boot_failure_rate,
            "latency_ms": self.faults.latency_ms,
            "watch_drop_rate": self.faults.watch_drop_rate,
        }

    def update(self, changes: Any) -> dict[str, float]:
        """Validate all of a partial update, then apply it; 400 and no change when invalid."""
        if not isinstance(changes, dict):
            raise bad_request("faults must be a JSON object")
        validated: dict[str, float] = {}
        for key, value in changes.items():
            if key not in _FAULT_LIMITS:
                raise bad_request(
                    f"unknown fault {key!r}: expected one of {', '.join(sorted(_FAULT_LIMITS))}"
                )
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not math.isfinite(value)
                or not 0 <= value <= _FAULT_LIMITS[key]
            ):
                raise bad_request(
                    f"invalid {key}: {value!r}: must be a number between 0 and "
                    f"{_FAULT_LIMITS[key]:g}"
                )
            validated[key] = float(value)
        for key, value in validated.items():
            setattr(self.faults, key, value)
        if "boot_failure_rate" in validated and self._controllers is not None:
            self._controllers.boot_failure_rate = validated["boot_failure_rate"]
        return self.settings()
