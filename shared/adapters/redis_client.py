"""Redis clients from ``REDIS_URL``: one server, or a primary found through Redis Sentinel.

    redis://[:password@]host:port/db            one server (rediss:// with TLS)
    sentinel://[:password@]h1:p1,h2:p2/name/db  the primary Sentinel knows as ``name``

Sessions, pools, events, tickets and the Celery broker all follow the same URL, so a failover
moves all of them: clients ask the sentinels for the current primary when a connection fails.
The password, when given, is the data servers'; sentinels are asked without one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote

import redis
import redis.asyncio
import redis.asyncio.sentinel
import redis.sentinel


class RedisUrlError(ValueError):
    """A ``REDIS_URL`` labvirt cannot use."""


@dataclass(frozen=True)
class SentinelTarget:
    sentinels: tuple[tuple[str, int], ...]
    service: str
    db: int
    password: str | None


def sentinel_target(url: str) -> SentinelTarget | None:
    """The Sentinel setup a ``sentinel://`` URL names; None for a plain Redis URL."""
    if not url.startswith("sentinel://"):
        return None
    rest = url[len("sentinel://") :]
    credentials, _, rest = rest.rpartition("@")
    hosts, _, path = rest.partition("/")
    parts = [p for p in path.split("/") if p]
    if not hosts or not parts:
        raise RedisUrlError(
            "REDIS_URL: a sentinel URL is sentinel://[:password@]host:port[,host:port]/name[/db]"
        )
    sentinels = []
    for host in hosts.split(","):
        name, _, port = host.rpartition(":")
        if not name or not port.isdigit():
            raise RedisUrlError(f"REDIS_URL: {host!r} is not host:port")
        sentinels.append((name, int(port)))
    db = parts[1] if len(parts) > 1 else "0"
    if not db.isdigit():
        raise RedisUrlError(f"REDIS_URL: database {db!r} is not a number")
    password = unquote(credentials.partition(":")[2]) if credentials else None
    return SentinelTarget(tuple(sentinels), parts[0], int(db), password or None)


def sync_client(url: str, **options: Any) -> redis.Redis:
    target = sentinel_target(url)
    if target is None:
        return redis.Redis.from_url(url, **options)
    # redis-py's Sentinel classes carry no type hints.
    sentinel = redis.sentinel.Sentinel(  # type: ignore[no-untyped-call]
        list(target.sentinels),
        socket_timeout=options.get("socket_timeout", 5),
        sentinel_kwargs={"socket_timeout": 5},
    )
    client: redis.Redis = sentinel.master_for(  # type: ignore[no-untyped-call]
        target.service, db=target.db, password=target.password, **options
    )
    return client


def async_client(url: str, **options: Any) -> redis.asyncio.Redis:
    target = sentinel_target(url)
    if target is None:
        return redis.asyncio.Redis.from_url(url, **options)
    sentinel = redis.asyncio.sentinel.Sentinel(  # type: ignore[no-untyped-call]
        list(target.sentinels), sentinel_kwargs={"socket_timeout": 5}
    )
    client: redis.asyncio.Redis = sentinel.master_for(
        target.service, db=target.db, password=target.password, **options
    )
    return client


def celery_broker(url: str) -> tuple[str, dict[str, Any]]:
    """The broker URL and transport options Celery (kombu) takes for ``REDIS_URL``."""
    target = sentinel_target(url)
    if target is None:
        return url, {}
    auth = f":{quote(target.password, safe='')}@" if target.password else ""
    broker = ";".join(f"sentinel://{auth}{h}:{p}/{target.db}" for h, p in target.sentinels)
    return broker, {"master_name": target.service, "sentinel_kwargs": {"socket_timeout": 5}}
