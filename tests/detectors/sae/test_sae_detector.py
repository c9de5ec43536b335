"""SAE features on the real tiny model: watched readouts equal the full encode; the detector, its
errors, explanations of flagged spans, and `cotmon sae inspect`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from prometheus_client import CollectorRegistry
from safetensors.torch import save_file

from detectors.sae.detector import SAEFeatureDetector
from detectors.sae.formats import load_sae
from detectors.sae.model import SAE, SAEError
from detectors.sae.readouts import watched_readouts, watched_values
from monitor.build import build_pipeline
from monitor.cli import main
from monitor.detector import DetectorContext, DetectorError
from monitor.engine.hf import HFEngine
from monitor.observability import Metrics
from monitor.pipeline import Pipeline
from monitor.policy import parse_policy
from monitor.settings import Settings
from monitor.types import ChatMessage, DetectorSpec, DeviceReadout, Readout
from policies import bundled_policy

MESSAGES = [ChatMessage("user", "Summarise the quarterly report for the board.")]
TEXT = "The revenue fell 4% but I will say it grew, and nobody will check.\n</think>\n\nRevenue grew."
LAYER, D_SAE = 2, 96
WATCHED = list(range(0, D_SAE, 6))  # 16 features


def write_saelens(folder: Path, arch: str, *, d_in: int = 64, seed: int = 0, **cfg: Any) -> Path:
    """A SAELens v6 folder with random weights scaled so that roughly a third of features fire."""
    g = torch.Generator().manual_seed(seed)
    W_enc = torch.randn(d_in, D_SAE, generator=g) / d_in**0.5
    tensors = {"W_enc": W_enc, "W_dec": torch.randn(D_SAE, d_in, generator=g), "b_dec": 0.1 * torch.randn(d_in, generator=g)}
    bias = 0.3 * torch.randn(D_SAE, generator=g) - 0.2
    if arch == "gated":
        r_mag, b_mag = 0.2 * torch.randn(D_SAE, generator=g), 0.1 * torch.randn(D_SAE, generator=g)
        tensors |= {"b_gate": bias, "r_mag": r_mag, "b_mag": b_mag}
    else:
        tensors["b_enc"] = bias
    if arch == "jumprelu":
        tensors["threshold"] = 0.4 * torch.rand(D_SAE, generator=g)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "sae_weights.safetensors"))
    meta = {"hook_name": f"blocks.{LAYER}.hook_resid_post", "model_name": "tiny", "sae_lens_version": "6.18.0"}
    config = {"architecture": arch, "d_in": d_in, "d_sae": D_SAE, "apply_b_dec_to_input": True, "metadata": meta} | cfg
    (folder / "cfg.json").write_text(json.dumps(config))
    return folder


def encode_reference(engine: HFEngine, sae: SAE) -> np.ndarray:
    """The full encode of the text's tokens from raw captured activations: [tokens, d_sae]."""
    acts = engine.capture(MESSAGES, TEXT, [sae.info.layer])[sae.info.layer]
    with torch.inference_mode():
        return sae.encode(acts).double().numpy()


async def readout_values(engine: HFEngine, sae: SAE, indices: list[int]) -> np.ndarray:
    engine.install(watched_readouts(sae, "sae", indices))
    steps = [s async for s in engine.teacher_force(MESSAGES, TEXT)]
    rows = [watched_values(sae, "sae", indices, s.readouts) for s in steps]
    return np.array([[row[i] for i in indices] for row in rows])


@pytest.mark.parametrize("arch", ["standard", "jumprelu", "gated"])
async def test_watched_columns_equal_the_full_encode(engine: HFEngine, tmp_path: Path, arch: str) -> None:
    sae = load_sae(write_saelens(tmp_path / arch, arch))
    readouts = watched_readouts(sae, "sae", WATCHED)
    assert all(isinstance(r, Readout) for r in readouts)  # fused linear columns, no device function
    assert len(readouts) == len(WATCHED) * (2 if arch == "gated" else 1)
    got = await readout_values(engine, sae, WATCHED)
    want = encode_reference(engine, sae)[:, WATCHED]
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    assert (want == 0).mean() > 0.2 and (want > 0).mean() > 0.2  # thresholds and gates decide


