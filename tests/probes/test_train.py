"""Probe training: recovery of a planted direction, calibration, sklearn equality, cache, CLI, auto pack."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from sklearn.metrics import roc_auc_score

from monitor.build import AUTO, build_pipeline, resolve_probes
from monitor.cli import main
from monitor.engine.hf import HFEngine
from monitor.settings import Settings
from policies import bundled_policy
from probes.datasets import load_contrast
from probes.linear import ProbeMetadata
from probes.pack import default_pack, is_current, pack_dir
from probes.train import ActivationCache, calibrate, extract, fit, to_probe

D = 32


def _planted(rng: np.random.Generator, n: int, direction: np.ndarray, label: int) -> np.ndarray:
    """Gaussian activations with a random offset; positives shifted along `direction`."""
    base = rng.standard_normal((n, D)).astype(np.float32) * rng.uniform(0.5, 2.0, D).astype(np.float32) + 3.0
    return base + (6.0 * direction if label else 0.0)


@pytest.fixture
def planted() -> tuple[np.ndarray, np.random.Generator]:
    rng = np.random.default_rng(7)
    direction = rng.standard_normal(D).astype(np.float32)
    return direction / np.linalg.norm(direction), rng


def test_training_recovers_a_planted_direction_and_calibrates_its_false_positive_rate(
    planted: tuple[np.ndarray, np.random.Generator],
) -> None:
    direction, rng = planted
    x = np.concatenate([_planted(rng, 3000, direction, 0), _planted(rng, 3000, direction, 1)])
    y = np.array([0] * 3000 + [1] * 3000)
    groups = np.arange(6000) // 10
    scaler, model = fit(x, y, groups)
    probe = to_probe(scaler, model, _meta())
    fresh = np.concatenate([_planted(rng, 2000, direction, 0), _planted(rng, 2000, direction, 1)])
    scores = 1 / (1 + np.exp(-probe.logits(fresh)))
    assert roc_auc_score([0] * 2000 + [1] * 2000, scores) >= 0.99

    control = 1 / (1 + np.exp(-probe.logits(_planted(rng, 20000, direction, 0))))
    threshold = calibrate(control, 0.01)
    fresh_control = 1 / (1 + np.exp(-probe.logits(_planted(rng, 20000, direction, 0))))
    assert abs(float(np.mean(fresh_control >= threshold)) - 0.01) <= 0.01


def test_probe_scores_equal_sklearn_predict_proba(planted: tuple[np.ndarray, np.random.Generator]) -> None:
    direction, rng = planted
    x = np.concatenate([_planted(rng, 500, direction, 0), _planted(rng, 500, direction, 1)])
    y = np.array([0] * 500 + [1] * 500)
    scaler, model = fit(x, y, np.arange(1000) // 5)
    probe = to_probe(scaler, model, _meta())
    ours = 1 / (1 + np.exp(-probe.logits(x)))
    theirs = model.predict_proba(scaler.transform(x))[:, 1]
    assert np.max(np.abs(ours - theirs)) <= 1e-5
    weight, bias = probe.folded()  # what the engine computes on device, in fp32
    folded = 1 / (1 + np.exp(-(x.astype(np.float64) @ weight.astype(np.float64) + bias)))
    assert np.max(np.abs(folded - theirs)) <= 1e-5


def test_calibration_never_exceeds_the_target_on_its_own_sample() -> None:
    scores = np.random.default_rng(0).random(1000)
    for target in (0.0, 0.01, 0.05, 0.5):
        assert float(np.mean(scores >= calibrate(scores, target))) <= target


def test_the_activation_cache_resumes_without_recomputing(engine: HFEngine, tmp_path: Path) -> None:
    items = load_contrast("deception", 3)
    cache = ActivationCache(tmp_path, engine, [1, 2])
    first = extract(engine, items[:2], [1, 2], cache=cache)  # an "interrupted" run
    captured = 0
    capture_many = engine.capture_many

    def counting(batch: list[object], layers: list[int]) -> object:
        nonlocal captured
        captured += len(batch)
        return capture_many(batch, layers)  # type: ignore[arg-type]

    engine.capture_many = counting  # type: ignore[method-assign,assignment]
    resumed = extract(engine, items, [1, 2], cache=cache)
    assert captured == len(items) - 2
    n = len(first.labels)
    assert np.array_equal(resumed.by_layer[1][:n], first.by_layer[1])


def test_probes_train_cli_prints_the_layer_table_and_writes_the_artifact(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        main,
        [
            "probes",
            "train",
            "--model",
            "tiny",
            "--dataset",
            "deception",
            "--limit",
            "30",
            "--calibration-limit",
            "60",
            "--out",
            str(tmp_path / "out"),
            "--cache",
            str(tmp_path / "cache"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "per-layer AUROC" in result.output and "<- chosen" in result.output and "thresholds per statistic" in result.output
    meta = json.loads((tmp_path / "out" / "deception_probe.json").read_text())
    assert meta["target_fpr"] == 0.01 and 0 <= meta["layer"] < 4 and [r["layer"] for r in meta["layers"]] == [0, 1, 2, 3]
    calibration = meta["calibration"]
    assert calibration["unit"] == "session" and calibration["texts"].startswith("generated by tiny")
    assert set(calibration["statistics"]) == {"last", "mean@8", "mean@16", "mean@32", "mean@64", "ema@16", "ema@32"}
    assert all(s["calibration_n"] == 20 and s["heldapart_n"] == 20 for s in calibration["statistics"].values())
    assert meta["threshold"] == calibration["statistics"]["last"]["threshold"]


def test_probes_train_reads_a_user_file_with_field_names_and_a_control_set(tmp_path: Path) -> None:
    rows = [
        {
            "cot": {"text": f"I will {'hide' if i % 2 else 'report'} the failing test number {i}."},
            "kind": "bad" if i % 2 else "ok",
        }
        for i in range(24)
    ]
    data = tmp_path / "mine.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    control = tmp_path / "control.csv"
    control.write_text("cot.text\n" + "".join(f"All {i} tests were run and reported.\n" for i in range(12)))
    result = CliRunner().invoke(
        main,
        [
            "probes",
            "train",
            "--model",
            "tiny",
            "--dataset",
            str(data),
            "--text-field",
            "cot.text",
            "--label-field",
            "kind",
            "--positive",
            "bad",
            "--control",
            str(control),
            "--calibration-limit",
            "30",
            "--name",
            "mine",
            "--out",
            str(tmp_path / "out"),
            "--cache",
            str(tmp_path / "c"),
        ],
    )
    assert result.exit_code == 0, result.output
    meta = json.loads((tmp_path / "out" / "mine.json").read_text())
    assert "control set" in meta["training_data"][-1] and "control set" in meta["calibration"]["texts"]
    assert {s["calibration_n"] + s["heldapart_n"] for s in meta["calibration"]["statistics"].values()} == {12}


def test_auto_pack_trains_once_then_serve_loads_it_from_the_cache(engine: HFEngine, tmp_path: Path) -> None:
    root = tmp_path / "data" / "probes"  # where `serve --probes auto` looks for COTMON_DATA_DIR=tmp_path/data
    directory = default_pack(engine, root)
    stamps = {p.name: p.stat().st_mtime_ns for p in directory.iterdir()}
    assert {"deception_probe.json", "harmful_probe.json"} <= set(stamps)
    assert default_pack(engine, root) == directory
    settings = Settings.load({}, data_dir=tmp_path / "data", probes=AUTO, model="tiny")
    pipeline = build_pipeline(settings, bundled_policy("default"))
    assert sorted(s.name for s in pipeline.specs) == ["deception_probe", "harmful_probe"]
    assert {p.name: p.stat().st_mtime_ns for p in directory.iterdir()} == stamps  # nothing was retrained


def write_current_pack(directory: Path) -> None:
    """Artifacts `is_current` accepts (their contents are not read by the lookup)."""
    directory.mkdir(parents=True)
    current = {"calibration": {"unit": "session", "statistics": {}, "check": {"target_fpr": 0.05, "statistics": {}}}}
    for name in ("deception_probe", "harmful_probe"):
        (directory / f"{name}.json").write_text(json.dumps(current))
        (directory / f"{name}.safetensors").write_bytes(b"")


def test_a_current_prebuilt_pack_is_served_without_training(
    engine: HFEngine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    prebuilt = tmp_path / "image" / "probes"
    write_current_pack(pack_dir(prebuilt, engine))
    monkeypatch.setattr("probes.pack.train_pack", lambda *a, **k: pytest.fail("trained although a prebuilt pack is current"))
    assert default_pack(engine, tmp_path / "data" / "probes", prebuilt=[prebuilt]) == pack_dir(prebuilt, engine)
    assert not (tmp_path / "data").exists()
    settings = Settings.load({"COTMON_PREBUILT_DIR": str(tmp_path / "image")}, model="tiny", data_dir=tmp_path / "data")
    assert resolve_probes(settings, engine) == pack_dir(prebuilt, engine)


def test_a_prebuilt_pack_that_is_not_whole_is_trained_under_the_data_dir(
    engine: HFEngine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    prebuilt = tmp_path / "image" / "probes"
    write_current_pack(pack_dir(prebuilt, engine))
    (pack_dir(prebuilt, engine) / "harmful_probe.safetensors").unlink()
    trained: list[Path] = []
    monkeypatch.setattr("probes.pack.train_pack", lambda console, engine, directory, **k: trained.append(directory))
    root = tmp_path / "data" / "probes"
    assert default_pack(engine, root, prebuilt=[prebuilt]) == pack_dir(root, engine) == trained[0]


def test_prepare_builds_nothing_a_prebuilt_dir_holds(engine: HFEngine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_current_pack(pack_dir(tmp_path / "image" / "probes", engine))
    monkeypatch.setattr("probes.pack.train_pack", lambda *a, **k: pytest.fail("trained although a prebuilt pack is current"))
    env = {"COTMON_DATA_DIR": str(tmp_path / "data"), "COTMON_PREBUILT_DIR": str(tmp_path / "image")}
    result = CliRunner().invoke(main, ["prepare", "--model", "tiny"], env=env)
    assert result.exit_code == 0, result.output
    assert f"probes: {pack_dir(tmp_path / 'image' / 'probes', engine)}" in result.output


def test_a_cached_pack_from_before_per_statistic_calibration_is_not_served(tmp_path: Path) -> None:
    stem = tmp_path / "deception_probe"
    current = {"calibration": {"unit": "session", "statistics": {}, "check": {"target_fpr": 0.05, "statistics": {}}}}
    for meta, expected in (
        (current, True),
        ({"calibration": {"unit": "session", "statistics": {}}}, False),  # no 5% check: older
        ({"threshold": 0.9}, False),  # per-token only
        ([], False),
    ):
        stem.with_suffix(".json").write_text(json.dumps(meta))
        stem.with_suffix(".safetensors").write_bytes(b"")
        assert is_current(stem) is expected, meta
    stem.with_suffix(".json").write_text("{not json")
    assert not is_current(stem)
    stem.with_suffix(".json").write_text(json.dumps(current))
    stem.with_suffix(".safetensors").unlink()
    assert not is_current(stem)  # half a pack


def _meta() -> ProbeMetadata:
    return ProbeMetadata(
        name="planted",
        category="test",
        model_id="synthetic",
        model_revision="0",
        layer=0,
        d_model=D,
        threshold=0.5,
        target_fpr=0.01,
    )
