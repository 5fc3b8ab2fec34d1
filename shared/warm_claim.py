"""The create path's first try: a warm environment from the session's pool.

One atomic claim in Redis (``RedisPoolStore.claim``) hands the oldest ready environment of the
pool to this session and no other. A hit makes the session ``ready`` and ``warm`` at once, its
clocks starting at the claim; the worker then relabels the VMIs (``labvirt.bind_environment``).
A miss costs one Redis call and the session goes cold. Hit or miss, the claim is recorded: it
is the demand adaptive pools learn from.
"""

from __future__ import annotations

import structlog

from shared.adapters.pool_store import RedisPoolStore
from shared.domain.pools.config import PoolKey
from shared.domain.sessions import EnvironmentId, Session

log = structlog.get_logger(__name__)


def claim_warm_environment(pools: RedisPoolStore, session: Session, *, now: float) -> Session:
    """``session`` started in a warm environment of its pool, or unchanged on a miss."""
    key = PoolKey(session.region, session.template)
    env = pools.claim(key, session_id=session.id, at=now)
    pools.record_claim(key, session_id=session.id, hit=env is not None, at=now)
    if env is None:
        return session
    log.info("pool.claimed", pool=str(key), environment_id=env.id, session_id=session.id)
    return session.warm_start(environment_id=EnvironmentId(env.id), vms=env.vms, at=now)
