"""Shared fixtures: the real tiny model, random probe artifacts, fresh metric registries."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from monitor.engine.hf import HFEngine
from monitor.observability import Metrics
from probes.linear import LinearProbe, ProbeMetadata

ProbeFactory = Callable[..., Path]


@pytest.fixture
def engine() -> HFEngine:
    return HFEngine.load("tiny")


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


@pytest.fixture
def forward_count(engine: HFEngine, monkeypatch: pytest.MonkeyPatch) -> Callable[[], int]:
    """Counts the engine's forward passes from now on; call the returned function to read it."""
    calls = 0
    forward = engine._forward

    def counting(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        return forward(*args, **kwargs)

    monkeypatch.setattr(engine, "_forward", counting)
    return lambda: calls
