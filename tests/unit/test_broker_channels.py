"""A worker that loses Redis reconnects: a broker channel closed after Celery's consumer closed
its connection fails with a connection error, never the ``AttributeError`` that stopped it.

Against the suite's real Redis, with kombu's own Redis transport: a message delivered and not
yet acknowledged (a task still running) is on the channel when its connection's settings are
detached, as ``Connection.collect`` leaves them when Celery's consumer gives up a lost
connection. Closing the channel then tries to put the message back on the queue, which needs a
new connection pool.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from kombu import Connection, Consumer, Producer, Queue

from shared.adapters.broker_channels import ClosedBrokerConnection, guard_closed_broker_channels


@pytest.fixture
def delivered(
    redis_url: str, connect: Callable[[], redis.Redis]
) -> Iterator[tuple[Connection, list[Any]]]:
    """A connection whose default channel holds one delivered, unacknowledged message."""
    queue = Queue("broker-channels-test")
    with Connection(redis_url) as publisher:
        Producer(publisher.default_channel).publish(
            {"n": 1}, routing_key=queue.name, declare=[queue]
        )
    connection = Connection(redis_url)
    messages: list[Any] = []
    consumer = Consumer(
        connection.default_channel,
        queues=[queue],
        callbacks=[lambda _body, message: messages.append(message)],
        accept=["json"],
    )
    consumer.consume()
    while not messages:
        connection.drain_events(timeout=5)
    yield connection, messages
    connection.close()


def test_closing_a_channel_whose_connection_was_given_up_is_a_connection_error(
    delivered: tuple[Connection, list[Any]],
) -> None:
    guard_closed_broker_channels()
    connection, _ = delivered
    channel = connection.default_channel
    errors = connection.connection_errors
    channel.connection.client = None  # what Connection.collect() leaves behind

    # kombu's own reads the detached settings: the AttributeError Celery took as fatal.
    with pytest.raises(AttributeError, match="hostname"):
        type(channel)._connparams.__wrapped__(channel)
    with pytest.raises(ClosedBrokerConnection):
        channel._connparams()
    assert issubclass(ClosedBrokerConnection, errors)
    # What Celery's consumer does next: close the connection, ignoring connection errors. The
    # channel's close fails to give the message back (Redis keeps it among the unacknowledged,
    # delivered again after the visibility timeout); nothing escapes.
    connection.maybe_close_channel(channel)
    assert channel.closed


def test_the_guard_is_installed_once(delivered: tuple[Connection, list[Any]]) -> None:
    guard_closed_broker_channels()
    guard_closed_broker_channels()
    connection, _ = delivered
    channel = connection.default_channel
    channel.connection.client = None

    with pytest.raises(ClosedBrokerConnection):
        channel._connparams()
