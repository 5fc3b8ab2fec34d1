"""The create path's first try: a warm environment from the session's pool, or a cold start.

One atomic claim in Redis (``RedisPoolStore.claim``) hands the oldest ready environment of the
pool to this session and no other. A hit makes the session ``ready`` and ``warm`` at once, its
clocks starting now; the worker then relabels the VMIs (``labvirt.bind_environment``). A miss
costs one Redis call and the session goes the cold way. Hit or miss, the claim is recorded:
it is the demand adaptive pools learn from.
"""

from __future__ import annotations

import structlog

from shared.domain.pools import PoolKey
from shared.domain.sessions import EnvironmentId, Session
from shared.jobs import BIND_ENVIRONMENT, PROVISION
from shared.runtime import Runtime

log = structlog.get_logger(__name__)


def claim_warm_environment(rt: Runtime, session: Session) -> Session:
    """``session`` started in a warm environment of its pool, or unchanged on a miss."""
    if rt.pools is None:
        return session
    key = PoolKey(session.region, session.template)
    now = rt.clock()
    env = rt.pools.claim(key, session_id=session.id, at=now)
    rt.pools.record_claim(key, session_id=session.id, hit=env is not None, at=now)
    if env is None:
        return session
    log.info("pool.claimed", pool=str(key), environment_id=env.id, session_id=session.id)
    return session.warm_start(environment_id=EnvironmentId(env.id), vms=env.vms, at=now)


def first_task(session: Session) -> str:
    """What the worker does first for a new session: relabel a warm environment, or boot one."""
    return BIND_ENVIRONMENT if session.warm else PROVISION
