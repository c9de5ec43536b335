"""Where the chart, its alert rules and dashboard live, and the real tools that check them: helm
and tsc from tests/node (`make node-deps`), promtool, prometheus and prometheus-alertmanager from
Debian's packages (`make system-deps`). A missing tool skips its tests and says how to install it.

Loaded as a pytest plugin by tests/conftest.py: the fixtures `helm`, `tsc` and `promtool` are the
binaries' paths (or a skip)."""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm" / "cotmon"
ALERTS = CHART / "files" / "alerts.yaml"
ALERT_TESTS = CHART / "files" / "alerts_test.yaml"
DASHBOARD = CHART / "files" / "dashboard.json"
EXAMPLES = ROOT / "helm" / "examples"
NODE_BIN = ROOT / "tests" / "node" / "node_modules" / ".bin"
VIEWER_URL_PLACEHOLDER = "__COTMON_VIEWER_URL__"
"""Stands for the viewer's base URL in ALERTS; the chart and the tests replace it."""


def node_tool(name: str) -> Path:
    """tests/node's `name` (helm, tsc), or a skip that says how to install it."""
    path = NODE_BIN / name
    if not path.exists():
        pytest.skip(f"{name} is not installed: `make node-deps` puts it in {NODE_BIN} (needs npm)")
    return path


def system_tool(name: str) -> str:
    """A tool on PATH (promtool, prometheus, prometheus-alertmanager), or a skip naming its package."""
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed: `make system-deps` installs it with apt (prometheus, prometheus-alertmanager)")
    return path


@pytest.fixture(scope="session")
def helm() -> Path:
    return node_tool("helm")


@pytest.fixture(scope="session")
def tsc() -> Path:
    return node_tool("tsc")


@pytest.fixture(scope="session")
def promtool() -> str:
    return system_tool("promtool")


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
