"""Settings.from_env: sane defaults, and a bad environment fails at once naming the variable."""

from __future__ import annotations

import dataclasses
import math
import os
import re
import secrets
from pathlib import Path

import pytest

from shared.adapters.session_store import FINISHED_RETENTION_SECONDS
from shared.config import Cluster, ConfigError, Mode, Settings, available_cpus
from shared.token_strength import MIN_TOKEN_BITS, WORD_BITS, estimated_bits, token_weakness

# Shaped as ``secrets.token_hex(16)`` makes them: what the start-up check accepts.
FRONTEND = "frontend-3f786850e387550fdab836ed7e6dc881"
ADMIN = "admin-e9d71f5ee7c92d6dc9e92ffdad17b8bd"
PRODUCTION_TOKENS = {"LABVIRT_FRONTEND_TOKENS": FRONTEND, "LABVIRT_ADMIN_TOKENS": ADMIN}


def dev(**env: str) -> Settings:
    return Settings.from_env({"LABVIRT_MODE": "dev", **env})


def refused(env: dict[str, str], *fragments: str) -> str:
    """The ConfigError message for ``env``, checked to contain every fragment."""
    with pytest.raises(ConfigError) as caught:
        Settings.from_env(env)
    message = str(caught.value)
    for fragment in fragments:
        assert fragment in message, message
    return message


# -- defaults --------------------------------------------------------------------------------


def test_dev_mode_defaults() -> None:
    settings = dev()

    assert settings.mode is Mode.DEV
    assert settings.redis_url == "redis://127.0.0.1:6379/0"
    assert settings.clusters == (Cluster("local", None, None, "default"),)
    assert settings.default_region == "local"
    assert settings.regions == ("local",)
    assert settings.api_host == "0.0.0.0"
    assert settings.api_port == 8080
    assert settings.api_workers == available_cpus()  # every CPU it may use
    assert settings.api_threads == 32
    assert settings.frontend_tokens == frozenset()
    assert settings.admin_tokens == frozenset()
    assert settings.templates_path is None
    assert settings.log_format == "console"
    assert settings.log_level == "INFO"
    assert settings.worker_concurrency == 16
    assert settings.kube_pool_maxsize == 32
    assert settings.reaper_interval_seconds == 5.0
    assert settings.reaper_batch == 500
    assert settings.idle_timeout_seconds is None
    assert settings.teardown_timeout_seconds == 120.0
    assert settings.kube_request_timeout_seconds == 30.0


def test_production_is_the_default_mode_and_logs_json() -> None:
    settings = Settings.from_env(PRODUCTION_TOKENS)

    assert settings.mode is Mode.PRODUCTION
    assert settings.log_format == "json"
    assert settings.frontend_tokens == frozenset({FRONTEND})
    assert settings.admin_tokens == frozenset({ADMIN})


def test_blank_values_count_as_unset() -> None:
    settings = dev(LABVIRT_API_PORT="  ", REDIS_URL="", LABVIRT_IDLE_TIMEOUT_SECONDS=" ")

    assert settings.api_port == 8080
    assert settings.redis_url == "redis://127.0.0.1:6379/0"
    assert settings.idle_timeout_seconds is None


def test_every_knob_is_read() -> None:
    settings = dev(
        REDIS_URL="redis://redis:6379/3",
        LABVIRT_API_HOST="127.0.0.1",
        LABVIRT_API_PORT="9000",
        LABVIRT_API_WORKERS="3",
        LABVIRT_API_THREADS="4",
        LABVIRT_TEMPLATES="/etc/labvirt/templates.yaml",
        LABVIRT_LOG_FORMAT="JSON",
        LABVIRT_LOG_LEVEL="debug",
        LABVIRT_WORKER_CONCURRENCY="3",
        LABVIRT_WORKER_POOL="Prefork",
        LABVIRT_KUBE_POOL_MAXSIZE="7",
        LABVIRT_REAPER_INTERVAL_SECONDS="0.5",
        LABVIRT_REAPER_BATCH="50",
        LABVIRT_IDLE_TIMEOUT_SECONDS="600",
        LABVIRT_TEARDOWN_TIMEOUT_SECONDS="60",
        LABVIRT_KUBE_REQUEST_TIMEOUT_SECONDS="2.5",
    )

    assert settings.redis_url == "redis://redis:6379/3"
    assert settings.api_host == "127.0.0.1"
    assert settings.api_port == 9000
    assert settings.api_workers == 3
    assert settings.api_threads == 4
    assert settings.templates_path == Path("/etc/labvirt/templates.yaml")
    assert settings.log_format == "json"
    assert settings.log_level == "DEBUG"
    assert settings.worker_pool == "prefork"
    assert settings.worker_concurrency == 3
    assert settings.kube_pool_maxsize == 7
    assert settings.reaper_interval_seconds == 0.5
    assert settings.reaper_batch == 50
    assert settings.idle_timeout_seconds == 600
    assert settings.teardown_timeout_seconds == 60.0
    assert settings.kube_request_timeout_seconds == 2.5


