"""``REDIS_URL`` in both forms: one server, or a primary found through Sentinel."""

from __future__ import annotations

import pytest

from shared.adapters.redis_client import (
    RedisUrlError,
    SentinelTarget,
    celery_broker,
    sentinel_target,
)
from shared.config import ConfigError, Settings


def test_a_plain_url_is_no_sentinel_setup() -> None:
    assert sentinel_target("redis://127.0.0.1:6379/0") is None
    assert celery_broker("redis://:pw@redis:6379/2") == ("redis://:pw@redis:6379/2", {})


def test_a_sentinel_url_names_the_sentinels_the_primary_and_the_database() -> None:
    url = "sentinel://:s%40cret@10.0.0.1:26379,10.0.0.2:26380/labvirt/3"
    assert sentinel_target(url) == SentinelTarget(
        (("10.0.0.1", 26379), ("10.0.0.2", 26380)), "labvirt", 3, "s@cret"
    )
    broker, options = celery_broker(url)
    assert broker == ("sentinel://:s%40cret@10.0.0.1:26379/3;sentinel://:s%40cret@10.0.0.2:26380/3")
    assert options["master_name"] == "labvirt"
    assert sentinel_target("sentinel://h:1/name") == SentinelTarget((("h", 1),), "name", 0, None)


@pytest.mark.parametrize(
    "url",
    [
        "sentinel://",
        "sentinel://h:1",
        "sentinel://h/name",
        "sentinel://h:x/name",
        "sentinel://h:1/n/x",
    ],
)
def test_a_malformed_sentinel_url_is_refused_at_start(url: str) -> None:
    with pytest.raises(RedisUrlError):
        sentinel_target(url)
    with pytest.raises(ConfigError, match="REDIS_URL"):
        Settings.from_env({"LABVIRT_MODE": "dev", "REDIS_URL": url})
