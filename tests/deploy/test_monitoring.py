"""deploy/monitoring: the Grafana dashboard and the Prometheus alert rules speak of series
labvirt exports, in expressions that parse.

The series labvirt exports are taken from the code itself: the metrics every process records
(``shared.metrics.series``), the gauges read from Redis at scrape time (``shared.metrics.state``,
over an empty fake Redis) and the gateway's. ``promtool check rules`` judges the rules when it
is installed; without it, the expressions are checked for balanced brackets and for naming only
known series and PromQL words.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

import fakeredis
import pytest
import yaml

from services.gateway.metrics import OpenConnections
from shared.adapters.dead_letters import DeadLetters
from shared.adapters.pool_store import RedisPoolStore
from shared.adapters.region_state import RedisRegionState
from shared.adapters.template_files import load_templates
from shared.metrics.series import process_registry, series
from shared.metrics.state import StateCollector

MONITORING: Final = Path(__file__).resolve().parents[2] / "deploy" / "monitoring"
DASHBOARD: Final = MONITORING / "grafana-dashboard.json"
ALERTS: Final = MONITORING / "alerts.yaml"
DEPLOY_DOC: Final = Path(__file__).resolve().parents[2] / "docs" / "DEPLOY.md"

# The PromQL words the expressions may use besides series names.
PROMQL_WORDS: Final = frozenset(
    {
        "and",
        "or",
        "unless",
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "offset",
        "bool",
        "sum",
        "max",
        "min",
        "avg",
        "count",
        "rate",
        "irate",
        "increase",
        "delta",
        "deriv",
        "histogram_quantile",
        "label_values",
        "clamp_min",
        "absent",
    }
)
SUFFIXES: Final = {
    "counter": ("_total",),
    "histogram": ("_bucket", "_sum", "_count"),
    "gauge": ("",),
}
_STRING: Final = re.compile(r'"(?:[^"\\]|\\.)*"')
_MATCHERS: Final = re.compile(r"\{[^{}]*\}")
_GROUPING: Final = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_RANGE: Final = re.compile(r"\[[^\[\]]*\]")
# Grafana's label_values(series, label): its second argument is a label, not a series.
_LABEL_VALUES: Final = re.compile(r"label_values\(([^,()]+),\s*\w+\)")
_WORD: Final = re.compile(r"(?<![\w.])[A-Za-z_:][\w:]*")
_TEMPLATE_VARIABLE: Final = re.compile(r"\$\{?\w+\}?")


def exported_series() -> set[str]:
    """Every sample name a labvirt process can expose."""
    series()  # the recorded series exist once a process records
    families = list(process_registry().collect())
    redis = fakeredis.FakeRedis()
    templates = load_templates(None)
    state = StateCollector(
        pools=RedisPoolStore(redis),
        dead_letters=DeadLetters(redis),
        regions=RedisRegionState(redis),
        region_names=("local",),
        templates={n: (t.pool, float(t.startup_timeout_seconds)) for n, t in templates.items()},
    )
    families += [*state.collect(), *OpenConnections(lambda _: 0, lambda: 0).collect()]
    names = set()
    for family in families:
        if family.name.startswith("labvirt_"):
            names |= {family.name + suffix for suffix in SUFFIXES[family.type]}
    return names


def used_names(expression: str) -> set[str]:
    """The series and words of a PromQL expression, without strings, label matchers,
    grouping labels, ranges and numbers."""
    text = _TEMPLATE_VARIABLE.sub("", _STRING.sub('""', expression))
    text = _LABEL_VALUES.sub(r"label_values(\1)", text)
    text = _RANGE.sub("", _GROUPING.sub("", _MATCHERS.sub("", text)))
    return set(_WORD.findall(text))


def balanced(expression: str) -> bool:
    closing = {")": "(", "]": "[", "}": "{"}
    stack: list[str] = []
    for char in _STRING.sub('""', expression):
        if char in "([{":
            stack.append(char)
        elif char in closing and (not stack or stack.pop() != closing[char]):
            return False
    return not stack


@pytest.fixture(scope="module")
def rules() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(ALERTS.read_text())
    return loaded


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def alert_rules(rules: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for group in rules["spec"]["groups"]:
        yield from group["rules"]


def dashboard_expressions(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            yield panel["title"], target["expr"]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            yield variable["name"], variable["definition"]


def test_the_rules_are_a_prometheus_rule(rules: dict[str, Any]) -> None:
    assert rules["apiVersion"] == "monitoring.coreos.com/v1"
    assert rules["kind"] == "PrometheusRule"
    assert rules["metadata"]["name"] == "labvirt"
    groups = rules["spec"]["groups"]
    assert groups
    assert len({g["name"] for g in groups}) == len(groups)
    alerts = [rule["alert"] for rule in alert_rules(rules)]
    assert len(alerts) == len(set(alerts)), alerts
    for rule in alert_rules(rules):
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule["alert"]
        assert isinstance(rule["expr"], str), rule["alert"]
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
        assert {"summary", "description"} <= set(rule["annotations"]), rule["alert"]
        if "for" in rule:
            assert re.fullmatch(r"\d+[smh]", rule["for"]), rule["alert"]


def test_the_rules_cover_what_operators_must_hear_of(rules: dict[str, Any]) -> None:
    uses = {rule["alert"]: used_names(rule["expr"]) for rule in alert_rules(rules)}

    def alerted(*needed: str) -> bool:
        return any(set(needed) <= names for names in uses.values())

    assert alerted("labvirt_pool_ready", "labvirt_pool_target")  # a pool empty
    assert alerted(
        "labvirt_session_time_to_ready_seconds_bucket", "labvirt_template_startup_timeout_seconds"
    )  # time to ready over the template's budget
    assert alerted("labvirt_dead_letters_failed")  # dead letters growing
    assert alerted("labvirt_region_up")  # a region down


def test_the_dashboard_shows_each_part_of_the_system(dashboard: dict[str, Any]) -> None:
    used = set().union(*(used_names(expr) for _, expr in dashboard_expressions(dashboard)))
    assert {
        "labvirt_pool_target",
        "labvirt_pool_ready",
        "labvirt_pool_in_flight",
        "labvirt_session_requests_total",
        "labvirt_session_time_to_ready_seconds_bucket",
        "labvirt_provisioning_failures_total",
        "labvirt_kube_calls_total",
        "labvirt_dead_letters_failed",
        "labvirt_gateway_open_streams",
        "labvirt_gateway_open_terminals",
    } <= used
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            assert panel["targets"], panel["title"]


def every_expression(rules: dict[str, Any], dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    return [(r["alert"], r["expr"]) for r in alert_rules(rules)] + list(
        dashboard_expressions(dashboard)
    )


def test_every_series_used_is_one_labvirt_exports(
    rules: dict[str, Any], dashboard: dict[str, Any]
) -> None:
    exported = exported_series()
    unknown = []
    for where, expression in every_expression(rules, dashboard):
        for name in used_names(expression) - PROMQL_WORDS:
            if name not in exported:
                unknown.append(f"{where}: {name}")
    assert unknown == [], f"not exported by labvirt: {unknown}"


def test_every_expression_is_balanced(rules: dict[str, Any], dashboard: dict[str, Any]) -> None:
    unbalanced = [where for where, expr in every_expression(rules, dashboard) if not balanced(expr)]
    assert unbalanced == []


def test_the_checks_catch_what_they_look_for() -> None:
    assert used_names('sum by (le) (rate(labvirt_x_bucket{path="a(b"}[5m]))') == {
        "sum",
        "rate",
        "labvirt_x_bucket",
    }
    assert not balanced("sum(rate(labvirt_x[5m])")
    assert balanced('max(labvirt_x{a="]"})')
    assert "labvirt_typo_total" not in exported_series()


def test_promtool_accepts_the_rules(rules: dict[str, Any], tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (the Debian package `prometheus` has it)")
    plain = tmp_path / "rules.yaml"
    plain.write_text(yaml.safe_dump({"groups": rules["spec"]["groups"]}))
    done = subprocess.run(
        [promtool, "check", "rules", str(plain)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_deploy_doc_names_the_monitoring_files() -> None:
    doc = DEPLOY_DOC.read_text()
    assert "deploy/monitoring/grafana-dashboard.json" in doc
    assert "deploy/monitoring/alerts.yaml" in doc
