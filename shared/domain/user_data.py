"""Cloud-init user data per environment, and the environment token it carries.

A template's user data holds placeholders (``shared.domain.templates``); the manifest builder
fills them in here. The environment token is a per-environment secret that only the
environment's VMs see, in their user data: the kubernetes template uses it as kubeadm's
bootstrap token. It is random and chosen once, when the session is opened or the pooled
environment reserved, and stored with that record (never in labels or annotations), so a
retried provision renders the same manifests.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from typing import Final

from shared.domain.templates import (
    ENVIRONMENT_DOMAIN_PLACEHOLDER,
    ENVIRONMENT_TOKEN_PLACEHOLDER,
    USER_DATA_PLACEHOLDER_PATTERN,
)

# The token lands in YAML and in shell commands: no quoting, spaces or leading dash possible.
_ENVIRONMENT_TOKEN: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
# kubeadm's bootstrap token: a public id and a secret, [a-z0-9]{6}.[a-z0-9]{16}.
KUBEADM_TOKEN: Final = re.compile(r"[a-z0-9]{6}\.[a-z0-9]{16}")
_TOKEN_ALPHABET: Final = "abcdefghijklmnopqrstuvwxyz0123456789"  # noqa: S105 - an alphabet


def new_environment_token() -> str:
    """A fresh random environment token in kubeadm's bootstrap-token shape (about 113 bits)."""
    token = "".join(secrets.choice(_TOKEN_ALPHABET) for _ in range(22))
    return f"{token[:6]}.{token[6:]}"


def legacy_environment_token(token_hash: str, environment_id: str) -> str:
    """The token labvirt derived before it stored one: only for sessions recorded back then,
    whose VMs already carry it (a retried provision must render the same manifests)."""
    digest = hashlib.sha256(f"{token_hash}:{environment_id}".encode()).hexdigest()
    return f"{digest[:6]}.{digest[6:22]}"


def render_user_data(
    user_data: str, *, environment_token: str, environment_domain: str | None
) -> str:
    """Cloud-init user data with the per-environment placeholders filled in.

    ``environment_domain`` is None for single-VM environments, which have no subdomain.
    """
    if _ENVIRONMENT_TOKEN.fullmatch(environment_token) is None:
        msg = "environment token must be 1-128 characters of [A-Za-z0-9._-], starting alphanumeric"
        raise ValueError(msg)
    values = {ENVIRONMENT_TOKEN_PLACEHOLDER: environment_token}
    if environment_domain is not None:
        values[ENVIRONMENT_DOMAIN_PLACEHOLDER] = environment_domain

    def substitute(match: re.Match[str]) -> str:
        name = match[1]
        if name not in values:
            raise ValueError(f"user data placeholder {match[0]!r} has no value here")
        return values[name]

    return USER_DATA_PLACEHOLDER_PATTERN.sub(substitute, user_data)
