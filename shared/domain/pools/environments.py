"""One pooled environment: ``booting`` -> ``ready`` -> ``claimed``, or ``retired``."""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Final

from shared.domain.pools.config import PoolKey
from shared.domain.sessions import VmView
from shared.domain.user_data import new_environment_token


class EnvironmentState(StrEnum):
    BOOTING = "booting"
    READY = "ready"
    CLAIMED = "claimed"
    RETIRED = "retired"


_ENVIRONMENT_MOVES: Final[Mapping[EnvironmentState, frozenset[EnvironmentState]]] = {
    EnvironmentState.BOOTING: frozenset({EnvironmentState.READY, EnvironmentState.RETIRED}),
    EnvironmentState.READY: frozenset({EnvironmentState.CLAIMED, EnvironmentState.RETIRED}),
    # A claimed environment belongs to its session: the session's teardown removes it.
    EnvironmentState.CLAIMED: frozenset(),
    EnvironmentState.RETIRED: frozenset(),
}


class IllegalEnvironmentMove(ValueError):
    def __init__(self, current: EnvironmentState, wanted: EnvironmentState) -> None:
        super().__init__(f"a {current} pooled environment cannot become {wanted}")
        self.current = current
        self.wanted = wanted


def can_move(current: EnvironmentState, wanted: EnvironmentState) -> bool:
    return wanted in _ENVIRONMENT_MOVES[current]


@dataclass(frozen=True, kw_only=True)
class WarmEnvironment:
    """One pooled environment as the pool store records it."""

    id: str
    region: str
    template: str
    # Chosen once at creation, so a retried boot renders identical manifests.
    token: str = field(repr=False)
    created_at: float
    state: EnvironmentState = EnvironmentState.BOOTING
    ready_at: float | None = None
    vms: tuple[VmView, ...] = ()
    session_id: str | None = None
    claimed_at: float | None = None
    unschedulable: bool = False

    def moved(self, wanted: EnvironmentState) -> WarmEnvironment:
        if not can_move(self.state, wanted):
            raise IllegalEnvironmentMove(self.state, wanted)
        return replace(self, state=wanted)

    def ready(self, *, at: float, vms: Sequence[VmView]) -> WarmEnvironment:
        return replace(self.moved(EnvironmentState.READY), ready_at=at, vms=tuple(vms))

    def claimed(self, *, session_id: str, at: float) -> WarmEnvironment:
        return replace(self.moved(EnvironmentState.CLAIMED), session_id=session_id, claimed_at=at)


def new_warm_environment(*, key: PoolKey, now: float) -> WarmEnvironment:
    """A pooled environment about to be reserved: a fresh id, and a cloud-init token chosen
    once (kubeadm's bootstrap-token shape, [a-z0-9]{6}.[a-z0-9]{16}) so every retry of its
    boot renders the same manifests."""
    return WarmEnvironment(
        id=secrets.token_hex(5),
        region=key.region,
        template=key.template,
        token=new_environment_token(),
        created_at=now,
    )
