"""The pool budget: how many VMs one region's warm pools may hold together.

Pools are sized one at a time; the budget (``LABVIRT_REGION_POOL_BUDGET_VMS``) bounds them
together, in VMs (an environment of a two-VM template counts two). A pool's claim on it is what
its configuration lets it hold: a static pool its size, an adaptive one its max (what it may
grow to), paused or not (a paused pool keeps what it holds). The admin API refuses a change
that takes a region's claims past the budget (``exceeds_budget``); the prewarmer clips the
targets it plans to the budget (``fit_to_budget``), so a budget lowered by configuration takes
effect at its next tick.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from shared.domain.pools.config import MAX_POOL_SIZE, PoolConfig, PoolMode


def claimed_vms(config: PoolConfig, *, vms_per_environment: int) -> int:
    """The VMs a pool's configuration lets it hold: its size, or its max when adaptive."""
    environments = config.size if config.mode is PoolMode.STATIC else config.max_size
    return environments * vms_per_environment


def exceeds_budget(
    *,
    current: PoolConfig,
    updated: PoolConfig,
    vms_per_environment: int,
    others_vms: int,
    budget_vms: int,
) -> bool:
    """Whether ``updated`` may not replace ``current``: it claims more than before and the
    region's pools would then claim more than the budget. A change that claims no more (a
    pause, a smaller size) is always allowed, even over a budget lowered since."""
    before = claimed_vms(current, vms_per_environment=vms_per_environment)
    after = claimed_vms(updated, vms_per_environment=vms_per_environment)
    return after > before and others_vms + after > budget_vms


def largest_fitting_size(*, budget_vms: int, others_vms: int, vms_per_environment: int) -> int:
    """The most environments one pool may be sized to beside the others' claims."""
    return max(0, min(MAX_POOL_SIZE, (budget_vms - others_vms) // vms_per_environment))


@dataclass(frozen=True)
class PoolWant:
    """What one pool of a region would hold this tick, before the budget."""

    template: str
    target: int
    vms_per_environment: int
    # Adaptive pools give way first: a static size is the operator's explicit commitment.
    elastic: bool

    def __post_init__(self) -> None:
        if self.target < 0 or self.vms_per_environment < 1:
            raise ValueError(f"{self.template}: need target >= 0 and at least one VM each")


def fit_to_budget(wants: Sequence[PoolWant], budget_vms: int) -> dict[str, int]:
    """Each pool's target once the region's pools hold at most ``budget_vms`` VMs together.

    Targets that fit are kept whole. Otherwise static pools are served first, then adaptive
    ones, each group round-robin one environment at a time in the order given (so no pool
    starves another) until every pool has its target or the next environment no longer fits.
    """
    allowed = {want.template: 0 for want in wants}
    if sum(w.target * w.vms_per_environment for w in wants) <= budget_vms:
        return {want.template: want.target for want in wants}
    left = budget_vms
    for elastic in (False, True):
        pending = [w for w in wants if w.elastic is elastic and w.target > 0]
        while pending:
            still = []
            for want in pending:
                if want.vms_per_environment > left:
                    continue  # ``left`` only shrinks: this pool gets nothing more
                allowed[want.template] += 1
                left -= want.vms_per_environment
                if allowed[want.template] < want.target:
                    still.append(want)
            pending = still
    return allowed