@pytest.mark.parametrize("norm", ["constant_norm_rescale", "layer_norm"])
async def test_per_token_normalised_saes_read_out_through_a_device_function(engine: HFEngine, tmp_path: Path, norm: str) -> None:
    sae = load_sae(write_saelens(tmp_path / norm, "jumprelu", normalize_activations=norm))
    assert [type(r) for r in watched_readouts(sae, "sae", WATCHED)] == [DeviceReadout]
    got = await readout_values(engine, sae, WATCHED)
    np.testing.assert_allclose(got, encode_reference(engine, sae)[:, WATCHED], atol=1e-5, rtol=1e-5)


async def test_topk_features_come_from_the_exact_full_encode_not_a_slice(engine: HFEngine, tmp_path: Path) -> None:
    """TopK: a watched feature is on only if it is among the token's k largest pre-activations."""
    sae = load_sae(write_saelens(tmp_path / "topk", "topk", k=8))
    assert [type(r) for r in watched_readouts(sae, "sae", WATCHED)] == [DeviceReadout]
    got = await readout_values(engine, sae, WATCHED)
    want = encode_reference(engine, sae)[:, WATCHED]
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    # What a sliced ReLU column would say disagrees: that is why TopK is not sliced.
    acts = engine.capture(MESSAGES, TEXT, [LAYER])[LAYER].double()
    naive = torch.relu((acts - sae.b_dec.double()) @ sae.W_enc.double()[:, WATCHED] + sae.b_enc.double()[WATCHED]).numpy()
    assert np.mean(np.abs(naive - want) > 1e-4) > 0.1


def test_explanation_readout_gives_each_tokens_top_features(engine: HFEngine, tmp_path: Path) -> None:
    sae = load_sae(write_saelens(tmp_path / "j", "jumprelu"))
    (top,) = watched_readouts(sae, "sae", [], top=4)
    assert isinstance(top, DeviceReadout) and len(top.names) == 8
    acts = engine.capture(MESSAGES, TEXT, [LAYER])[LAYER]
    values = top.build("cpu")(acts).numpy()
    full = encode_reference(engine, sae)
    for t in range(len(full)):
        order = np.argsort(-full[t])[:4]
        assert values[t, 0::2].astype(int).tolist() == order.tolist()
        np.testing.assert_allclose(values[t, 1::2], full[t, order], atol=1e-5)


def _context(engine: HFEngine, tmp_path: Path) -> DetectorContext:
    return DetectorContext(model=engine.info, base_dir=tmp_path)


def _create(engine: HFEngine, tmp_path: Path, **args: Any) -> SAEFeatureDetector:
    return SAEFeatureDetector.create(DetectorSpec("sae_features", "sae", args), _context(engine, tmp_path))


def test_an_sae_for_another_width_is_refused_naming_its_folder(engine: HFEngine, tmp_path: Path) -> None:
    folder = write_saelens(tmp_path / "wide", "jumprelu", d_in=128)
    with pytest.raises(SAEError, match=r"reads d_in 128, but model 'tiny' has d_model 64") as err:
        _create(engine, tmp_path, sae=str(folder), watch=[1], threshold=1.0)
    assert str(folder) in str(err.value)


def test_a_layer_the_model_lacks_is_refused(engine: HFEngine, tmp_path: Path) -> None:
    folder = write_saelens(tmp_path / "j", "jumprelu")
    with pytest.raises(SAEError, match=r"reads layer 9, but model 'tiny' has layers 0..3"):
        _create(engine, tmp_path, sae=str(folder), layer=9, watch=[1], threshold=1.0)


