"""The alert rules (helm/cotmon/files/alerts.yaml): promtool checks them and runs their unit tests
(alerts_test.yaml, at least one firing case per alert); each alert says how bad it is, what it
means, what to do (a runbook section the viewer serves) and where the sessions are (a viewer link
filtered by rule and time); expressions use only metrics cotmon exports and never a session id.
The example Alertmanager configuration routes each severity to its webhook."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from component_fixtures import require
from deploy_tools import ALERT_TESTS, ALERTS, EXAMPLES, VIEWER_URL_PLACEHOLDER, exported_metrics

SEVERITIES = {"info", "warning", "critical"}


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


ALERT_RULES = alert_rules()
ALERT_IDS = [rule["alert"] for rule in ALERT_RULES]


def run(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, cwd=cwd, timeout=120)


def test_promtool_checks_the_rules(promtool: str) -> None:
    result = run(promtool, "check", "rules", ALERTS)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(ALERT_RULES)} rules found" in result.stdout


def test_the_alert_unit_tests_pass(promtool: str) -> None:
    result = run(promtool, "test", "rules", ALERT_TESTS.name, cwd=ALERT_TESTS.parent)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_unit_tests_can_fail(promtool: str, tmp_path: Path) -> None:
    """A wrong expected link window is caught: the unit tests compare annotations exactly."""
    (tmp_path / ALERTS.name).write_text(ALERTS.read_text(encoding="utf-8"), encoding="utf-8")
    suite = yaml.safe_load(ALERT_TESTS.read_text(encoding="utf-8"))
    first = yaml.safe_dump(suite | {"tests": suite["tests"][:1]}, sort_keys=False)
    assert "since=-3420&" in first
    (tmp_path / ALERT_TESTS.name).write_text(first.replace("since=-3420&", "since=-3421&"), encoding="utf-8")
    result = run(promtool, "test", "rules", ALERT_TESTS.name, cwd=tmp_path)
    assert result.returncode != 0 and "since=-3420" in result.stdout + result.stderr


def test_every_alert_has_a_unit_test_where_it_fires() -> None:
    tests = yaml.safe_load(ALERT_TESTS.read_text(encoding="utf-8"))["tests"]
    firing = {case["alertname"] for test in tests for case in test["alert_rule_test"] if case.get("exp_alerts")}
    assert firing == set(ALERT_IDS)


@pytest.mark.parametrize("rule", ALERT_RULES, ids=ALERT_IDS)
def test_the_alert_says_how_bad_what_and_where(rule: dict[str, Any]) -> None:
    severity = rule.get("labels", {}).get("severity")
    if severity is None:  # a flag alert carries the severity of the policy rule that fired
        assert re.search(r"by \([^)]*\bseverity\b", rule["expr"]), "no severity label and none kept from the metric"
    else:
        assert severity in SEVERITIES
    notes = rule["annotations"]
    assert notes["summary"].strip() and len(notes["description"]) > 60
    assert notes["runbook_url"] == f"{VIEWER_URL_PLACEHOLDER}/ui/runbook#{rule['alert']}"
    link = notes["viewer_url"]
    assert link.startswith(f"{VIEWER_URL_PLACEHOLDER}/ui/?")
    assert re.search(r"[?&]since=", link) and "&until=" in link


@pytest.mark.parametrize("rule", ALERT_RULES, ids=ALERT_IDS)
def test_the_alert_reads_only_exported_metrics_and_no_session(rule: dict[str, Any]) -> None:
    used = set(re.findall(r"\b(cotmon_[a-z_]+|up)\b", rule["expr"]))
    assert used and used <= exported_metrics().keys()
    assert 'job="cotmon"' in rule["expr"]
    assert "session_id" not in yaml.safe_dump(rule)


def test_flag_links_filter_by_rule() -> None:
    per_rule = [rule for rule in ALERT_RULES if re.search(r"by \([^)]*\brule\b", rule["expr"])]
    assert len(per_rule) == 3  # deception, harmful planning, halts
    for rule in per_rule:
        assert "?rule={{ $labels.rule | urlquery }}&" in rule["annotations"]["viewer_url"], rule["alert"]


def test_the_viewer_serves_a_runbook_section_per_alert(serve: Any) -> None:
    server = serve(api_key="secret")
    page = httpx.get(server.base_url + "/ui/runbook")  # public: on-call people land here from an alert
    assert page.status_code == 200
    assert re.findall(r'<section id="(\w+)"', page.text) == ALERT_IDS
    assert re.findall(r'<a href="#(\w+)">', page.text) == ALERT_IDS


@pytest.mark.parametrize("severity", sorted(SEVERITIES))
def test_the_example_alertmanager_routes_by_severity(severity: str) -> None:
    amtool = require("alertmanager", "amtool")
    config = EXAMPLES / "alertmanager.yaml"
    assert run(amtool, "check-config", config).returncode == 0
    routed = run(amtool, "config", "routes", "test", "--config.file", config, f"severity={severity}", "alertname=CotmonDown")
    assert routed.stdout.strip() == f"cotmon-{severity}", routed.stdout + routed.stderr
