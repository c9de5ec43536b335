"""A flagged session is in the store before its flag is counted (and so before any alert can fire)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from conftest import ProbeFactory
from monitor.engine.hf import HFEngine
from monitor.observability import Metrics
from monitor.pipeline import Pipeline
from monitor.policy import parse_policy
from monitor.store import TranscriptStore
from monitor.types import ChatMessage, DetectorSpec, GenerationRequest, Transcript

FLAG_AT_FIFTH = {
    "name": "fifth",
    "category": "deception",
    "severity": "warning",
    "when": {"detector": "p", "stat": "count_over", "over": 0.0, "window": 5, "gte": 5},
    "actions": ["alert", "store"],
}
REQUEST = GenerationRequest((ChatMessage("user", "hi"),), max_tokens=30, ignore_eos=True, session_id="s1")


def _flags_counted(metrics: Metrics) -> float:
    value = metrics.registry.get_sample_value(
        "cotmon_flags_total", {"category": "deception", "severity": "warning", "rule": "fifth"}
    )
    return value or 0.0


class Watching(TranscriptStore):
    """The real store; at each checkpoint it notes the flag counter and what another connection sees."""

    def __init__(self, url: str, metrics: Metrics):
        super().__init__(url)
        self.metrics = metrics
        self.seen: list[tuple[float, Transcript | None]] = []

    def checkpoint(self, transcript: Transcript) -> None:
        counted_before = _flags_counted(self.metrics)
        super().checkpoint(transcript)
        with TranscriptStore(self.url) as other:  # a second connection: the commit is visible
            self.seen.append((counted_before, other.get(transcript.session_id)))


async def test_a_flag_is_counted_only_once_the_flagged_session_is_committed(
    engine: HFEngine, make_probe: ProbeFactory, tmp_path: Path
) -> None:
    metrics = Metrics(CollectorRegistry())
    store = Watching(f"sqlite:///{tmp_path / 't.db'}", metrics)
    spec = DetectorSpec("linear_probe", "p", {"artifact": str(make_probe())})
    pipeline = Pipeline(
        engine, [spec], parse_policy({"name": "t", "rules": [FLAG_AT_FIFTH]}, "t.yaml"), metrics=metrics, sinks=[store]
    )
    final = await pipeline.generate(REQUEST).run()
    [(counted_before, committed)] = store.seen
    assert counted_before == 0.0 and _flags_counted(metrics) == 1.0
    assert committed is not None and committed.outcome == "running" and len(committed.steps) == 5
    assert [f.rule for f in committed.flags] == ["fifth"]
    assert store.get("s1") == final and final.outcome == "completed" and len(final.steps) == 30
    store.close()


class Broken(TranscriptStore):
    def save(self, transcript: Any) -> None:
        raise OSError("disk full")


async def test_a_failing_store_still_lets_the_flag_count_and_counts_the_error(
    engine: HFEngine, make_probe: ProbeFactory, tmp_path: Path
) -> None:
    metrics = Metrics(CollectorRegistry())
    store = Broken(f"sqlite:///{tmp_path / 't.db'}")
    spec = DetectorSpec("linear_probe", "p", {"artifact": str(make_probe())})
    pipeline = Pipeline(
        engine, [spec], parse_policy({"name": "t", "rules": [FLAG_AT_FIFTH]}, "t.yaml"), metrics=metrics, sinks=[store]
    )
    transcript = await pipeline.generate(REQUEST).run()
    assert transcript.outcome == "completed" and _flags_counted(metrics) == 1.0
    assert metrics.registry.get_sample_value("cotmon_store_errors_total") == 2.0  # the checkpoint and the final write
    store.close()
