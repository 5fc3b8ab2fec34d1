"""Where a warm pool's data lives in Redis, and how an environment's record reads back.

Every key of a pool, its environments' records included, carries the pool's hash tag
(``hash_tags.pool_tag``): the pool's scripts and transactions touch several of them at once,
and on a Redis Cluster those must all be in one hash slot.
"""

from __future__ import annotations

import json
from typing import Any

from shared.adapters.hash_tags import pool_tag
from shared.domain.pools.config import PoolKey
from shared.domain.pools.environments import EnvironmentState, WarmEnvironment
from shared.domain.sessions import VmView


def pool_redis_key(prefix: str, key: PoolKey, part: str) -> str:
    return f"{prefix}:pool:{pool_tag(key.region, key.template)}:{part}"


def environment_key(key: PoolKey, env_id: str, *, prefix: str = "labvirt") -> str:
    """The record of a pooled environment (a hash), in its pool's hash slot."""
    return pool_redis_key(prefix, key, f"env:{env_id}")


def decode_environment(env_id: str, raw: dict[Any, Any]) -> WarmEnvironment:
    fields = {_text(k): _text(v) for k, v in raw.items()}
    vms = json.loads(fields["vms"]) if fields.get("vms") else []
    return WarmEnvironment(
        id=env_id,
        region=fields.get("region", ""),
        template=fields.get("template", ""),
        token=fields.get("token", ""),
        created_at=float(fields.get("created_at", 0.0)),
        state=EnvironmentState(fields.get("state", EnvironmentState.RETIRED)),
        ready_at=_optional_float(fields.get("ready_at")),
        vms=tuple(VmView.from_dict(vm) for vm in vms),
        session_id=fields.get("session_id"),
        claimed_at=_optional_float(fields.get("claimed_at")),
        unschedulable=fields.get("unschedulable") == "1",
    )


def _optional_float(value: str | None) -> float | None:
    return None if value is None else float(value)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
