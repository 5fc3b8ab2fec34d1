"""Test doubles of the ports labvirt's services talk through (Celery's ``send_task``)."""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass
from typing import Any

from celery.app.routes import Router

from shared.config import Settings
from shared.jobs import make_celery


@functools.cache
def _router() -> Router:
    # The routes do not depend on the settings: one router serves every double.
    return make_celery(Settings()).amqp.router


def queue_of(name: str) -> str:
    """The queue Celery's own router sends task ``name`` to (``task_routes``)."""
    return str(_router().route({}, name)["queue"].name)


@dataclass(frozen=True)
class SentTask:
    name: str
    payload: dict[str, Any]
    queue: str  # where Celery's router would have put the message
    countdown: float | None = None


class RecordingCelery:
    """The Celery port as ``shared.jobs.TaskQueue`` uses it: records each message, sends none.

    A message's queue is the one Celery's router picks from the real app's ``task_routes``, so
    a test that asserts the queue checks the routing labvirt ships.
    """

    def __init__(self, *, fail_with: Exception | None = None) -> None:
        self.sent: list[SentTask] = []
        self.fail_with = fail_with
        self._lock = threading.Lock()

    def send_task(
        self,
        name: str,
        args: Any = None,
        kwargs: dict[str, Any] | None = None,
        countdown: float | None = None,
        **options: Any,
    ) -> None:
        if self.fail_with is not None:
            raise self.fail_with
        assert not args, f"{name}: labvirt tasks take their payload as keyword arguments"
        queue = str(_router().route(dict(options), name, (), kwargs)["queue"].name)
        with self._lock:
            self.sent.append(SentTask(name, dict(kwargs or {}), queue, countdown))

    def named(self, name: str) -> list[SentTask]:
        with self._lock:
            return [task for task in self.sent if task.name == name]

    def payloads(self, name: str) -> list[dict[str, Any]]:
        return [task.payload for task in self.named(name)]

    def clear(self) -> None:
        with self._lock:
            self.sent.clear()
