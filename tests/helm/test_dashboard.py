"""The Grafana dashboard (helm/cotmon/files/dashboard.json), checked without a Grafana server.

- Typed: the JSON goes into a TypeScript file as a literal typed with @grafana/schema's Dashboard,
  each panel with its plugin's options and field config (tests/helm/dashboard_check.ts.tmpl), and
  the real tsc (typescript 7, strict) must accept it; a misspelt key or a wrong value must make tsc
  fail and name it.
- PromQL: every panel query, with Grafana's variables replaced the way the end-to-end test replaces
  them, parses in `promtool check rules`.
- Structure: unique panel ids and grid positions, every target a Prometheus query with a refId on
  the datasource variable, only metrics and labels that monitor.observability.Metrics exports (so a
  renamed metric or label fails here), no session ids, variables used only in regex matchers.
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from components import NODE_BIN
from deploy_tools import (
    DASHBOARD,
    GRAFANA_INTERVALS,
    GRAFANA_VARIABLE,
    VIEWER_URL_PLACEHOLDER,
    dashboard_panels,
    exported_metrics,
    substitute,
)

Json = dict[str, Any]

TS_TEMPLATE = Path(__file__).with_name("dashboard_check.ts.tmpl")
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
TARGET_LABELS = {"job", "instance", "namespace", "pod", "le"}
"""Labels a query may use besides a metric's own: the scrape's, Kubernetes' and histograms' `le`."""
VARIABLES = {"datasource", "namespace", "detector"}
SELECTOR = re.compile(r"\b([a-zA-Z_:][\w:]*)\s*\{([^}]*)\}")
MATCHER = re.compile(r'(\w+)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')
GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
METRIC_NAME = re.compile(r"\bcotmon_\w+")


def load_dashboard() -> Json:
    dashboard: Json = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return dashboard


def data_panels(dashboard: Json) -> list[Json]:
    return [p for p in dashboard_panels(dashboard) if p["type"] != "row"]


def targets(dashboard: Json) -> list[tuple[Json, Json]]:
    return [(panel, target) for panel in data_panels(dashboard) for target in panel.get("targets", [])]


def run_tsc(tsc: Path, workdir: Path, dashboard: Json) -> subprocess.CompletedProcess[str]:
    """tsc --noEmit over the dashboard as a typed literal, in `workdir` (node_modules linked in)."""
    source = TS_TEMPLATE.read_text(encoding="utf-8").replace("__DASHBOARD_JSON__", json.dumps(dashboard, indent=2))
    (workdir / "dashboard.ts").write_text(source, encoding="utf-8")
    (workdir / "node_modules").symlink_to(NODE_BIN.parent, target_is_directory=True)
    tsconfig = {
        "compilerOptions": {
            "strict": True,
            "noEmit": True,
            "target": "es2022",
            "module": "preserve",
            "moduleResolution": "bundler",
            "types": [],
            "noUnusedLocals": True,
        },
        "files": ["dashboard.ts"],
    }
    (workdir / "tsconfig.json").write_text(json.dumps(tsconfig), encoding="utf-8")
    return subprocess.run(
        [str(tsc), "--project", str(workdir / "tsconfig.json"), "--pretty", "false"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=workdir,
    )


# ------------------------------------------------------------------------------------------ typed


def test_dashboard_passes_the_typed_check_against_grafana_schema(tsc: Path, tmp_path: Path) -> None:
    result = run_tsc(tsc, tmp_path, load_dashboard())
    assert result.returncode == 0, result.stdout + result.stderr


def _first(dashboard: Json, kind: str) -> Json:
    return next(p for p in dashboard_panels(dashboard) if p["type"] == kind)


def _rename(obj: Json, old: str, new: str) -> None:
    obj[new] = obj.pop(old)


MISTAKES: dict[str, tuple[Callable[[Json], None], str]] = {
    "panel gridPos misspelt": (lambda d: _rename(_first(d, "timeseries"), "gridPos", "gridpos"), '"gridpos"'),
    "target legendFormat misspelt": (
        lambda d: _rename(_first(d, "timeseries")["targets"][0], "legendFormat", "legendformat"),
        '"legendformat"',
    ),
    "stat option with a value it does not take": (
        lambda d: _first(d, "stat")["options"].update(colorMode="colour"),
        '"colour"',
    ),
    "heatmap without a required option": (lambda d: _first(d, "heatmap")["options"].pop("yAxis"), "'yAxis'"),
}


@pytest.mark.parametrize("mistake", list(MISTAKES))
def test_typed_check_rejects_a_broken_dashboard_naming_the_key(tsc: Path, tmp_path: Path, mistake: str) -> None:
    broken = copy.deepcopy(load_dashboard())
    mutate, named = MISTAKES[mistake]
    mutate(broken)
    result = run_tsc(tsc, tmp_path, broken)
    assert result.returncode != 0
    assert "error TS" in result.stdout
    assert named in result.stdout, result.stdout


# ---------------------------------------------------------------------------------------- PromQL


def test_every_query_parses_in_promtool(promtool: str, tmp_path: Path) -> None:
    rules = [
        {"record": f"cotmon_dashboard:panel_{panel['id']}_{target['refId']}", "expr": substitute(target["expr"])}
        for panel, target in targets(load_dashboard())
    ]
    rules_file = tmp_path / "dashboard_rules.yaml"
    rules_file.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}), encoding="utf-8")
    result = subprocess.run([promtool, "check", "rules", str(rules_file)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout


def test_substitution_matches_the_end_to_end_test() -> None:
    expr = 'rate(x{a=~"$namespace", b=~"${detector}", c=~"${detector:regex}"}[$__rate_interval]) + y[$__range]'
    assert substitute(expr) == 'rate(x{a=~".*", b=~".*", c=~".*"}[1m]) + y[10m]'


# ------------------------------------------------------------------------------------- structure


def test_dashboard_identity_and_defaults() -> None:
    dashboard = load_dashboard()
    assert (dashboard["uid"], dashboard["title"]) == ("cotmon", "cotmon")
    assert dashboard["schemaVersion"] >= 39
    assert dashboard["time"] == {"from": "now-1h", "to": "now"}
    assert dashboard["refresh"] == "30s"
    assert "cotmon" in dashboard["tags"]


def test_panels_are_organised_in_rows() -> None:
    rows = [p["title"] for p in load_dashboard()["panels"] if p["type"] == "row"]
    assert rows == ["Fleet", "Flags", "Detectors", "Judge", "Health"]


def test_every_panel_has_a_unique_id_and_a_place_on_the_grid() -> None:
    panels = list(dashboard_panels(load_dashboard()))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), sorted(ids)
    for panel in panels:
        pos = panel["gridPos"]
        assert all(isinstance(pos[k], int) and pos[k] >= 0 for k in "xywh"), panel["title"]
        assert pos["w"] > 0 and pos["h"] > 0 and pos["x"] + pos["w"] <= 24, panel["title"]


def test_every_panel_explains_itself_and_has_a_unit() -> None:
    for panel in data_panels(load_dashboard()):
        assert panel.get("title") and len(panel.get("description", "")) > 20, panel["id"]
        if panel["type"] in ("timeseries", "stat"):
            assert panel["fieldConfig"]["defaults"].get("unit"), panel["title"]


def test_every_target_is_a_prometheus_query_on_the_datasource_variable() -> None:
    dashboard = load_dashboard()
    for panel in data_panels(dashboard):
        refs = [t["refId"] for t in panel["targets"]]
        assert panel["targets"] and all(refs) and len(refs) == len(set(refs)), panel["title"]
        assert panel["datasource"] == DATASOURCE, panel["title"]
    for panel, target in targets(dashboard):
        assert target["datasource"] == DATASOURCE, panel["title"]
        assert METRIC_NAME.search(target["expr"]) or re.search(r"\bup\{", target["expr"]), target["expr"]


def test_queries_use_only_metrics_and_labels_cotmon_exports() -> None:
    exported = exported_metrics()
    for panel, target in targets(load_dashboard()):
        expr = target["expr"]
        used = set(METRIC_NAME.findall(expr))
        assert used <= exported.keys(), f"{panel['title']}: {sorted(used - exported.keys())} not exported"
        selectors = SELECTOR.findall(expr)
        known = TARGET_LABELS | {label for name, _ in selectors for label in exported.get(name, ())}
        for name, matchers in selectors:
            own = TARGET_LABELS | set(exported.get(name, ()))
            for label, _, _ in MATCHER.findall(matchers):
                assert label in own, f"{panel['title']}: {name} has no label {label!r}"
        for grouping in GROUPING.findall(expr):
            for label in filter(None, (part.strip() for part in grouping.split(","))):
                assert label in known, f"{panel['title']}: no metric in {expr!r} has label {label!r}"


def test_every_metric_of_the_dashboard_is_read_in_the_selected_namespace() -> None:
    for panel, target in targets(load_dashboard()):
        for name, matchers in SELECTOR.findall(target["expr"]):
            assert 'namespace=~"$namespace"' in matchers, f"{panel['title']}: {name}{{{matchers}}}"
        bare = len(re.findall(r"\bcotmon_\w+|\bup\b", target["expr"])) - len(SELECTOR.findall(target["expr"]))
        assert bare == 0, f"{panel['title']}: a metric without a {{namespace=~...}} selector in {target['expr']!r}"


def test_no_query_selects_or_groups_by_a_session() -> None:
    for panel, target in targets(load_dashboard()):
        labels = [label for _, m in SELECTOR.findall(target["expr"]) for label, _, _ in MATCHER.findall(m)]
        labels += [part.strip() for grouping in GROUPING.findall(target["expr"]) for part in grouping.split(",")]
        sessions = [label for label in labels if "session" in label.lower()]
        assert not sessions, f"{panel['title']}: {sessions} in {target['expr']!r}"


def test_variables_are_few_and_only_used_in_regex_matchers() -> None:
    dashboard = load_dashboard()
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables.keys() == VARIABLES
    assert (variables["datasource"]["type"], variables["datasource"]["query"]) == ("datasource", "prometheus")
    for name in VARIABLES - {"datasource"}:
        assert variables[name]["includeAll"] is True and variables[name]["allValue"] == ".*", name
        assert variables[name]["datasource"] == DATASOURCE, name
    for panel, target in targets(dashboard):
        outside_regex = MATCHER.sub(lambda m: m.group(0) if m.group(2) != "=~" else "", target["expr"])
        leftover = {m.group(1) or m.group(2) for m in GRAFANA_VARIABLE.finditer(outside_regex)}
        assert leftover <= GRAFANA_INTERVALS.keys(), f"{panel['title']}: {leftover} outside a =~ matcher"
        inside = {m.group(1) or m.group(2) for m in GRAFANA_VARIABLE.finditer(target["expr"])}
        assert inside - GRAFANA_INTERVALS.keys() <= variables.keys(), panel["title"]


def test_error_panels_have_thresholds() -> None:
    for panel in data_panels(load_dashboard()):
        if re.search(r"error|up\b", panel["title"], re.IGNORECASE):
            steps = panel["fieldConfig"]["defaults"]["thresholds"]["steps"]
            assert any(step["color"] == "red" for step in steps), panel["title"]


def test_links_to_the_viewer_use_the_chart_placeholder() -> None:
    links = re.findall(r'"url":\s*"([^"]*)"', DASHBOARD.read_text(encoding="utf-8"))
    assert links
    assert all(link.startswith(VIEWER_URL_PLACEHOLDER + "/ui/") for link in links), links
