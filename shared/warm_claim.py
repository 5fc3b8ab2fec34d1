"""The create path's first try: a warm environment from the session's pool.

One atomic claim in Redis (``RedisPoolStore.claim``) hands the oldest ready environment of the
pool to this session and no other. A hit makes the session ``ready`` and ``warm`` at once, its
clocks starting at the claim; the worker then relabels the VMIs (``labvirt.bind_environment``).
A miss costs one Redis call and the session goes cold. Hit or miss, the claim of a new arrival
is recorded: it is the demand adaptive pools learn from, and the hit rate operators read. A
create that replaces the user's live session claims like any other but records nothing: one
learner pressing "start again" fifty times is not fifty learners.
"""

from __future__ import annotations

from collections.abc import Sequence

from shared.adapters.pool_store import RedisPoolStore
from shared.domain.pools.config import PoolKey
from shared.domain.sessions import EnvironmentId, Session
from shared.metrics.series import series


def claim_warm_environment(
    pools: RedisPoolStore,
    session: Session,
    *,
    now: float,
    demand: bool = True,
    candidates: Sequence[str] | None = None,
) -> Session:
    """``session`` started in a warm environment of its pool, or unchanged on a miss;
    ``demand``: whether the claim counts as an arrival (hit or miss) for the pool;
    ``candidates``: the pool's oldest ready environments, if just read."""
    key = PoolKey(session.region, session.template)
    env = pools.claim(key, session_id=session.id, at=now, record=demand, candidates=candidates)
    if env is None:
        return session
    # Ready at the claim: from the session's opening to here (its clocks start at the claim).
    series().time_to_ready.labels(
        template=session.template, region=session.region, path="warm"
    ).observe(max(0.0, now - session.created_at))
    return session.warm_start(environment_id=EnvironmentId(env.id), vms=env.vms, at=now)
