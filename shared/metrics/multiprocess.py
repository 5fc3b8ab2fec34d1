"""prometheus_client's multiprocess mode for a process group: ``labvirt api``'s gunicorn
workers, ``labvirt worker``'s processes.

prometheus_client decides where values live when it is first imported, from
``PROMETHEUS_MULTIPROC_DIR``; so the entry point calls ``enable_multiprocess`` before it imports
anything that records (this module imports no prometheus_client at its top for that reason).
Each start makes a fresh directory, inside ``LABVIRT_METRICS_DIR`` or the system's temporary
one, so no value of an earlier run is ever merged in; the process that made it removes it
when it exits. A gunicorn worker that dies is marked dead (``mark_process_dead``), so its
live gauges stop counting.
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Final

from shared.config_env import ConfigError

MULTIPROCESS_ENV: Final = "PROMETHEUS_MULTIPROC_DIR"


def enable_multiprocess(parent: Path | None, *, process: str) -> Path:
    """Make this process group's fresh directory and point prometheus_client at it."""
    if "prometheus_client" in sys.modules:
        # Too late: its values would stay in this process's memory, unseen by a scrape.
        raise RuntimeError("enable_multiprocess must run before prometheus_client is imported")
    base = parent if parent is not None else Path(tempfile.gettempdir())
    try:
        base.mkdir(parents=True, exist_ok=True)
        directory = Path(tempfile.mkdtemp(prefix=f"labvirt-{process}-metrics-", dir=base))
    except OSError as exc:
        raise ConfigError(
            f"LABVIRT_METRICS_DIR={str(base)!r}: cannot make a metrics directory there ({exc})"
        ) from exc
    os.environ[MULTIPROCESS_ENV] = str(directory)
    atexit.register(_remove, directory, owner=os.getpid())
    return directory


def mark_process_dead(pid: int) -> None:
    """A worker process of the group exited: its live gauges no longer count."""
    from prometheus_client import multiprocess  # noqa: PLC0415 - after enable_multiprocess

    multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]


def _remove(directory: Path, *, owner: int) -> None:
    # Forked children (gunicorn's workers) inherit this handler; only the maker removes.
    if os.getpid() == owner:
        shutil.rmtree(directory, ignore_errors=True)
