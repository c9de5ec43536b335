"""Where the chart, its alert rules and dashboard live, and the real tools that check them: helm
and tsc from tests/node (`make node-deps`), promtool, prometheus and prometheus-alertmanager from
Debian's packages (`make system-deps`). A missing tool skips its tests and says how to install it.

Loaded as a pytest plugin by tests/conftest.py: the fixtures `helm`, `tsc` and `promtool` are the
binaries' paths (or a skip)."""

from __future__ import annotations

import shutil
from pathlib import Path

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


def exported_metric_names() -> set[str]:
    """Every series name cotmon's /metrics can show (counters with _total, histograms with
    _bucket/_sum/_count), from monitor.observability itself, plus Prometheus' own `up`."""
    from prometheus_client import CollectorRegistry

    from monitor.observability import Metrics

    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    registry = CollectorRegistry()
    Metrics(registry)
    return {"up"} | {m.name + suffix for m in registry.collect() for suffix in suffixes[m.type]}