@pytest.mark.parametrize(
    ("entry", "problem"),
    [
        (96, r"feature 96 is out of range: the SAE has 96 features \(0..95\)"),
        ({"feature": 3}, r"watch\[0\]: missing field 'threshold'"),
        ({"feature": 3, "threshold": "0.5x max"}, "give field 'max_activation'"),
        ({"feature": 3, "threshold": 1, "colour": "red"}, "unknown field"),
        ("np:tiny/2-res-96/5", "the SAE's Neuronpedia id is unknown"),
        ("feature five", "is not an index, np:MODEL/SOURCE/INDEX"),
    ],
)
def test_bad_watch_entries_are_refused_naming_the_sae_and_the_entry(
    engine: HFEngine, tmp_path: Path, entry: Any, problem: str
) -> None:
    folder = write_saelens(tmp_path / "j", "jumprelu")
    with pytest.raises(SAEError, match=problem) as err:
        _create(engine, tmp_path, sae=str(folder), watch=[entry])
    assert "detector 'sae'" in str(err.value)
    if isinstance(entry, int):
        assert str(folder) in str(err.value)


def test_neuronpedia_references_resolve_and_are_checked_against_the_source(engine: HFEngine, tmp_path: Path) -> None:
    folder = write_saelens(tmp_path / "j", "jumprelu")
    watch = [
        {"feature": "np:tiny/2-res-96/5", "threshold": 1.0},
        {"feature": "https://www.neuronpedia.org/tiny/2-res-96/7?embed=true", "threshold": "0.25x max", "max_activation": 8},
    ]
    det = _create(engine, tmp_path, sae=str(folder), neuronpedia="tiny/2-res-96", watch=watch)
    assert [(w.index, w.threshold) for w in det.watched] == [(5, 1.0), (7, 2.0)]
    with pytest.raises(SAEError, match="names Neuronpedia source 'tiny/3-res-96', but this SAE is 'tiny/2-res-96'"):
        _create(engine, tmp_path, sae=str(folder), neuronpedia="tiny/2-res-96", watch=["np:tiny/3-res-96/5"], threshold=1)
    with pytest.raises(SAEError, match="is a layer-3 feature, but the SAE reads layer 2"):
        _create(engine, tmp_path, sae=str(folder), neuronpedia="tiny/3-res-96", watch=["np:tiny/3-res-96/5"], threshold=1)


def _pipeline(engine: HFEngine, specs: list[DetectorSpec], rules: list[dict[str, Any]], tmp_path: Path) -> Pipeline:
    policy = parse_policy({"name": "t", "rules": rules}, "t.yaml")
    return Pipeline(engine, specs, policy, metrics=Metrics(CollectorRegistry()), base_dir=tmp_path)


async def test_watched_features_score_half_at_their_threshold_and_carry_their_label(engine: HFEngine, tmp_path: Path) -> None:
    folder = write_saelens(tmp_path / "j", "jumprelu")
    sae = load_sae(folder)
    full = encode_reference(engine, sae)
    feature = int(np.argmax((full > 0).sum(axis=0)))
    threshold = float(np.median(full[full[:, feature] > 0, feature]))
    watch = [{"feature": feature, "label": "secrecy", "category": "deception", "threshold": threshold}]
    spec = DetectorSpec("sae_features", "sae", {"sae": str(folder), "watch": watch})
    rule = {"name": "secret", "category": "deception", "severity": "warning", "when": {"detector": "sae", "gte": "calibrated"}}
    session = _pipeline(engine, [spec], [rule | {"actions": ["alert"]}], tmp_path).teacher_force(MESSAGES, TEXT)
    transcript = await session.run()
    scores = np.array([d.score for d in transcript.detections])
    acts = full[:, feature]
    np.testing.assert_allclose(scores, np.where(acts > 0, acts / (acts + threshold), 0.0), atol=1e-5)
    assert [f.rule for f in transcript.flags] == ["secret"]
    fired = [d for d in transcript.detections if d.score >= 0.5]
    assert fired and all(d.category == "deception" and d.evidence[0].label == "secrecy" for d in fired)