def test_reads_os_environ_when_given_no_mapping(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in os.environ if n.startswith("LABVIRT_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("LABVIRT_MODE", "dev")
    monkeypatch.setenv("LABVIRT_API_PORT", "8123")

    assert Settings.from_env().api_port == 8123


def test_settings_are_frozen() -> None:
    settings = dev()
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.api_port = 1  # type: ignore[misc]


# -- tokens ----------------------------------------------------------------------------------


def test_production_refuses_without_frontend_tokens() -> None:
    message = refused({"LABVIRT_ADMIN_TOKENS": ADMIN}, "LABVIRT_FRONTEND_TOKENS", "production")
    assert "LABVIRT_MODE=dev" in message  # says how to get a playground instead


def test_production_refuses_without_admin_tokens() -> None:
    refused({"LABVIRT_FRONTEND_TOKENS": FRONTEND}, "LABVIRT_ADMIN_TOKENS", "production")


def test_production_refuses_with_neither_token_and_names_the_first() -> None:
    refused({}, "LABVIRT_FRONTEND_TOKENS")


@pytest.mark.parametrize("mode", ["dev", "DEV", " Dev "])
def test_dev_mode_needs_no_tokens(mode: str) -> None:
    assert Settings.from_env({"LABVIRT_MODE": mode}).mode is Mode.DEV


def test_token_lists_are_split_on_commas_and_trimmed() -> None:
    other = "84a516841ba77a5b4648de2cd0dfcb30"
    settings = dev(LABVIRT_FRONTEND_TOKENS=f" {FRONTEND} ,{other},, ")

    assert settings.frontend_tokens == frozenset({FRONTEND, other})


@pytest.mark.parametrize("variable", ["LABVIRT_FRONTEND_TOKENS", "LABVIRT_ADMIN_TOKENS"])
@pytest.mark.parametrize("value", ["short", "x" * 15, f"{'x' * 16},tooshort"])
def test_short_tokens_are_rejected(variable: str, value: str) -> None:
    message = refused({"LABVIRT_MODE": "dev", variable: value}, variable, "16 characters")
    assert value not in message  # a secret never lands in a log line


def test_sixteen_characters_are_too_few_for_128_bits() -> None:
    sixteen = "7d0a1f4Cb9e3$k2Q"  # varied as can be: 16 x log2(95) is still under 128
    refused({"LABVIRT_MODE": "dev", "LABVIRT_ADMIN_TOKENS": sixteen}, "too guessable", "128")


@pytest.mark.parametrize("variable", ["LABVIRT_FRONTEND_TOKENS", "LABVIRT_ADMIN_TOKENS"])
@pytest.mark.parametrize("mode", ["production", "dev"])
@pytest.mark.parametrize(
    "placeholder",
    [
        "replace-with-a-long-random-token",
        "changeme-changeme-changeme",
        "ExampleFrontendToken2024",
        "<your-frontend-token-goes-here>",
        "${LABVIRT_FRONTEND_TOKEN_VALUE}",
        "my-secret-token-0000000001",
        "password1234567890",
        "token_token_token_token",
        "x" * 32,
        "0" * 40,
    ],
)
def test_placeholder_tokens_are_refused_naming_the_variable_not_the_token(
    variable: str, mode: str, placeholder: str
) -> None:
    env = {**PRODUCTION_TOKENS, "LABVIRT_MODE": mode, variable: f"{FRONTEND},{placeholder}"}
    if variable == "LABVIRT_ADMIN_TOKENS":
        env[variable] = f"{ADMIN},{placeholder}"
    message = refused(env, variable, "token 2 of 2", "placeholder", "openssl rand")
    assert placeholder not in message


@pytest.mark.parametrize("variable", ["LABVIRT_FRONTEND_TOKENS", "LABVIRT_ADMIN_TOKENS"])
@pytest.mark.parametrize(
    "guessable",
    [
        "e2e-frontend-token-0123456789",  # words and a counted run
        "readme-admin-token-0123456789",
        "abcabcabcabcabcabcabcabcabc",  # a chunk repeated
        "dev-frontend-0123456789abcdef",
        "qwertyuiopasdfgh",  # a keyboard row: letters only, too short for 128 bits
    ],
)
def test_guessable_tokens_are_refused_in_dev_mode_too(variable: str, guessable: str) -> None:
    message = refused({"LABVIRT_MODE": "dev", variable: guessable}, variable, "too guessable")
    assert guessable not in message


def test_a_token_that_a_header_cannot_carry_is_refused() -> None:
    token = "9f86d081884c7d659a2feaa0c55ad015é"
    message = refused({"LABVIRT_MODE": "dev", "LABVIRT_FRONTEND_TOKENS": token}, "printable")
    assert token not in message


def test_generated_tokens_are_accepted() -> None:
    """What the docs tell operators to run, many times over: none may be refused by chance."""
    for _ in range(2000):
        tokens = [secrets.token_hex(16), secrets.token_hex(32), secrets.token_urlsafe(32)]
        for token in tokens:
            assert token_weakness(token) is None, estimated_bits(token)


def test_the_estimate_counts_classes_words_and_patterns() -> None:
    assert estimated_bits("abcdefgh") < estimated_bits("aBcDeFgH") < estimated_bits("aB3DeF!H")
    # A word counts as one pick among common words, whatever its length.
    assert estimated_bits("frontend") == WORD_BITS
    # From its third step on, a run or a repeated chunk is worth a bit a character.
    assert estimated_bits("q0123456") == pytest.approx(3 * math.log2(36) + 5)
    assert estimated_bits("k7k7k7k7") == pytest.approx(4 * math.log2(36) + 4)
    assert MIN_TOKEN_BITS == 128


def test_a_token_cannot_be_both_frontend_and_admin() -> None:
    shared = "e4da3b7fbbce2345d7772b0674a318d5"
    message = refused(
        {"LABVIRT_FRONTEND_TOKENS": f"{FRONTEND},{shared}", "LABVIRT_ADMIN_TOKENS": shared},
        "frontend",
        "admin",
    )
    assert shared not in message


def test_overlap_is_rejected_in_dev_mode_too() -> None:
    refused({"LABVIRT_MODE": "dev", **dict.fromkeys(PRODUCTION_TOKENS, FRONTEND)}, "both")


# -- numbers and choices ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("variable", "value", "fragment"),
    [
        ("LABVIRT_API_PORT", "eighty", "is not a whole number"),
        ("LABVIRT_API_PORT", "80.5", "is not a whole number"),
        ("LABVIRT_API_PORT", "70000", "above the maximum of 65535"),
        ("LABVIRT_API_PORT", "-1", "below the minimum of 0"),
        ("LABVIRT_API_THREADS", "0", "below the minimum of 1"),
        ("LABVIRT_API_WORKERS", "0", "below the minimum of 1"),
        ("LABVIRT_WORKER_CONCURRENCY", "many", "is not a whole number"),
        ("LABVIRT_KUBE_POOL_MAXSIZE", "0", "below the minimum"),
        ("LABVIRT_REAPER_BATCH", "1e3", "is not a whole number"),
        ("LABVIRT_IDLE_TIMEOUT_SECONDS", "0", "below the minimum of 1"),
        ("LABVIRT_IDLE_TIMEOUT_SECONDS", "5m", "is not a whole number"),
        ("LABVIRT_REAPER_INTERVAL_SECONDS", "soon", "is not a number"),
        ("LABVIRT_REAPER_INTERVAL_SECONDS", "0.01", "below the minimum of 0.1"),
        ("LABVIRT_REAPER_INTERVAL_SECONDS", "nan", "is not a finite number"),
        ("LABVIRT_TEARDOWN_TIMEOUT_SECONDS", "inf", "is not a finite number"),
        ("LABVIRT_TEARDOWN_TIMEOUT_SECONDS", "0.5", "below the minimum of 1"),
        ("LABVIRT_KUBE_REQUEST_TIMEOUT_SECONDS", "-infinity", "is not a finite number"),
        ("LABVIRT_ENDED_RETENTION_SECONDS", "30", "below the minimum of 60"),
        ("LABVIRT_ENDED_RETENTION_SECONDS", "1h", "is not a whole number"),
        ("LABVIRT_MODE", "staging", "must be one of: dev, production"),
        ("LABVIRT_LOG_FORMAT", "xml", "must be one of: json, console"),
        ("LABVIRT_WORKER_POOL", "gevent", "must be one of: threads, prefork"),
        ("LABVIRT_LOG_LEVEL", "verbose", "must be one of: DEBUG, INFO, WARNING, ERROR"),
    ],
)
def test_bad_values_name_the_variable(variable: str, value: str, fragment: str) -> None:
    message = refused({"LABVIRT_MODE": "dev", variable: value}, fragment)
    assert message.startswith(f"{variable}="), message


def test_ended_sessions_are_kept_an_hour_unless_configured() -> None:
    assert dev().ended_retention_seconds == FINISHED_RETENTION_SECONDS == 3600
    assert dev(LABVIRT_ENDED_RETENTION_SECONDS="600").ended_retention_seconds == 600


@pytest.mark.parametrize(("value", "expected"), [("0", 0), ("65535", 65535), (" 443 ", 443)])
def test_port_bounds_are_inclusive(value: str, expected: int) -> None:
    assert dev(LABVIRT_API_PORT=value).api_port == expected


@pytest.mark.parametrize(("value", "expected"), [("warning", "WARNING"), ("Error", "ERROR")])
def test_log_level_is_case_insensitive(value: str, expected: str) -> None:
    assert dev(LABVIRT_LOG_LEVEL=value).log_level == expected


def test_log_format_is_case_insensitive() -> None:
    assert Settings.from_env({**PRODUCTION_TOKENS, "LABVIRT_LOG_FORMAT": "Console"}).log_format == (
        "console"
    )


# -- clusters --------------------------------------------------------------------------------


def test_single_cluster_from_kubeconfig_and_context() -> None:
    settings = dev(
        LABVIRT_KUBECONFIG="/k/config.yaml",
        LABVIRT_KUBE_CONTEXT="kind-labvirt",
        LABVIRT_NAMESPACE="labs",
        LABVIRT_DEFAULT_REGION="eu",
    )

    assert settings.clusters == (Cluster("eu", Path("/k/config.yaml"), "kind-labvirt", "labs"),)
    assert settings.cluster("eu") is settings.clusters[0]


def test_kubeconfig_path_expands_the_home_directory() -> None:
    (cluster,) = dev(LABVIRT_KUBECONFIG="~/.kube/config").clusters

    assert cluster.kubeconfig == Path("~/.kube/config").expanduser()


def test_many_clusters_with_optional_contexts() -> None:
    settings = dev(
        LABVIRT_CLUSTERS="eu=/k/eu.yaml, us=/k/us.yaml@us-east ,ap=/k/ap.yaml@",
        LABVIRT_DEFAULT_REGION="us",
        LABVIRT_NAMESPACE="labs",
    )

    assert settings.clusters == (
        Cluster("eu", Path("/k/eu.yaml"), None, "labs"),
        Cluster("us", Path("/k/us.yaml"), "us-east", "labs"),
        Cluster("ap", Path("/k/ap.yaml"), None, "labs"),
    )
    assert settings.regions == ("eu", "us", "ap")
    assert settings.default_region == "us"
    assert settings.cluster("ap").kubeconfig == Path("/k/ap.yaml")


def test_cluster_lookup_of_an_unknown_region_raises_key_error() -> None:
    with pytest.raises(KeyError, match="mars"):
        dev().cluster("mars")


def test_a_region_listed_twice_is_rejected() -> None:
    refused(
        {"LABVIRT_MODE": "dev", "LABVIRT_CLUSTERS": "eu=/a.yaml,eu=/b.yaml"},
        "LABVIRT_CLUSTERS",
        "'eu' is listed twice",
    )


@pytest.mark.parametrize(
    ("spec", "item"),
    [
        ("eu", "eu"),
        ("eu=", "eu="),
        ("=/k/eu.yaml", "=/k/eu.yaml"),
        ("eu=@ctx", "eu=@ctx"),
        ("eu=/k/eu.yaml,,us=/k/us.yaml", ""),
        ("eu=/k/eu.yaml,", ""),
        ("eu:/k/eu.yaml", "eu:/k/eu.yaml"),
    ],
)
def test_malformed_cluster_items_are_named(spec: str, item: str) -> None:
    refused(
        {"LABVIRT_MODE": "dev", "LABVIRT_CLUSTERS": spec, "LABVIRT_DEFAULT_REGION": "eu"},
        "LABVIRT_CLUSTERS",
        f"{item!r} is not REGION=KUBECONFIG[@CONTEXT]",
    )


def test_default_region_must_name_a_configured_cluster() -> None:
    message = refused(
        {"LABVIRT_MODE": "dev", "LABVIRT_CLUSTERS": "eu=/k/eu.yaml,us=/k/us.yaml"},
        "LABVIRT_DEFAULT_REGION='local'",
    )
    assert re.search(r"regions: eu, us\)", message), message


def test_validate_names_no_regions_when_there_are_none() -> None:
    with pytest.raises(ConfigError, match=r"regions: none"):
        Settings(mode=Mode.DEV).validate()


@pytest.mark.parametrize(
    ("files", "limit"),
    [
        ({"cpu.max": "max 100000\n"}, None),
        ({"cpu.max": "200000 100000\n"}, 2),
        ({"cpu.max": "50000 100000\n"}, 1),  # half a CPU is one worker
        ({"cpu.max": "150000 100000"}, 2),
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
        ({"cpu/cpu.cfs_quota_us": "300000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 3),
        ({}, None),  # no cgroup to read
    ],
)
def test_api_workers_default_to_the_cpus_the_cgroup_allows(
    tmp_path: Path, files: dict[str, str], limit: int | None
) -> None:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    affinity = len(os.sched_getaffinity(0))
    assert available_cpus(tmp_path) == (affinity if limit is None else min(affinity, limit))
