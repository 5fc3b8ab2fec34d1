"""What Kubernetes accepts as label keys, label values, namespaces and domain names.

Pure checks shared by the manifest builders: each raises ``ValueError`` naming what was wrong,
so a bad input fails where labvirt builds an object, not at the API server.
"""

from __future__ import annotations

import re
from typing import Final

from shared.domain.templates import is_dns1123_label

# Kubernetes also allows an empty label value; labvirt never means "nothing" by one.
_LABEL_VALUE: Final = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?")
_DNS1123_SUBDOMAIN: Final = re.compile(
    r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*"
)
_LABEL_MAX_LENGTH: Final = 63
_LABEL_PREFIX_MAX_LENGTH: Final = 253


def is_dns1123_subdomain(value: str) -> bool:
    return _DNS1123_SUBDOMAIN.fullmatch(value) is not None


def require_dns1123_label(value: str, *, what: str) -> None:
    if not is_dns1123_label(value):
        raise ValueError(f"{what} must be a DNS-1123 label, got {value!r}")


def require_label_value(value: str, *, what: str) -> None:
    if len(value) > _LABEL_MAX_LENGTH or _LABEL_VALUE.fullmatch(value) is None:
        raise ValueError(f"{what} is not a valid Kubernetes label value: {value!r}")


def require_label_key(key: str) -> None:
    prefix, _, name = key.rpartition("/")
    valid_prefix = not prefix or (
        len(prefix) <= _LABEL_PREFIX_MAX_LENGTH and is_dns1123_subdomain(prefix)
    )
    valid_name = len(name) <= _LABEL_MAX_LENGTH and _LABEL_VALUE.fullmatch(name) is not None
    if not (valid_prefix and valid_name):
        raise ValueError(f"{key!r} is not a valid Kubernetes label key")
