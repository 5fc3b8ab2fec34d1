"""Abuse limits: request rates, per-region caps and the pool budget, from the environment.

Rates read ``COUNT/PERIOD`` with PERIOD one of ``second``, ``minute``, ``hour`` or a number of
seconds (``10/minute``, ``5/30``); ``off`` turns a rate limit off. The defaults suit a small
installation (one region of a few dozen VMs) and are meant to be raised, not removed.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from shared.config_env import ConfigError, EnvReader

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_PERIODS = {"second": 1.0, "minute": 60.0, "hour": 3600.0}


@dataclass(frozen=True)
class Rate:
    """At most ``count`` requests in any ``period_seconds`` window."""

    count: int
    period_seconds: float

    def __str__(self) -> str:
        return f"{self.count}/{self.period_seconds:g}s"


@dataclass(frozen=True)
class Limits:
    # Session creation: per learner (``user``) and per frontend token.
    creates_per_user: Rate | None = Rate(10, 60.0)
    creates_per_frontend_token: Rate | None = Rate(600, 60.0)
    # Browser-facing calls (heartbeat, close, extend, tickets, event streams) per client IP.
    browser_per_ip: Rate | None = Rate(300, 60.0)
    # Sign-in attempts on the operators' dashboard (/ui/ops) per client IP.
    sign_ins_per_ip: Rate | None = Rate(10, 60.0)
    # Proxies whose X-Forwarded-For is believed; from anyone else the peer address counts.
    trusted_proxies: tuple[IpNetwork, ...] = ()
    # Per region: live sessions, environments booting at once (sessions and pools alike),
    # and the VMs that warm pools may hold.
    region_max_live_sessions: int = 100
    region_max_booting: int = 20
    region_pool_budget_vms: int = 40


def limits_from_env(env: EnvReader) -> Limits:
    defaults = Limits()
    return Limits(
        creates_per_user=_rate(env, "LABVIRT_LIMIT_CREATES_PER_USER", defaults.creates_per_user),
        creates_per_frontend_token=_rate(
            env, "LABVIRT_LIMIT_CREATES_PER_FRONTEND_TOKEN", defaults.creates_per_frontend_token
        ),
        browser_per_ip=_rate(env, "LABVIRT_LIMIT_BROWSER_PER_IP", defaults.browser_per_ip),
        sign_ins_per_ip=_rate(env, "LABVIRT_LIMIT_SIGN_INS_PER_IP", defaults.sign_ins_per_ip),
        trusted_proxies=_networks(env, "LABVIRT_TRUSTED_PROXIES"),
        region_max_live_sessions=env.integer(
            "LABVIRT_REGION_MAX_LIVE_SESSIONS", defaults.region_max_live_sessions, minimum=1
        ),
        region_max_booting=env.integer(
            "LABVIRT_REGION_MAX_BOOTING", defaults.region_max_booting, minimum=1
        ),
        region_pool_budget_vms=env.integer(
            "LABVIRT_REGION_POOL_BUDGET_VMS", defaults.region_pool_budget_vms, minimum=0
        ),
    )


def parse_rate(name: str, raw: str) -> Rate | None:
    if raw.strip().lower() == "off":
        return None
    count_text, slash, period_text = raw.strip().partition("/")
    if not slash:
        raise ConfigError(f"{name}={raw!r}: expected COUNT/PERIOD, e.g. 10/minute, or off")
    try:
        count = int(count_text)
    except ValueError:
        raise ConfigError(f"{name}={raw!r}: {count_text!r} is not a whole number") from None
    period_text = period_text.strip().lower()
    if period_text in _PERIODS:
        period = _PERIODS[period_text]
    else:
        try:
            period = float(period_text)
        except ValueError:
            raise ConfigError(
                f"{name}={raw!r}: the period is second, minute, hour or a number of seconds"
            ) from None
    if count < 1 or not period > 0 or period > 86_400:
        raise ConfigError(f"{name}={raw!r}: need at least 1 request in 0 < period <= 1 day")
    return Rate(count, period)


def _rate(env: EnvReader, name: str, default: Rate | None) -> Rate | None:
    raw = env.string(name, "")
    return default if not raw else parse_rate(name, raw)


def _networks(env: EnvReader, name: str) -> tuple[IpNetwork, ...]:
    networks = []
    for item in env.string(name, "").split(","):
        if not item.strip():
            continue
        try:
            networks.append(ipaddress.ip_network(item.strip(), strict=False))
        except ValueError:
            raise ConfigError(f"{name}: {item.strip()!r} is not an IP address or CIDR") from None
    return tuple(networks)
