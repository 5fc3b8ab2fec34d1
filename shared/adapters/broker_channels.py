"""kombu's Redis broker channel: one used after its connection was closed raises the connection
error it is, not an ``AttributeError``, so a worker rides out a Redis restart.

When a worker loses Redis, Celery's consumer closes the broken connection, which detaches the
connection's settings from its transport, while tasks still running on the worker's threads go
on to acknowledge their messages through the old channel. A channel that then needs a new
connection pool builds it from those settings, now ``None``: ``AttributeError: 'NoneType'
object has no attribute 'hostname'`` (kombu's ``Channel._connparams``). Celery does not count
that as a connection error, so the worker logged "Unrecoverable error" and exited instead of
reconnecting. As ``redis.ConnectionError`` the same moment is one kombu and Celery handle: an
acknowledgement that cannot be made is logged (the message is delivered again after the
visibility timeout, and every labvirt task is safe to repeat) and the consumer reconnects.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Final

import redis
from kombu.transport import redis as kombu_redis

# Marks the guarded method, so installing twice wraps it once.
_GUARDED: Final = "_labvirt_closed_connection_guard"


class ClosedBrokerConnection(redis.ConnectionError):
    """A broker channel used after Celery closed its connection."""


def guard_closed_broker_channels() -> None:
    """Make kombu's Redis channel (and the Sentinel one, which inherits it) raise
    ``ClosedBrokerConnection`` once its connection is closed. Idempotent; every labvirt
    process's Celery app (``shared.jobs.make_celery``) installs it."""
    channel = kombu_redis.Channel
    original: Callable[..., Any] = channel._connparams
    if getattr(original, _GUARDED, False):
        return

    @functools.wraps(original)  # kombu's own stays reachable as ``__wrapped__``
    def connparams(self: Any, asynchronous: bool = False) -> Any:
        transport = self.connection
        if transport is None or transport.client is None:
            raise ClosedBrokerConnection("this broker channel's connection was closed")
        return original(self, asynchronous=asynchronous)

    setattr(connparams, _GUARDED, True)
    setattr(channel, "_connparams", connparams)  # noqa: B010 - mypy refuses assigning a method
