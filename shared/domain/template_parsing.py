"""Template documents into Templates, with every check a template must pass.

Templates arrive as plain dicts (reading YAML is an adapter's job). They are validated once, at
load time, so a typo stops the service from starting instead of failing a learner's request
minutes later inside the cluster.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Final, NoReturn

from shared.domain.pools.config import InvalidPoolConfig, PoolConfig, PoolMode
from shared.domain.templates import (
    DEFAULT_EXTEND_STEP_SECONDS,
    DEFAULT_HARD_DEADLINE_SECONDS,
    DEFAULT_IDLE_TIMEOUT_SECONDS,
    DEFAULT_MAX_LIFETIME_SECONDS,
    DEFAULT_STARTUP_TIMEOUT_SECONDS,
    ENVIRONMENT_DOMAIN_PLACEHOLDER,
    MAX_VM_NAME_LENGTH,
    USER_DATA_PLACEHOLDERS,
    Template,
    VmSpec,
    is_dns1123_label,
    quantity_to_bytes,
    user_data_placeholders,
)

# Below this no cloud image boots far enough to answer a readiness probe.
MIN_MEMORY_BYTES: Final = 64 * 2**20

# cloud-init ignores user data whose first line it does not recognise, silently.
_USER_DATA_HEADERS: Final = (
    "#cloud-config",
    "#!",
    "#include",
    "#cloud-boothook",
    "#part-handler",
    "Content-Type:",
)

_PROBE_HANDLERS: Final = ("exec", "guestAgentPing", "httpGet", "tcpSocket")
# Probe knob -> smallest value KubeVirt accepts.
_PROBE_INT_FIELDS: Final[Mapping[str, int]] = {
    "initialDelaySeconds": 0,
    "periodSeconds": 1,
    "timeoutSeconds": 1,
    "successThreshold": 1,
    "failureThreshold": 1,
}
_MAX_PORT: Final = 65535

_VM_KEYS: Final = frozenset(
    {"name", "hostname", "image", "cpu_cores", "memory", "user_data", "readiness_probe"}
)
_TEMPLATE_KEYS: Final = frozenset(
    {
        "description",
        "vms",
        "max_lifetime_seconds",
        "idle_timeout_seconds",
        "startup_timeout_seconds",
        "extend_step_seconds",
        "hard_deadline_seconds",
        "pool",
    }
)
# A template's warm pool, as its author sizes it: ``size`` (static) or adaptive bounds.
_POOL_KEYS: Final = frozenset({"mode", "size", "min", "max", "hit_rate"})


class TemplateError(ValueError):
    """A template document is malformed; the message names the template and the field."""


def parse_templates(data: Mapping[str, object]) -> dict[str, Template]:
    """Templates of a document ``{"templates": {name: {...}, ...}}``, keyed by name."""
    if not isinstance(data, Mapping):
        raise TemplateError(f"templates document: must be a mapping, got {_kind(data)}")
    unknown = sorted(str(key) for key in data if key != "templates")
    if unknown:
        raise TemplateError(f"templates document: unknown keys {', '.join(unknown)}")
    templates = data.get("templates")
    if not isinstance(templates, Mapping):
        msg = (
            "templates document: 'templates' must be a mapping of name to template, "
            f"got {_kind(templates)}"
        )
        raise TemplateError(msg)
    if not templates:
        raise TemplateError("templates document: 'templates' defines no template")
    parsed: dict[str, Template] = {}
    for name, body in templates.items():
        if not isinstance(name, str):
            raise TemplateError(f"templates document: template name {name!r} is not a string")
        if not isinstance(body, Mapping):
            raise TemplateError(f"template {name!r}: must be a mapping, got {_kind(body)}")
        parsed[name] = parse_template(name, body)
    return parsed


def parse_template(name: str, data: Mapping[str, object]) -> Template:
    """Validate one template body (a plain dict as loaded from YAML) and build its Template."""
    where = f"template {name!r}"
    if not is_dns1123_label(name):
        raise TemplateError(f"{where}: name must be a DNS-1123 label (it becomes a label value)")
    fields = _Fields(data, where=where, allowed=_TEMPLATE_KEYS)

    description = fields.string("description", default="")
    vms = _parse_vms(fields.required("vms"), where=where)
    lifetimes = {
        key: fields.positive_int(key, default=default)
        for key, default in (
            ("max_lifetime_seconds", DEFAULT_MAX_LIFETIME_SECONDS),
            ("idle_timeout_seconds", DEFAULT_IDLE_TIMEOUT_SECONDS),
            ("startup_timeout_seconds", DEFAULT_STARTUP_TIMEOUT_SECONDS),
            ("extend_step_seconds", DEFAULT_EXTEND_STEP_SECONDS),
            ("hard_deadline_seconds", DEFAULT_HARD_DEADLINE_SECONDS),
        )
    }
    # Extensions may push the end out to the hard deadline, never pull it before the first one.
    if lifetimes["hard_deadline_seconds"] < lifetimes["max_lifetime_seconds"]:
        msg = (
            f"{where}, field 'hard_deadline_seconds': must be at least max_lifetime_seconds "
            f"({lifetimes['max_lifetime_seconds']}), got {lifetimes['hard_deadline_seconds']}"
        )
        raise TemplateError(msg)
    if len(vms) == 1:
        _reject_domain_placeholder(vms[0], where=where)
    pool = _parse_pool(fields.get("pool"), where=where)
    return Template(name=name, description=description, vms=vms, pool=pool, **lifetimes)


def _parse_pool(value: object, *, where: str) -> PoolConfig:
    """``pool: {size: N}`` or ``pool: {mode: adaptive, min: a, max: b, hit_rate: h}``."""
    if value is None:
        return PoolConfig()
    if not isinstance(value, Mapping):
        raise TemplateError(f"{where}, field 'pool': must be a mapping, got {_kind(value)}")
    fields = _Fields(value, where=f"{where}, pool", allowed=_POOL_KEYS)
    mode = fields.string(
        "mode", default=PoolMode.ADAPTIVE if "min" in value or "max" in value else PoolMode.STATIC
    )
    if mode not in set(PoolMode):
        fields.fail("mode", f"must be one of {', '.join(PoolMode)}, got {mode!r}")
    counts: dict[str, int] = {}
    for key in ("size", "min", "max"):
        number = fields.get(key)
        if number is None:
            continue
        if not isinstance(number, int) or isinstance(number, bool):
            fields.fail(key, f"must be a whole number, got {_kind(number)} {number!r}")
        counts[key] = number
    if mode == PoolMode.STATIC and ("min" in counts or "max" in counts):
        fields.fail("mode", "min and max size adaptive pools; a static pool has a size")
    if mode == PoolMode.ADAPTIVE and "size" in counts:
        fields.fail("size", "sizes a static pool; an adaptive pool has min and max")
    hit_rate = fields.get("hit_rate")
    if hit_rate is not None and (
        isinstance(hit_rate, bool) or not isinstance(hit_rate, int | float)
    ):
        fields.fail("hit_rate", f"must be a number, got {_kind(hit_rate)} {hit_rate!r}")
    defaults = PoolConfig()
    try:
        return PoolConfig(
            mode=PoolMode(mode),
            size=counts.get("size", defaults.size),
            min_size=counts.get("min", defaults.min_size),
            max_size=counts.get("max", defaults.max_size),
            hit_rate=float(hit_rate) if hit_rate is not None else defaults.hit_rate,
        )
    except InvalidPoolConfig as error:
        raise TemplateError(f"{where}, field 'pool': {error}") from error


def _parse_vms(value: object, *, where: str) -> tuple[VmSpec, ...]:
    if not isinstance(value, Sequence) or isinstance(value, str | bytes):
        raise TemplateError(f"{where}, field 'vms': must be a list of VMs, got {_kind(value)}")
    if not value:
        raise TemplateError(f"{where}, field 'vms': must list at least one VM")
    vms = tuple(_parse_vm(item, index=index, where=where) for index, item in enumerate(value))
    for attribute in ("name", "hostname"):
        seen: set[str] = set()
        for vm in vms:
            current = str(getattr(vm, attribute))
            if current in seen:
                msg = f"{where}, field 'vms': duplicate VM {attribute} {current!r}"
                raise TemplateError(msg)
            seen.add(current)
    return vms


def _parse_vm(data: object, *, index: int, where: str) -> VmSpec:
    if not isinstance(data, Mapping):
        raise TemplateError(f"{where}, field 'vms[{index}]': must be a mapping, got {_kind(data)}")
    raw_name = data.get("name")
    label = f"vm {raw_name!r}" if isinstance(raw_name, str) else f"vms[{index}]"
    fields = _Fields(data, where=f"{where}, {label}", allowed=_VM_KEYS)

    name = fields.string("name")
    if not is_dns1123_label(name) or len(name) > MAX_VM_NAME_LENGTH:
        fields.fail(
            "name",
            f"must be a DNS-1123 label of at most {MAX_VM_NAME_LENGTH} characters, got {name!r}",
        )
    hostname = fields.string("hostname", default=name)
    if not is_dns1123_label(hostname):
        fields.fail("hostname", f"must be a DNS-1123 label, got {hostname!r}")
    image = fields.string("image")
    if any(character.isspace() for character in image):
        fields.fail("image", f"must be a container image reference, got {image!r}")
    cpu_cores = fields.positive_int("cpu_cores")
    memory = fields.string("memory")
    try:
        memory_bytes = quantity_to_bytes(memory)
    except ValueError as error:
        fields.fail("memory", str(error))
    if memory_bytes < MIN_MEMORY_BYTES:
        fields.fail("memory", f"must be at least 64Mi, got {memory!r}")
    user_data = fields.string("user_data")
    if not user_data.startswith(_USER_DATA_HEADERS):
        fields.fail(
            "user_data",
            "must start with a cloud-init header such as '#cloud-config' or '#!' "
            "(cloud-init ignores anything else)",
        )
    unknown = sorted(user_data_placeholders(user_data) - USER_DATA_PLACEHOLDERS)
    if unknown:
        known = ", ".join(sorted(USER_DATA_PLACEHOLDERS))
        fields.fail("user_data", f"unknown placeholders {', '.join(unknown)} (known: {known})")
    probe = fields.get("readiness_probe")
    readiness_probe = None if probe is None else _parse_probe(probe, fields)
    return VmSpec(
        name=name,
        hostname=hostname,
        image=image,
        cpu_cores=cpu_cores,
        memory=memory,
        user_data=user_data,
        readiness_probe=readiness_probe,
    )


def _parse_probe(value: object, fields: _Fields) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        fields.fail("readiness_probe", f"must be a KubeVirt probe mapping, got {_kind(value)}")
    allowed = set(_PROBE_HANDLERS) | set(_PROBE_INT_FIELDS)
    unknown = sorted(str(key) for key in value if key not in allowed)
    if unknown:
        fields.fail("readiness_probe", f"unknown keys {', '.join(unknown)}")
    handlers = [key for key in _PROBE_HANDLERS if key in value]
    if len(handlers) != 1:
        fields.fail(
            "readiness_probe",
            f"must set exactly one of {', '.join(_PROBE_HANDLERS)}, got {handlers or 'none'}",
        )
    for key, minimum in _PROBE_INT_FIELDS.items():
        if key in value:
            number = value[key]
            if not _is_int(number) or number < minimum:
                fields.fail("readiness_probe", f"{key} must be an integer >= {minimum}")
    handler = value[handlers[0]]
    if not isinstance(handler, Mapping):
        fields.fail("readiness_probe", f"{handlers[0]} must be a mapping, got {_kind(handler)}")
    if handlers[0] == "tcpSocket":
        _check_tcp_socket(handler, fields)
    return {str(key): _plain(item, fields) for key, item in value.items()}


def _check_tcp_socket(handler: Mapping[Any, Any], fields: _Fields) -> None:
    unknown = sorted(str(key) for key in handler if key not in {"port", "host"})
    if unknown:
        fields.fail("readiness_probe", f"tcpSocket has unknown keys {', '.join(unknown)}")
    port = handler.get("port")
    valid_number = isinstance(port, int) and not isinstance(port, bool) and 1 <= port <= _MAX_PORT
    valid_name = isinstance(port, str) and bool(port)
    if not (valid_number or valid_name):
        fields.fail("readiness_probe", f"tcpSocket.port must be 1-65535 or a name, got {port!r}")


def _plain(value: object, fields: _Fields) -> object:
    """A deep, JSON-shaped copy, so manifests never share mutable state with a template."""
    if isinstance(value, Mapping):
        return {str(key): _plain(item, fields) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(item, fields) for item in value]
    if not (value is None or isinstance(value, str | int | float | bool)):
        fields.fail("readiness_probe", f"holds a {_kind(value)}, which is not JSON data")
    return value


def _reject_domain_placeholder(vm: VmSpec, *, where: str) -> None:
    # Only multi-VM environments get a subdomain and a headless Service to resolve names in.
    if ENVIRONMENT_DOMAIN_PLACEHOLDER in user_data_placeholders(vm.user_data):
        msg = (
            f"{where}, vm {vm.name!r}, field 'user_data': {{{{ environment_domain }}}} "
            "is only available in multi-VM templates"
        )
        raise TemplateError(msg)


def _is_int(value: object) -> bool:
    # YAML's true/false are ints to Python; a boolean where a number belongs is a typo.
    return isinstance(value, int) and not isinstance(value, bool)


def _kind(value: object) -> str:
    return "nothing" if value is None else type(value).__name__


_MISSING: Final = object()


class _Fields:
    """Reads one mapping, turning every problem into a TemplateError that says where it is."""

    def __init__(self, data: Mapping[Any, Any], *, where: str, allowed: frozenset[str]) -> None:
        self._data = data
        self._where = where
        unknown = sorted(str(key) for key in data if key not in allowed)
        if unknown:
            known = ", ".join(sorted(allowed))
            msg = f"{where}: unknown keys {', '.join(unknown)} (known: {known})"
            raise TemplateError(msg)

    def fail(self, key: str, problem: str) -> NoReturn:
        """Raise the error for ``key``, naming the template (and VM) it belongs to."""
        raise TemplateError(f"{self._where}, field {key!r}: {problem}")

    def get(self, key: str) -> object:
        return self._data.get(key)

    def required(self, key: str) -> object:
        if self._data.get(key) is None:
            self.fail(key, "is required")
        return self._data[key]

    def string(self, key: str, *, default: object = _MISSING) -> str:
        value = self._data.get(key)
        if value is None:
            if default is _MISSING:
                self.fail(key, "is required")
            value = default
        if not isinstance(value, str):
            self.fail(key, f"must be a string, got {_kind(value)} {value!r}")
        if not value and default is _MISSING:
            self.fail(key, "must not be empty")
        return value

    def positive_int(self, key: str, *, default: object = _MISSING) -> int:
        value = self._data.get(key)
        if value is None:
            if default is _MISSING:
                self.fail(key, "is required")
            value = default
        if not isinstance(value, int) or isinstance(value, bool):
            self.fail(key, f"must be an integer, got {_kind(value)} {value!r}")
        if value < 1:
            self.fail(key, f"must be a positive integer, got {value}")
        return value
