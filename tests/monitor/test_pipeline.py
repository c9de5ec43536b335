"""The pipeline: engine -> detectors -> policy -> sinks, with halts, metrics, logs and transcripts."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import Callable
from contextlib import aclosing
from pathlib import Path

import pytest
import structlog

from conftest import ProbeFactory
from monitor.detector import DetectorRegistry
from monitor.engine.batching import PromptCache
from monitor.engine.hf import HFEngine
from monitor.observability import Metrics, configure_logging
from monitor.pipeline import Pipeline
from monitor.policy import PolicyError, parse_policy
from monitor.store import TranscriptStore
from monitor.testing import ScriptedDetector, ScriptedEngine
from monitor.types import ChatMessage, DetectorSpec, GenerationRequest

MESSAGES = (ChatMessage("user", "Did you run the test suite?"),)


def _registry() -> DetectorRegistry:
    registry = DetectorRegistry()
    registry.register_entry_points()
    registry.register("readout_score", ScriptedDetector)
    return registry


def _policy(rules: list[dict[str, object]]) -> object:
    return parse_policy({"name": "test", "rules": rules}, "test-policy.yaml")


def _scripted(logits: list[float]) -> ScriptedEngine:
    return ScriptedEngine([(f"t{i} ", "reasoning") for i in range(len(logits))], [{"s": v} for v in logits])


HALT_RULE = {
    "name": "halt-it",
    "category": "deception",
    "severity": "critical",
    "when": {"detector": "s", "stat": "last", "gte": 0.9},
    "actions": ["alert", "store", "halt"],
}


async def test_halt_rule_stops_real_generation_within_one_token(
    make_probe: ProbeFactory, engine: HFEngine, metrics: Metrics, forward_count: Callable[[], int]
) -> None:
    spec = DetectorSpec("linear_probe", "p", {"artifact": str(make_probe(layer=1))})
    request = GenerationRequest(MESSAGES, max_tokens=40, temperature=0.9, seed=3)
    watch = _policy(
        [
            {
                "name": "never",
                "category": "deception",
                "severity": "info",
                "when": {"detector": "p", "gte": 1.0},
                "actions": ["alert"],
            }
        ]
    )
    free = await Pipeline(engine, [spec], watch, metrics=metrics).generate(request).run()  # type: ignore[arg-type]
    scores = [d.score for d in free.detections]
    trigger = scores.index(max(scores[5:30]), 5)  # first token reaching the bar, well inside the stream
    bar = scores[trigger]
    assert all(s < bar for s in scores[:trigger])
    engine.prompts = PromptCache()  # the halted run reads its prompt again: counted below
    before = forward_count()

    halting = _policy([{**HALT_RULE, "when": {"detector": "p", "stat": "last", "gte": bar}}])
    halted = await Pipeline(engine, [spec], halting, metrics=metrics).generate(request).run()  # type: ignore[arg-type]
    assert halted.outcome == "halted"
    assert halted.steps[-1].index == trigger  # the triggering token is the last one emitted
    assert forward_count() - before == 1 + trigger + 1  # prompt + one forward per emitted token: nothing computed after
    assert [f.rule for f in halted.flags] == ["halt-it"] and halted.flags[0].index == trigger
    assert metrics.registry.get_sample_value("cotmon_halts_total", {"rule": "halt-it"}) == 1


async def test_halt_with_scripted_engine_pulls_no_further_token(metrics: Metrics) -> None:
    engine = _scripted([-3, -2, 0, 3, -5, -5, -5])
    pipeline = Pipeline(
        engine,
        [DetectorSpec("readout_score", "s")],
        _policy([HALT_RULE]),  # type: ignore[arg-type]
        registry=_registry(),
        metrics=metrics,
    )
    transcript = await pipeline.generate(GenerationRequest(MESSAGES)).run()
    assert transcript.outcome == "halted" and len(transcript.steps) == 4 and engine.pulled == 4


async def test_flagged_transcript_goes_to_the_store_and_unflagged_does_not(tmp_path: Path, metrics: Metrics) -> None:
    sink = TranscriptStore.at(tmp_path)
    rule = {**HALT_RULE, "actions": ["alert", "store"]}
    flagged = Pipeline(
        _scripted([0, 4, 0]),
        [DetectorSpec("readout_score", "s")],
        _policy([rule]),  # type: ignore[arg-type]
        registry=_registry(),
        metrics=metrics,
        sinks=[sink],
    )
    await flagged.generate(GenerationRequest(MESSAGES, session_id="flagged")).run()
    calm = Pipeline(
        _scripted([0, 0, 0]),
        [DetectorSpec("readout_score", "s")],
        _policy([rule]),  # type: ignore[arg-type]
        registry=_registry(),
        metrics=metrics,
        sinks=[sink],
    )
    await calm.generate(GenerationRequest(MESSAGES, session_id="calm")).run()
    assert [s.session_id for s in sink.sessions()] == ["flagged"]
    stored = sink.get("flagged")
    assert stored is not None and stored.flags[0].rule == "halt-it" and stored.detector_specs[0].kind == "readout_score"
    assert len(stored.steps) == 3 and stored.policy["name"] == "test"


async def test_metrics_count_tokens_flags_scores_and_sessions(metrics: Metrics) -> None:
    pipeline = Pipeline(
        _scripted([0, 4, 0, 0]),
        [DetectorSpec("readout_score", "s")],
        _policy([{**HALT_RULE, "actions": ["alert"]}]),
        registry=_registry(),
        metrics=metrics,
    )  # type: ignore[arg-type]
    await pipeline.generate(GenerationRequest(MESSAGES)).run()
    value = metrics.registry.get_sample_value
    assert value("cotmon_tokens_total", {"channel": "reasoning"}) == 4
    assert value("cotmon_flags_total", {"category": "deception", "severity": "critical", "rule": "halt-it"}) == 1
    assert value("cotmon_sessions_total", {"outcome": "completed"}) == 1
    assert value("cotmon_detector_score_count", {"detector": "s", "category": "deception"}) == 4
    assert value("cotmon_detector_seconds_count", {"detector": "s"}) == 4
    assert value("cotmon_flag_latency_seconds_count") == 1
    assert value("cotmon_sessions_active") == 0


def test_a_new_pipeline_exports_each_rules_series_at_zero(metrics: Metrics) -> None:
    """Before any session: Prometheus needs a 0 sample before the first flag, or the first flag of a
    rule shows no increase() and raises no alert."""
    watch = {**HALT_RULE, "name": "watch-it", "severity": "warning", "actions": ["alert"]}
    Pipeline(
        _scripted([0]), [DetectorSpec("readout_score", "s")], _policy([HALT_RULE, watch]), registry=_registry(), metrics=metrics
    )  # type: ignore[arg-type]
    value = metrics.registry.get_sample_value
    assert value("cotmon_flags_total", {"category": "deception", "severity": "critical", "rule": "halt-it"}) == 0
    assert value("cotmon_flags_total", {"category": "deception", "severity": "warning", "rule": "watch-it"}) == 0
    assert value("cotmon_halts_total", {"rule": "halt-it"}) == 0
    assert value("cotmon_halts_total", {"rule": "watch-it"}) is None  # it cannot halt
    assert value("cotmon_tokens_total", {"channel": "answer"}) == 0
    assert value("cotmon_sessions_total", {"outcome": "halted"}) == 0
    assert value("cotmon_sessions_total", {"outcome": "running"}) is None
    assert value("cotmon_detector_seconds_count", {"detector": "s"}) == 0


async def test_one_canonical_log_line_per_session() -> None:
    out = io.StringIO()
    configure_logging(json=True, stream=out)
    try:
        pipeline = Pipeline(
            _scripted([0, 4]),
            [DetectorSpec("readout_score", "s")],
            _policy([HALT_RULE]),  # type: ignore[arg-type]
            registry=_registry(),
            metrics=Metrics(__import__("prometheus_client").CollectorRegistry()),
        )
        await pipeline.generate(GenerationRequest(MESSAGES, session_id="abc")).run()
    finally:
        structlog.reset_defaults()
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert len(lines) == 1
    assert lines[0]["event"] == "session" and lines[0]["session_id"] == "abc" and lines[0]["outcome"] == "halted"
    assert lines[0]["halted_by"] == "halt-it" and lines[0]["tokens"] == 2


async def test_leaving_early_records_the_session_as_aborted(metrics: Metrics) -> None:
    engine = _scripted([0] * 10)
    pipeline = Pipeline(engine, [DetectorSpec("readout_score", "s")], _policy([HALT_RULE]), registry=_registry(), metrics=metrics)  # type: ignore[arg-type]
    session = pipeline.generate(GenerationRequest(MESSAGES))
    async with aclosing(session.events()) as events:
        async for event in events:
            if event.step.index == 2:
                break
    assert session.transcript is not None and session.transcript.outcome == "aborted"
    assert engine.pulled == 3
    assert metrics.registry.get_sample_value("cotmon_sessions_total", {"outcome": "aborted"}) == 1


async def test_late_detections_join_the_policy_evaluation(metrics: Metrics) -> None:
    rule = {
        "name": "judge-says",
        "category": "deception",
        "severity": "warning",
        "when": {"detector": "s", "category": "late", "gte": 0.9},
        "actions": ["alert"],
    }
    spec = DetectorSpec("readout_score", "s", {"emit_late_at": 1})
    pipeline = Pipeline(
        _scripted([0, 0, 0, 0]),
        [spec],
        parse_policy({"name": "t", "rules": [rule]}, "t.yaml"),
        registry=_registry(),
        metrics=metrics,
    )
    transcript = await pipeline.generate(GenerationRequest(MESSAGES)).run()
    assert [(f.rule, f.index) for f in transcript.flags] == [("judge-says", 2)]


def test_policy_naming_a_detector_that_does_not_exist_is_refused(metrics: Metrics) -> None:
    rule = {**HALT_RULE, "when": {"detector": "nope", "gte": 0.5}}
    with pytest.raises(PolicyError, match=r"test-policy\.yaml.*rule 'halt-it'.*unknown detector 'nope'"):
        Pipeline(_scripted([0]), [DetectorSpec("readout_score", "s")], _policy([rule]), registry=_registry(), metrics=metrics)  # type: ignore[arg-type]


class BrokenEngine(ScriptedEngine):
    """Fails after a few tokens, like a model crashing mid-generation."""

    async def _play(self, session_id: str):  # type: ignore[no-untyped-def,override]
        async for step in super()._play(session_id):
            if step.index == 3:
                raise RuntimeError("device lost")
            yield step


async def test_an_engine_crash_still_stores_the_flagged_transcript(tmp_path: Path, metrics: Metrics) -> None:
    engine = BrokenEngine([(f"t{i}", "reasoning") for i in range(6)], [{"s": 4.0}] * 6)
    sink = TranscriptStore.at(tmp_path)
    rule = {**HALT_RULE, "actions": ["alert", "store"]}
    pipeline = Pipeline(
        engine, [DetectorSpec("readout_score", "s")], _policy([rule]), registry=_registry(), metrics=metrics, sinks=[sink]
    )  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="device lost"):
        await pipeline.generate(GenerationRequest(MESSAGES, session_id="crash")).run()
    stored = sink.get("crash")
    assert stored is not None and (stored.outcome, len(stored.steps)) == ("error", 3)
    assert stored.error is not None and "device lost" in stored.error


async def test_cancelling_the_consumer_records_an_aborted_session(
    engine: HFEngine, make_probe: ProbeFactory, metrics: Metrics
) -> None:
    spec = DetectorSpec("linear_probe", "p", {"artifact": str(make_probe())})
    never = _policy(
        [{"name": "n", "category": "deception", "severity": "info", "when": {"detector": "p", "gte": 1.0}, "actions": ["alert"]}]
    )
    session = Pipeline(engine, [spec], never, metrics=metrics).generate(GenerationRequest(MESSAGES, max_tokens=10_000))  # type: ignore[arg-type]
    task = asyncio.ensure_future(session.run())
    while len(session.steps) < 5:
        await asyncio.sleep(0.001)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert session.transcript is not None and session.transcript.outcome == "aborted"
    assert 5 <= len(session.transcript.steps) < 10_000
