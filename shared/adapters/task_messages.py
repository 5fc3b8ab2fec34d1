"""Task messages pushed straight onto the broker's Redis lists, as Celery would publish them.

``Celery.send_task`` costs about a millisecond of CPU per message on the Redis transport: kombu
builds a Redis client, a retry wrapper and a channel lookup around one ``LPUSH``, every time.
The API's warm claim does little else, so it builds the same message with Celery's own task
protocol (``as_task_v2``: headers, body) and kombu's own serializer, wraps it in the envelope
kombu's Redis transport stores (base64 body, delivery info naming the queue, a delivery tag),
and pushes it on the queue's list with the process's Redis client: a worker cannot tell it
from one ``send_task`` published (``tests/unit/test_task_messages.py`` holds the two equal).

Only for the Redis broker the client already talks to (``REDIS_URL`` is both), for messages
without a countdown, and at default priority; everything else goes through ``send_task``.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from typing import Any

from celery import Celery
from kombu.serialization import dumps as serialize
from kombu.utils.json import dumps as to_json
from kombu.utils.uuid import uuid

# Persistent, as Celery's default delivery mode is.
PERSISTENT = 2


def broker_message(app: Celery, name: str, kwargs: Mapping[str, Any], *, queue: str) -> str:
    """What ``app.send_task(name, kwargs=kwargs)`` leaves on ``queue``'s list (a new task id)."""
    task_id = uuid()
    headers, properties, body, _ = app.amqp.as_task_v2(
        task_id,
        name,
        kwargs=dict(kwargs),
        reply_to=app.thread_oid,
        root_id=task_id,
        ignore_result=None,
    )
    # kombu ships no type hints.
    content_type, content_encoding, data = serialize(body, serializer=app.conf.task_serializer)  # type: ignore[no-untyped-call]
    raw = data if isinstance(data, bytes) else data.encode(content_encoding)
    return str(
        to_json(  # type: ignore[no-untyped-call]
            {
                "body": base64.b64encode(raw).decode("ascii"),
                "content-encoding": content_encoding,
                "content-type": content_type,
                "headers": headers,
                "properties": {
                    **properties,
                    "delivery_mode": PERSISTENT,
                    "delivery_info": {"exchange": "", "routing_key": queue},
                    "priority": 0,
                    "body_encoding": "base64",
                    "delivery_tag": uuid(),
                },
            }
        )
    )
