"""Environment templates: what one learner's disposable environment is made of.

Templates are built by ``shared.domain.template_parsing``, which validates a whole document once,
at load time; everything here may assume a Template is sound.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import ROUND_CEILING, Decimal
from typing import Any, Final

from shared.domain.pools.config import PoolConfig

DNS1123_LABEL_MAX_LENGTH: Final = 63
_DNS1123_LABEL: Final = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")

# VM names end up in VMI names ("lv-<environment id>-<vm>", at most 63 characters); this budget
# leaves room for a 32-character environment id such as uuid4().hex.
MAX_VM_NAME_LENGTH: Final = 27

DEFAULT_MAX_LIFETIME_SECONDS: Final = 2 * 60 * 60
DEFAULT_IDLE_TIMEOUT_SECONDS: Final = 300
DEFAULT_STARTUP_TIMEOUT_SECONDS: Final = 600
DEFAULT_EXTEND_STEP_SECONDS: Final = 30 * 60
DEFAULT_HARD_DEADLINE_SECONDS: Final = 4 * 60 * 60

# Per-environment values the manifest builder substitutes into cloud-init user data.
ENVIRONMENT_TOKEN_PLACEHOLDER: Final = "environment_token"  # noqa: S105 - a name, not a secret
ENVIRONMENT_DOMAIN_PLACEHOLDER: Final = "environment_domain"
USER_DATA_PLACEHOLDERS: Final = frozenset(
    {ENVIRONMENT_TOKEN_PLACEHOLDER, ENVIRONMENT_DOMAIN_PLACEHOLDER}
)
USER_DATA_PLACEHOLDER_PATTERN: Final = re.compile(r"\{\{\s*([^{}]*?)\s*\}\}")

_QUANTITY: Final = re.compile(
    r"(?P<number>[0-9]+(?:\.[0-9]+)?)(?P<suffix>Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?"
)
_QUANTITY_MULTIPLIERS: Final[Mapping[str, int]] = {
    "": 1,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
    "Pi": 2**50,
    "Ei": 2**60,
    "k": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "P": 10**15,
    "E": 10**18,
}


@dataclass(frozen=True, kw_only=True)
class VmSpec:
    """One VM of an environment, as the template author described it."""

    name: str
    hostname: str
    image: str
    cpu_cores: int
    memory: str
    user_data: str
    # A KubeVirt probe dict; left out of the hash so templates stay usable as dict keys.
    readiness_probe: dict[str, Any] | None = field(default=None, hash=False)

    @property
    def memory_bytes(self) -> int:
        """Memory in bytes, for capacity arithmetic that must not parse quantities itself."""
        return quantity_to_bytes(self.memory)


@dataclass(frozen=True, kw_only=True)
class Template:
    """A kind of environment learners can ask for, with the time rules that bound it."""

    name: str
    description: str
    vms: tuple[VmSpec, ...]
    max_lifetime_seconds: int = DEFAULT_MAX_LIFETIME_SECONDS
    idle_timeout_seconds: int = DEFAULT_IDLE_TIMEOUT_SECONDS
    startup_timeout_seconds: int = DEFAULT_STARTUP_TIMEOUT_SECONDS
    extend_step_seconds: int = DEFAULT_EXTEND_STEP_SECONDS
    hard_deadline_seconds: int = DEFAULT_HARD_DEADLINE_SECONDS
    # Default sizing of this template's pool in every region (the admin API overrides it).
    pool: PoolConfig = field(default_factory=PoolConfig)

    @property
    def is_multi_vm(self) -> bool:
        """Multi-VM environments need shared DNS (a subdomain and a headless Service)."""
        return len(self.vms) > 1

    def vm(self, name: str) -> VmSpec:
        """The VM called ``name``; KeyError when the template has none."""
        for vm in self.vms:
            if vm.name == name:
                return vm
        raise KeyError(name)


def is_dns1123_label(value: str) -> bool:
    """True for names Kubernetes accepts as hostnames, label values and most object names."""
    return len(value) <= DNS1123_LABEL_MAX_LENGTH and _DNS1123_LABEL.fullmatch(value) is not None


def quantity_to_bytes(quantity: str) -> int:
    """Bytes in a Kubernetes memory quantity such as "2Gi" or "512M" (rounded up).

    Only the forms a template author would write are accepted: no exponents, no sign, no milli.
    """
    match = _QUANTITY.fullmatch(quantity)
    if match is None:
        msg = f"{quantity!r} is not a Kubernetes memory quantity like '2Gi' or '512Mi'"
        raise ValueError(msg)
    scaled = Decimal(match["number"]) * _QUANTITY_MULTIPLIERS[match["suffix"] or ""]
    return int(scaled.to_integral_value(rounding=ROUND_CEILING))


def user_data_placeholders(user_data: str) -> frozenset[str]:
    """Names of the ``{{ name }}`` placeholders in cloud-init user data."""
    return frozenset(USER_DATA_PLACEHOLDER_PATTERN.findall(user_data))
