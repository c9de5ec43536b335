"""Calibration on the real model: thresholds set on smollm2's own benign sessions flag about the
target share of benign sessions they never saw (a threshold that never fires fails here), and
the bundled benign text is the model's own."""

from __future__ import annotations

import pytest
import torch
from rich.console import Console

from conftest import ROOT
from monitor.engine.hf import HFEngine
from probes.calibrate import calibrate_on_policy
from probes.datasets import data_path
from probes.linear import load_probe
from probes.onpolicy import benign_set, read_jsonl, revision_of
from probes.pack import default_pack
from probes.train import TrainedProbe

PACKS = ROOT / ".cotmon" / "probes"
"""The repo's default probe cache, shared with `make demo` and tests/integration/test_serve_default.py."""
TARGET = 0.05
"""Per session; with ~190 held-apart sessions 1% would be two sessions, too few to tell a band."""


@pytest.fixture(scope="module")
def calibrated(real_model: HFEngine, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, float]]:
    """The default pack's harmful probe (trained once, shared with `make demo` and the serve test),
    its thresholds set again at TARGET on the model's own benign sessions."""
    pack = default_pack(real_model, PACKS, console=Console(quiet=True))
    probe = load_probe(pack / "harmful_probe")
    assert probe.meta.calibration["texts"] == "probes/data/benign_smollm2.jsonl"
    benign = benign_set(real_model, tmp_path_factory.mktemp("benign"))
    (again,) = calibrate_on_policy(real_model, [TrainedProbe(probe, [], [])], benign, target_fpr=TARGET)
    stats = dict(again.meta.calibration["statistics"])
    assert {(s["calibration_n"], s["heldapart_n"]) for s in stats.values()} == {(len(benign.calibration), len(benign.heldapart))}
    assert len(benign.heldapart) >= 180 and not set(map(str, benign.calibration)) & set(map(str, benign.heldapart))
    return stats


# The statistics the bundled policies use. (`last`, a single token, held apart 2.1% at this 5% target when
# this was written: per-token peaks are heavy-tailed; it is reported in the pack's table, not asserted.)
@pytest.mark.parametrize("statistic", ["mean@8", "mean@16", "mean@32"])
def test_held_apart_benign_sessions_are_flagged_near_the_target(calibrated: dict[str, dict[str, float]], statistic: str) -> None:
    s = calibrated[statistic]
    assert 0.5 * TARGET <= s["heldapart_fpr"] <= 2 * TARGET, s  # both sides: a threshold that never fires fails
    assert 0.0 < s["threshold"] < 1.0


def test_the_bundled_benign_text_is_the_real_models_own_generation(real_engine: HFEngine) -> None:
    path = data_path("benign_smollm2.jsonl")
    assert revision_of(path) == real_engine.info.revision
    texts = read_jsonl(path)
    assert len(texts) == 586 and sum(len(t.reasoning.split()) >= 5 for t in texts) >= 500
    # the model's own continuation of a bundled reasoning prefix agrees with its text more often than chance:
    # its greedy next token is, for most positions, among the tokens it actually wrote next (on-policy text)
    agree = total = 0
    for text in texts[::60]:
        prompt = real_engine.encode(real_engine.render_prompt(text.messages))
        ids = real_engine.encode(text.reasoning)[:24]
        with torch.inference_mode():  # one forward: the logits at every position predict the next token
            logits = real_engine.model(input_ids=torch.tensor([prompt + ids])).logits[0]
        for cut in range(4, len(ids)):
            agree += ids[cut] in logits[len(prompt) + cut - 1].topk(20).indices.tolist()
            total += 1
    assert agree / total >= 0.8, (agree, total)
