"""A kubeconfig pointing kubectl and the official client at the simulator."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import yaml

CONTEXT = "labvirt-sim"
# The simulator authenticates nobody; clients like to send a token anyway.
TOKEN = "labvirt-sim-token"  # noqa: S105 - not a secret  # nosec B105


def kubeconfig_document(
    server_url: str, *, name: str = CONTEXT, namespace: str = "default", token: str = TOKEN
) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "preferences": {},
        "clusters": [{"name": name, "cluster": {"server": server_url}}],
        "users": [{"name": name, "user": {"token": token}}],
        "contexts": [
            {"name": name, "context": {"cluster": name, "user": name, "namespace": namespace}}
        ],
        "current-context": name,
    }


def write_kubeconfig(path: Path, server_url: str, **options: Any) -> None:
    """Write atomically (temp file, then rename), so a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(kubeconfig_document(server_url, **options), sort_keys=False)
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.chmod(temp, 0o600)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def server_url(path: Path) -> str:
    """The server URL of the current context of a kubeconfig."""
    doc = yaml.safe_load(Path(path).read_text())
    context = next(c for c in doc["contexts"] if c["name"] == doc["current-context"])
    cluster = next(c for c in doc["clusters"] if c["name"] == context["context"]["cluster"])
    return str(cluster["cluster"]["server"])