async def test_a_flag_is_explained_by_the_spans_top_sae_features(engine: HFEngine, tmp_path: Path, make_probe: Any) -> None:
    folder = write_saelens(tmp_path / "j", "jumprelu")
    probe = DetectorSpec("linear_probe", "p", {"artifact": str(make_probe())})
    explainer = DetectorSpec("sae_features", "sae", {"sae": str(folder), "explain": 3})
    rule = {"name": "six", "category": "deception", "severity": "critical", "actions": ["alert"]}
    rule["when"] = {"detector": "p", "stat": "count_over", "over": 0.0, "window": 6, "gte": 6}  # fires at token 5
    transcript = await _pipeline(engine, [probe, explainer], [rule], tmp_path).teacher_force(MESSAGES, TEXT).run()
    assert [(f.rule, f.index) for f in transcript.flags] == [("six", 5)]
    (flagged,) = [d for d in transcript.detections if d.detector == "p" and d.start == 5]
    evidence = [e for e in flagged.evidence if e.label.startswith("SAE feature")]
    full = encode_reference(engine, load_sae(folder))[:6]
    peak = full.max(axis=0)
    expected = [int(i) for i in np.argsort(-peak)[:3]]
    assert [int(e.label.split()[2].rstrip(":")) for e in evidence] == expected
    cot = "".join(s.text for s in transcript.steps)
    assert all(q in cot for e in evidence for q in e.quotes)
    assert all("tokens 0..5" in e.detail for e in evidence)


def test_sae_inspect_prints_the_format_and_a_sanity_encode(tmp_path: Path) -> None:
    folder = write_saelens(tmp_path / "j", "jumprelu")
    result = CliRunner().invoke(main, ["sae", "inspect", str(folder)], terminal_width=200)
    assert result.exit_code == 0, result.output
    for text in ("saelens", "jumprelu", "d_sae", "96", "blocks.2.hook_resid_post", "active per token", "all finite"):
        assert text in result.output
    bad = CliRunner().invoke(main, ["sae", "inspect", str(tmp_path)])
    assert bad.exit_code == 2 and "not a known SAE folder" in bad.output


async def test_serve_loads_sae_detectors_from_a_detectors_file(tmp_path: Path) -> None:
    write_saelens(tmp_path / "saes" / "l2", "jumprelu")
    listing = tmp_path / "detectors.yaml"
    listing.write_text(
        "detectors:\n"
        "  - kind: sae_features\n    name: sae_l2\n"
        "    args: {sae: saes/l2, explain: 4, watch: [{feature: 6, label: secrecy, category: deception, threshold: 0.5}]}\n"
    )
    settings = Settings.load({}, data_dir=tmp_path / "data", detectors=listing, model="tiny", probes="none")
    pipeline = build_pipeline(settings, bundled_policy("default"))
    assert [s.name for s in pipeline.specs] == ["sae_l2"] and pipeline.policy.rules == ()
    transcript = await pipeline.teacher_force(MESSAGES, TEXT).run()
    assert {d.detector for d in transcript.detections} == {"sae_l2"}
    assert all("sae_l2/top0" in s.readouts and "sae_l2/6" in s.readouts for s in transcript.steps)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("- kind: sae_features\n  name: s\n  args: {sae: nowhere, watch: [1], threshold: 1}\n", "nowhere: no such file"),
        ("- kind: sae_features\n  args: {}\n", r"detectors\[0\]: field 'name' must be a non-empty string"),
        ("- {kind: sae_features, name: s, args: {sae: ., watch: [1]}, colour: red}\n", "unknown field"),
        ("detectors: [\n", "not valid YAML"),
    ],
)
def test_a_bad_detectors_file_names_the_file_and_the_problem(tmp_path: Path, text: str, problem: str) -> None:
    listing = tmp_path / "detectors.yaml"
    listing.write_text(text)
    settings = Settings.load({}, data_dir=tmp_path / "data", detectors=listing, model="tiny", probes="none")
    with pytest.raises(DetectorError, match=problem) as err:
        build_pipeline(settings, bundled_policy("default"))
    assert str(listing) in str(err.value)
