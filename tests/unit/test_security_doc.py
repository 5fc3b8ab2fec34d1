"""docs/SECURITY.md says what the code does: its variables, limits, defaults and files."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from shared.config import Settings
from shared.config_limits import Limits, parse_rate

REPO = Path(__file__).resolve().parents[2]
SECURITY = (REPO / "docs" / "SECURITY.md").read_text()
README = (REPO / "README.md").read_text()
NAMED_FILES = sorted(
    set(re.findall(r"`((?:shared|services|tests|deploy|labvirt)/[^`\s]+)`", SECURITY))
)


def limit_rows() -> dict[str, str]:
    """The limits table: variable -> default as written."""
    rows = {}
    for line in SECURITY.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[2].startswith("`LABVIRT_"):
            rows[cells[2].strip("`")] = cells[1]
    return rows


def test_every_variable_it_names_is_one_labvirt_reads() -> None:
    named = set(re.findall(r"`(LABVIRT_[A-Z_]+)`", SECURITY))
    assert named
    configured = set(re.findall(r"`(LABVIRT_[A-Z_]+)`", README.split("## Configuration")[1]))
    assert named <= configured, named - configured


def test_the_limits_table_gives_the_defaults_of_the_code() -> None:
    limits, settings = Limits(), Settings()
    rows = limit_rows()
    assert set(rows) == {
        "LABVIRT_LIMIT_CREATES_PER_USER",
        "LABVIRT_LIMIT_CREATES_PER_FRONTEND_TOKEN",
        "LABVIRT_LIMIT_BROWSER_PER_IP",
        "LABVIRT_LIMIT_SIGN_INS_PER_IP",
        "LABVIRT_REGION_MAX_LIVE_SESSIONS",
        "LABVIRT_REGION_MAX_BOOTING",
        "LABVIRT_REGION_POOL_BUDGET_VMS",
        "LABVIRT_MAX_SESSIONS_PER_USER",
    }
    rates = {
        "LABVIRT_LIMIT_CREATES_PER_USER": limits.creates_per_user,
        "LABVIRT_LIMIT_CREATES_PER_FRONTEND_TOKEN": limits.creates_per_frontend_token,
        "LABVIRT_LIMIT_BROWSER_PER_IP": limits.browser_per_ip,
        "LABVIRT_LIMIT_SIGN_INS_PER_IP": limits.sign_ins_per_ip,
    }
    for name, rate in rates.items():
        count, _, period = rows[name].partition(" per ")
        assert parse_rate(name, f"{count}/{period}") == rate, name
    counts = {
        "LABVIRT_REGION_MAX_LIVE_SESSIONS": limits.region_max_live_sessions,
        "LABVIRT_REGION_MAX_BOOTING": limits.region_max_booting,
        "LABVIRT_REGION_POOL_BUDGET_VMS": limits.region_pool_budget_vms,
        "LABVIRT_MAX_SESSIONS_PER_USER": settings.max_sessions_per_user,
    }
    for name, value in counts.items():
        assert rows[name] == str(value), name


def test_the_retention_it_states_is_the_default() -> None:
    assert "(1 h by default)" in SECURITY
    assert Settings().ended_retention_seconds == 3600


@pytest.mark.parametrize("path", NAMED_FILES)
def test_every_file_it_names_exists(path: str) -> None:
    assert (REPO / path).exists(), path
