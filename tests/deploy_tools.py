"""Where the chart, its alert rules and dashboard live, and the real tools that check them: helm
and tsc from tests/node, promtool from Debian's prometheus (tests/components.py installs them).

Loaded as a pytest plugin by tests/conftest.py: the fixtures `helm`, `tsc` and `promtool` are the
binaries' paths; a missing one fails the test (component_fixtures.require)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from component_fixtures import require

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm" / "cotmon"
ALERTS = CHART / "files" / "alerts.yaml"
ALERT_TESTS = CHART / "files" / "alerts_test.yaml"
DASHBOARD = CHART / "files" / "dashboard.json"
EXAMPLES = ROOT / "helm" / "examples"
VIEWER_URL_PLACEHOLDER = "__COTMON_VIEWER_URL__"
"""Stands for the viewer's base URL in ALERTS; the chart and the tests replace it."""


@pytest.fixture(scope="session")
def helm() -> Path:
    return Path(require("helm"))


@pytest.fixture(scope="session")
def tsc() -> Path:
    return Path(require("tsc"))


@pytest.fixture(scope="session")
def promtool() -> str:
    return require("prometheus", "promtool")


def exported_metrics() -> dict[str, tuple[str, ...]]:
    """Series name -> label names, for every series cotmon's /metrics can show (counters with
    _total, histograms with _bucket/_sum/_count, from monitor.observability itself), plus
    Prometheus' own `up`."""
    from prometheus_client import CollectorRegistry

    from monitor.observability import Metrics

    registry = CollectorRegistry()
    metrics = Metrics(registry)
    # prometheus_client keeps a metric's label names only on the wrapper (collect() has no samples
    # for a labelled metric before its first use).
    labels = {w._name: tuple(w._labelnames) for w in vars(metrics).values() if hasattr(w, "_labelnames")}
    suffixes = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}
    names: dict[str, tuple[str, ...]] = {"up": ()}
    for family in registry.collect():
        for suffix in suffixes[family.type]:
            names[family.name + suffix] = labels[family.name] + (("le",) if suffix == "_bucket" else ())
    return names


def dashboard_panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel: rows, the panels at the top level and those a row keeps (collapsed rows do)."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


GRAFANA_INTERVALS = {"__rate_interval": "1m", "__interval": "1m", "__range": "10m"}
GRAFANA_VARIABLE = re.compile(r"\$\{(\w+)(?::[^}]*)?\}|\$(\w+)")


def substitute(expr: str) -> str:
    """A panel query as Grafana runs it here: intervals fixed, every other variable `All` (.*)."""

    def value(match: re.Match[str]) -> str:
        return GRAFANA_INTERVALS.get(match.group(1) or match.group(2), ".*")

    return GRAFANA_VARIABLE.sub(value, expr)
