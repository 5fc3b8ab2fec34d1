"""Reading typed values from the environment, each failure naming its variable."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Final

from shared.token_strength import token_weakness

MIN_TOKEN_LENGTH: Final = 16


class ConfigError(ValueError):
    """A configuration value is missing or malformed."""


class EnvReader:
    def __init__(self, environ: Mapping[str, str]) -> None:
        self._environ = environ

    def _raw(self, name: str) -> str | None:
        value = self._environ.get(name)
        if value is None or not value.strip():
            return None
        return value.strip()

    def string(self, name: str, default: str) -> str:
        return self._raw(name) or default

    def path(self, name: str) -> Path | None:
        raw = self._raw(name)
        return Path(raw).expanduser() if raw else None

    def tokens(self, name: str) -> frozenset[str]:
        """Comma-separated secrets, each refused unless strong (``shared.token_strength``);
        a refusal says which one by its place in the list, never by its value."""
        raw = self._raw(name) or ""
        tokens = [t.strip() for t in raw.split(",") if t.strip()]
        if any(len(t) < MIN_TOKEN_LENGTH for t in tokens):
            raise ConfigError(
                f"{name}: every token must be at least {MIN_TOKEN_LENGTH} characters long"
            )
        for place, token in enumerate(tokens, start=1):
            weakness = token_weakness(token)
            if weakness is not None:
                raise ConfigError(
                    f"{name}: token {place} of {len(tokens)} {weakness}; generate one with "
                    "`openssl rand -hex 32`"
                )
        return frozenset(tokens)

    def integer(
        self, name: str, default: int, *, minimum: int | None = None, maximum: int | None = None
    ) -> int:
        value = self.optional_integer(name, minimum=minimum, maximum=maximum)
        return default if value is None else value

    def optional_integer(
        self, name: str, *, minimum: int | None = None, maximum: int | None = None
    ) -> int | None:
        raw = self._raw(name)
        if raw is None:
            return None
        try:
            value = int(raw)
        except ValueError:
            raise ConfigError(f"{name}={raw!r} is not a whole number") from None
        _check_range(name, value, minimum, maximum)
        return value

    def number(self, name: str, default: float, *, minimum: float | None = None) -> float:
        raw = self._raw(name)
        if raw is None:
            return default
        try:
            value = float(raw)
        except ValueError:
            raise ConfigError(f"{name}={raw!r} is not a number") from None
        if not math.isfinite(value):  # nan passes every range check; inf is no duration
            raise ConfigError(f"{name}={raw!r} is not a finite number")
        _check_range(name, value, minimum, None)
        return value

    def choice(self, name: str, allowed: list[str], default: str, *, upper: bool = False) -> str:
        raw = self._raw(name)
        if raw is None:
            return default
        value = raw.upper() if upper else raw.lower()
        if value not in allowed:
            raise ConfigError(f"{name}={raw!r} must be one of: {', '.join(allowed)}")
        return value


def _check_range(name: str, value: float, minimum: float | None, maximum: float | None) -> None:
    if minimum is not None and value < minimum:
        raise ConfigError(f"{name}={value} is below the minimum of {minimum}")
    if maximum is not None and value > maximum:
        raise ConfigError(f"{name}={value} is above the maximum of {maximum}")
