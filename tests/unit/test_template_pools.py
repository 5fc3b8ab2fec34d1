"""A template's ``pool:`` section: the default sizing of its pool in every region."""

from __future__ import annotations

from typing import Any

import pytest

from shared.adapters.template_files import load_templates
from shared.domain.pools.config import PoolConfig, PoolMode
from shared.domain.template_parsing import TemplateError, parse_template

VM = {
    "name": "ubuntu",
    "image": "quay.io/containerdisks/ubuntu:22.04",
    "cpu_cores": 1,
    "memory": "1Gi",
    "user_data": "#cloud-config\n",
}


def template(pool: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"vms": [VM]}
    if pool is not None:
        body["pool"] = pool
    return body


def test_without_a_pool_section_nothing_is_prewarmed() -> None:
    assert parse_template("ubuntu", template(None)).pool == PoolConfig()


def test_shipped_templates_prewarm_nothing_until_configured() -> None:
    for shipped in load_templates(None).values():
        assert shipped.pool == PoolConfig()


@pytest.mark.parametrize(
    ("pool", "expected"),
    [
        ({"size": 3}, PoolConfig(size=3)),
        ({"mode": "static", "size": 0}, PoolConfig()),
        ({"min": 1, "max": 8}, PoolConfig(mode=PoolMode.ADAPTIVE, min_size=1, max_size=8)),
        (
            {"mode": "adaptive", "max": 30, "hit_rate": 0.9},
            PoolConfig(mode=PoolMode.ADAPTIVE, max_size=30, hit_rate=0.9),
        ),
        ({"mode": "adaptive"}, PoolConfig(mode=PoolMode.ADAPTIVE)),
    ],
)
def test_pool_sections_parse(pool: dict[str, Any], expected: PoolConfig) -> None:
    assert parse_template("ubuntu", template(pool)).pool == expected


@pytest.mark.parametrize(
    ("pool", "message"),
    [
        ([3], "field 'pool': must be a mapping"),
        ({"size": -1}, "field 'pool': size must be between 0"),
        ({"size": "3"}, "field 'size': must be a whole number"),
        ({"size": True}, "field 'size': must be a whole number"),
        ({"mode": "huge"}, "field 'mode': must be one of static, adaptive"),
        ({"mode": "static", "max": 5}, "field 'mode': min and max size adaptive pools"),
        ({"size": 2, "max": 5}, "field 'size': sizes a static pool"),
        ({"mode": "adaptive", "size": 2}, "field 'size': sizes a static pool"),
        ({"min": 5, "max": 2}, "min (5) must not exceed max (2)"),
        ({"mode": "adaptive", "hit_rate": 2}, "hit_rate must be between"),
        ({"mode": "adaptive", "hit_rate": "high"}, "field 'hit_rate': must be a number"),
        ({"size": 1, "colour": "red"}, "unknown keys colour"),
    ],
)
def test_bad_pool_sections_name_the_template_and_field(pool: Any, message: str) -> None:
    with pytest.raises(TemplateError) as error:
        parse_template("ubuntu", template(pool))
    assert "template 'ubuntu'" in str(error.value)
    assert message in str(error.value)
