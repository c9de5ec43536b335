"""Probe artifacts: round trip, validation with clear errors, and detector scores."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry
from safetensors.numpy import load_file, save_file

from conftest import ProbeFactory
from monitor.detector import DetectorContext, DetectorRegistry
from monitor.engine.hf import HFEngine
from monitor.observability import Metrics
from monitor.pipeline import Pipeline
from monitor.policy import Policy
from monitor.types import ChatMessage, DetectorSpec, ModelInfo
from probes.linear import ProbeArtifactError, ProbeDetector, load_probe

TEXT = "I will report that the migration succeeded.\n</think>\n\nThe migration succeeded."
MESSAGES = [ChatMessage("user", "How did the database migration go?")]


def _context(engine: HFEngine, tmp_path: Path) -> DetectorContext:
    return DetectorContext(model=engine.info, base_dir=tmp_path)


def test_artifact_round_trips(make_probe: ProbeFactory) -> None:
    stem = make_probe(layer=2)
    probe = load_probe(stem)
    again = load_probe(probe.save(stem.parent / "copy"))
    assert again.meta == probe.meta
    assert np.array_equal(again.direction, probe.direction) and again.bias == probe.bias


def test_probe_for_a_different_width_is_refused_naming_artifact_and_widths(
    make_probe: ProbeFactory, engine: HFEngine, tmp_path: Path
) -> None:
    stem = make_probe(name="wide", d_model=128)
    with pytest.raises(ProbeArtifactError) as err:
        ProbeDetector.create(DetectorSpec("linear_probe", "wide", {"artifact": str(stem)}), _context(engine, tmp_path))
    assert "wide" in str(err.value) and "d_model 128" in str(err.value) and "d_model 64" in str(err.value)


def test_probe_for_a_missing_layer_is_refused_naming_artifact_and_layer(
    make_probe: ProbeFactory, engine: HFEngine, tmp_path: Path
) -> None:
    stem = make_probe(name="deep", layer=9)
    with pytest.raises(ProbeArtifactError) as err:
        ProbeDetector.create(DetectorSpec("linear_probe", "deep", {"artifact": str(stem)}), _context(engine, tmp_path))
    assert "deep" in str(err.value) and "layer 9" in str(err.value) and "0..3" in str(err.value)


def test_probe_from_another_model_is_refused_unless_allowed(make_probe: ProbeFactory, tmp_path: Path) -> None:
    stem = make_probe()
    other = DetectorContext(model=ModelInfo("org/other", "x", 64, 4), base_dir=tmp_path)
    with pytest.raises(ProbeArtifactError, match="trained on model 'tiny', not 'org/other'"):
        ProbeDetector.create(DetectorSpec("linear_probe", "p", {"artifact": str(stem)}), other)
    ProbeDetector.create(DetectorSpec("linear_probe", "p", {"artifact": str(stem), "allow_other_model": True}), other)


def test_missing_tensor_is_named(make_probe: ProbeFactory) -> None:
    stem = make_probe()
    tensors = load_file(str(stem.with_suffix(".safetensors")))
    del tensors["scale"]
    save_file(tensors, str(stem.with_suffix(".safetensors")))
    with pytest.raises(ProbeArtifactError, match=r"p\.safetensors: missing tensor 'scale'"):
        load_probe(stem)


def test_tensor_of_wrong_shape_is_named(make_probe: ProbeFactory) -> None:
    stem = make_probe()
    tensors = load_file(str(stem.with_suffix(".safetensors")))
    tensors["mean"] = np.zeros(10, np.float32)
    save_file(tensors, str(stem.with_suffix(".safetensors")))
    with pytest.raises(ProbeArtifactError, match=r"tensor 'mean' has shape \(10,\), expected \(64,\)"):
        load_probe(stem)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("threshold", 1.5, "field 'threshold' must be within"),
        ("layer", "two", "field 'layer' has the wrong type"),
        ("format", "other/9", "field 'format'"),
    ],
)
def test_bad_metadata_field_is_named(make_probe: ProbeFactory, field: str, value: object, message: str) -> None:
    stem = make_probe()
    meta = json.loads(stem.with_suffix(".json").read_text())
    meta[field] = value
    stem.with_suffix(".json").write_text(json.dumps(meta))
    with pytest.raises(ProbeArtifactError, match=message) as err:
        load_probe(stem)
    assert str(stem.with_suffix(".json")) in str(err.value)


def test_missing_metadata_field_is_named(make_probe: ProbeFactory) -> None:
    stem = make_probe()
    meta = json.loads(stem.with_suffix(".json").read_text())
    del meta["d_model"]
    stem.with_suffix(".json").write_text(json.dumps(meta))
    with pytest.raises(ProbeArtifactError, match="missing field 'd_model'"):
        load_probe(stem)


async def test_detector_scores_equal_sigmoid_of_the_probe_on_captured_activations(
    make_probe: ProbeFactory, engine: HFEngine, tmp_path: Path
) -> None:
    stem = make_probe(layer=2)
    detector = ProbeDetector.create(DetectorSpec("linear_probe", "p", {"artifact": str(stem)}), _context(engine, tmp_path))
    engine.install(detector.readouts())
    scores = [d.score for s in [s async for s in engine.teacher_force(MESSAGES, TEXT)] for d in await detector.observe(s)]
    acts = engine.capture(MESSAGES, TEXT, [2])[2].numpy()
    expected = 1.0 / (1.0 + np.exp(-load_probe(stem).logits(acts)))
    assert len(scores) == len(expected)
    assert np.max(np.abs(np.array(scores) - expected)) <= 1e-5


async def test_detector_ignores_channels_it_is_not_asked_to_read(
    make_probe: ProbeFactory, engine: HFEngine, tmp_path: Path
) -> None:
    stem = make_probe()
    spec = DetectorSpec("linear_probe", "p", {"artifact": str(stem), "channels": ["reasoning"]})
    detector = ProbeDetector.create(spec, _context(engine, tmp_path))
    engine.install(detector.readouts())
    steps = [s async for s in engine.teacher_force(MESSAGES, TEXT)]
    scored = [s.channel for s in steps if await detector.observe(s)]
    assert set(scored) == {"reasoning"} and len(scored) < len(steps)
    assert detector.calibrated_threshold() == 0.5
    assert math.isclose(sum(1 for s in steps if s.channel == "reasoning"), len(scored))


def test_linear_probe_kind_is_registered_through_its_entry_point() -> None:
    registry = DetectorRegistry()
    registry.register_entry_points()
    assert registry.resolve("linear_probe") is ProbeDetector


async def test_a_pipeline_reads_the_artifact_once_however_many_streams_it_serves(
    make_probe: ProbeFactory, engine: HFEngine, tmp_path: Path
) -> None:
    stem = make_probe(layer=2)
    spec = DetectorSpec("linear_probe", "p", {"artifact": str(stem)})
    no_rules = Policy(name="none", description="", rules=(), source="<test>")
    pipeline = Pipeline(engine, [spec], no_rules, metrics=Metrics(CollectorRegistry()), base_dir=tmp_path)
    for path in (stem.with_suffix(".json"), stem.with_suffix(".safetensors")):
        path.unlink()  # each stream's detector is built from what the pipeline loaded
    first, second = [await pipeline.teacher_force(MESSAGES, TEXT).run() for _ in range(2)]
    assert first.detections and [d.score for d in first.detections] == [d.score for d in second.detections]
    assert {e.kind for d in first.detections for e in d.evidence} == {"probe"}
