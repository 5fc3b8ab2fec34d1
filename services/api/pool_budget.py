"""The region's pool budget where operators size pools (``PUT /v1/admin/pools/<template>``).

A size, or an adaptive max, that would let the region's warm pools hold more VMs than
``LABVIRT_REGION_POOL_BUDGET_VMS`` is refused before it is stored: 422 ``pool_budget_exceeded``
with the budget, what the other pools claim and the largest size that fits (the rules are
``shared.domain.pools.budget``'s). Two operators resizing two pools at the same moment may
both pass; the prewarmer clips its targets to the budget whatever is stored.
"""

from __future__ import annotations

from services.api.errors import ApiError
from shared.adapters.pool_store import RedisPoolStore
from shared.domain.pools.budget import claimed_vms, exceeds_budget, largest_fitting_size
from shared.domain.pools.config import PoolConfig, PoolKey, PoolMode
from shared.runtime import Runtime


def check_pool_budget(
    rt: Runtime, store: RedisPoolStore, key: PoolKey, *, current: PoolConfig, updated: PoolConfig
) -> None:
    """Raise the 422 when ``updated`` may not replace ``current`` within the region's budget."""
    budget = rt.settings.limits.region_pool_budget_vms
    vms = len(rt.templates[key.template].vms)
    others = {
        name: claimed_vms(
            store.config(PoolKey(key.region, name), default=template.pool),
            vms_per_environment=len(template.vms),
        )
        for name, template in sorted(rt.templates.items())
        if name != key.template
    }
    others_vms = sum(others.values())
    if not exceeds_budget(
        current=current,
        updated=updated,
        vms_per_environment=vms,
        others_vms=others_vms,
        budget_vms=budget,
    ):
        return
    field = "size" if updated.mode is PoolMode.STATIC else "max"
    wanted = updated.size if updated.mode is PoolMode.STATIC else updated.max_size
    largest = largest_fitting_size(
        budget_vms=budget, others_vms=others_vms, vms_per_environment=vms
    )
    raise ApiError(
        422,
        "pool_budget_exceeded",
        f"a {key.template} pool of {field} {wanted} may hold {wanted * vms} VMs; the pools of "
        f"region {key.region} may hold {budget} VMs in all and the others claim {others_vms}: "
        f"the largest {field} that fits is {largest}",
        details={
            "region": key.region,
            "budget_vms": budget,
            "other_pools_vms": others_vms,
            "other_pools": [{"template": t, "vms": n} for t, n in others.items() if n],
            "vms_per_environment": vms,
            "field": field,
            "largest_size": largest,
        },
        errors=[{"pointer": f"/{field}", "detail": f"at most {largest} fits the pool budget"}],
    )
