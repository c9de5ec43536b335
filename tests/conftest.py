"""Shared fixtures: the real tiny model, random probe artifacts, fresh metric registries, a real server."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from monitor.build import NO_RULES, open_spool, open_store
from monitor.engine.base import Engine
from monitor.engine.batching import PromptCache
from monitor.engine.hf import HFEngine
from monitor.observability import Metrics
from monitor.pipeline import Pipeline
from monitor.policy import parse_policy
from monitor.server.app import create_app
from monitor.settings import Settings
from monitor.testing import ServerThread
from monitor.types import DetectorSpec
from probes.linear import LinearProbe, ProbeMetadata

# The real components (a missing one fails its tests), the transcript store's fixtures (store_url on
# SQLite and a throwaway PostgreSQL, stored sessions), the chart's tools (helm, tsc, promtool), and the
# container image's (podman; its tests run only with -m image).
pytest_plugins = ["component_fixtures", "store_fixtures", "deploy_tools", "container_tools"]

ProbeFactory = Callable[..., Path]


def free_port() -> int:
    """A loopback port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def spawn_serve(port: int, *args: str, env: dict[str, str], output: int | None = subprocess.DEVNULL) -> subprocess.Popen[bytes]:
    """`cotmon serve --port PORT ARGS...` as a process (of this venv), with `env` added to the environment."""
    cotmon = shutil.which("cotmon", path=str(Path(sys.executable).parent)) or "cotmon"
    stderr = subprocess.STDOUT if output == subprocess.PIPE else output
    return subprocess.Popen(
        [cotmon, "serve", "--port", str(port), *args], env={**os.environ, **env}, stdout=output, stderr=stderr
    )


def wait_ready(base_url: str, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    """Poll `base_url`/readyz until the server process answers 200 (it must stay alive meanwhile)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(base_url + "/readyz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline and proc.poll() is None, "server did not come up"
        time.sleep(0.1)


@pytest.fixture
def engine() -> HFEngine:
    return HFEngine.load("tiny")


ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / ".cotmon" / "models"
"""Where the real model is cached dequantised: the repo's default data dir, shared with `make demo`."""


@pytest.fixture(scope="session")
def real_model() -> HFEngine:
    """The embedded real model (smollm2), loaded once per test session (dequantised on the first)."""
    from component_fixtures import require  # a plugin this module registers: imported after it

    require("smollm2")
    return HFEngine.load("smollm2", models_dir=MODELS)


@pytest.fixture
def real_engine(real_model: HFEngine) -> Iterator[HFEngine]:
    """The real model, with no readouts installed before or after the test."""
    real_model.install([])
    yield real_model
    real_model.install([])


@pytest.fixture
def metrics() -> Metrics:
    return Metrics(CollectorRegistry())


@pytest.fixture
def make_probe(tmp_path: Path, engine: HFEngine) -> ProbeFactory:
    """Writes a random probe artifact for the tiny model and returns its stem path."""

    def make(
        name: str = "p",
        layer: int = 1,
        seed: int = 0,
        d_model: int | None = None,
        category: str = "deception",
        threshold: float = 0.5,
    ) -> Path:
        d = d_model or engine.info.d_model
        rng = np.random.default_rng(seed)
        probe = LinearProbe(
            meta=ProbeMetadata(
                name=name,
                category=category,
                model_id=engine.info.model_id,
                model_revision=engine.info.revision,
                layer=layer,
                d_model=d,
                threshold=threshold,
                target_fpr=0.01,
            ),
            direction=rng.standard_normal(d).astype(np.float32),
            bias=float(rng.standard_normal()),
            mean=rng.standard_normal(d).astype(np.float32) * 0.1,
            scale=rng.uniform(0.5, 2.0, d).astype(np.float32),
        )
        return probe.save(tmp_path / "probes" / name)

    return make


@contextmanager
def counting_forwards(model: Any) -> Iterator[Callable[[], int]]:
    """Counts `model`'s forward passes in the block (batched decode steps once each); the yielded
    function reads the count."""
    calls = 0

    def count(*_: Any) -> None:
        nonlocal calls
        calls += 1

    handle = model.register_forward_pre_hook(count)
    try:
        yield lambda: calls
    finally:
        handle.remove()


@pytest.fixture
def forward_count(engine: HFEngine) -> Iterator[Callable[[], int]]:
    """Counts the engine's forward passes from now on (no prompt read before is remembered); call
    the returned function to read it."""
    engine.prompts = PromptCache()
    with counting_forwards(engine.model) as count:
        yield count


# Fires when 5 tokens in a row score >= 0, i.e. on the 5th token, whatever the probe says.
HALT_AT_FIFTH = {
    "name": "halt-fifth",
    "category": "deception",
    "severity": "critical",
    "when": {"detector": "p", "stat": "count_over", "over": 0.0, "window": 5, "gte": 5},
    "actions": ["alert", "store", "halt"],
}
LONG_COT = {
    "name": "long-cot",
    "category": "deception",
    "severity": "critical",
    "when": {"detector": "p", "stat": "count_over", "over": 0.0, "window": 30, "gte": 30},
    "actions": ["alert", "store"],
}
"""Flags a session whose CoT reaches 30 tokens (the random probe scores every token above 0)."""
NEVER = {
    "name": "never",
    "category": "deception",
    "severity": "info",
    "when": {"detector": "p", "gte": 1.0},
    "actions": ["alert"],
}

Serve = Callable[..., Any]


@pytest.fixture
def serve(tmp_path: Path, make_probe: ProbeFactory, engine: HFEngine) -> Iterator[Serve]:
    """serve(rules=[...], engine=..., **settings) -> a running ServerThread (closed after the test)."""
    stack: list[ServerThread] = []

    def start(rules: list[dict[str, Any]] | None = None, use_engine: Engine | None = None, **overrides: Any) -> ServerThread:
        settings = Settings.load({}, data_dir=tmp_path / "data", **overrides)
        spec = DetectorSpec("linear_probe", "p", {"artifact": str(make_probe())})
        the_engine = use_engine or engine
        specs = [spec] if the_engine is engine or rules else []
        policy = parse_policy({"name": "test", "rules": rules or [NEVER]}, "test.yaml") if specs else NO_RULES
        metrics = Metrics(CollectorRegistry())
        store = open_store(settings)
        spool = open_spool(settings, store, metrics)  # as `cotmon serve` composes it
        pipeline = Pipeline(the_engine, specs, policy, metrics=metrics, sinks=[spool])
        server_app = create_app(settings, pipeline, store=store, spool=spool, model_name="tiny")
        server = ServerThread(server_app).__enter__()
        server.spool = spool  # type: ignore[attr-defined]
        server.pipeline = pipeline  # type: ignore[attr-defined]
        server.metrics = metrics  # type: ignore[attr-defined]
        server.settings = settings  # type: ignore[attr-defined]
        server.store = store  # type: ignore[attr-defined]
        server.admission = server_app.state.cotmon.admission  # type: ignore[attr-defined]
        stack.append(server)
        return server

    yield start
    for server in stack:
        server.__exit__(None, None, None)
        server.spool.close()  # type: ignore[attr-defined]
        server.store.close()  # type: ignore[attr-defined]
