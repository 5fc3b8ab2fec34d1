"""A task message pushed directly onto the broker's list is the one Celery itself publishes."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from typing import Any

import redis

from shared.config import Mode, Settings
from shared.jobs import BIND_ENVIRONMENT, PROVISION, TEARDOWN, TaskQueue, make_celery

PAYLOAD = {"session_id": "s-0123456789abcdef01234567"}
# What differs from one message to the next: ids, and the process that sent it.
PER_MESSAGE = {"id", "root_id", "origin"}


def sent(client: redis.Redis, queue: str) -> dict[str, Any]:
    raw = client.rpop(queue)
    assert raw is not None, f"nothing on {queue}"
    message: dict[str, Any] = json.loads(raw)
    return message


def comparable(message: dict[str, Any]) -> dict[str, Any]:
    headers = {k: v for k, v in message["headers"].items() if k not in PER_MESSAGE}
    properties = {
        k: v
        for k, v in message["properties"].items()
        if k not in {"correlation_id", "delivery_tag"}
    }
    body = json.loads(base64.b64decode(message["body"]))
    envelope = {k: v for k, v in message.items() if k not in {"headers", "properties", "body"}}
    return {"envelope": envelope, "headers": headers, "properties": properties, "body": body}


def test_a_direct_message_is_the_one_celery_publishes(
    connect: Callable[[], redis.Redis], redis_url: str
) -> None:
    client = connect()
    app = make_celery(Settings(mode=Mode.DEV, redis_url=redis_url))
    for name, queue in (
        (BIND_ENVIRONMENT, "provision"),
        (PROVISION, "provision"),
        (TEARDOWN, "teardown"),
    ):
        TaskQueue(app).enqueue(name, PAYLOAD)
        by_celery = sent(client, queue)
        TaskQueue(app, broker=client).enqueue(name, PAYLOAD)
        direct = sent(client, queue)

        assert comparable(direct) == comparable(by_celery)
        assert comparable(direct)["body"][1] == PAYLOAD
        task_id = direct["headers"]["id"]
        assert direct["headers"]["root_id"] == direct["properties"]["correlation_id"] == task_id
        assert direct["properties"]["delivery_tag"] != by_celery["properties"]["delivery_tag"]


def test_a_delayed_task_still_goes_through_celery(
    connect: Callable[[], redis.Redis], redis_url: str
) -> None:
    client = connect()
    app = make_celery(Settings(mode=Mode.DEV, redis_url=redis_url))
    TaskQueue(app, broker=client).enqueue(PROVISION, PAYLOAD, delay=30)
    message = sent(client, "provision")
    assert message["headers"]["eta"] is not None  # Celery's countdown, which a worker honours
