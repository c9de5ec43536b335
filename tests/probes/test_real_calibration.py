"""Calibration on the real model: thresholds set on smollm2's own benign sessions flag about the
target share of benign sessions they never saw (a threshold that never fires fails here), and
the bundled benign text is the model's own."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from rich.console import Console

from conftest import ROOT
from monitor.engine.hf import HFEngine
from probes.calibrate import CHECK_FPR, rate_interval
from probes.datasets import data_path
from probes.linear import LinearProbe, load_probe
from probes.onpolicy import benign_set, read_jsonl, revision_of
from probes.pack import default_pack

PACKS = ROOT / ".cotmon" / "probes"
"""The repo's default probe cache, shared with `make demo` and tests/integration/test_serve_default.py."""


@pytest.fixture(scope="module")
def pack(real_model: HFEngine) -> dict[str, LinearProbe]:
    """The default pack (trained and calibrated on the first run, shared with `make demo` and the serve test)."""
    directory = default_pack(real_model, PACKS, console=Console(quiet=True))
    return {name: load_probe(directory / name) for name in ("deception_probe", "harmful_probe")}


# The statistics the bundled policies use. (`last`, a single token, is heavy-tailed; it is reported in
# the pack's table, not asserted.)
@pytest.mark.parametrize("probe", ["deception_probe", "harmful_probe"])
@pytest.mark.parametrize("statistic", ["mean@8", "mean@16", "mean@32"])
def test_held_apart_benign_sessions_are_flagged_near_the_target(pack: dict[str, LinearProbe], probe: str, statistic: str) -> None:
    record = pack[probe].meta.calibration
    assert record["texts"] == "probes/data/benign_smollm2.jsonl" and record["unit"] == "session"
    s = record["statistics"][statistic]
    assert s["calibration_n"] >= 180 and s["heldapart_n"] >= 180
    # At the policy's 1% target ~190 sessions hold ~2 false positives: the measured rate must be one
    # that 1% explains (inside its 95% interval), not a band n cannot resolve ...
    low, high = rate_interval(s["heldapart_fpr"], int(s["heldapart_n"]))
    assert low <= record["target_fpr"] <= high, s
    # ... and at the recorded 5% check, which it can: within [0.5x, 2x] on both sides, so a threshold
    # that never fires (or fires on everything) fails.
    check = record["check"]
    assert check["target_fpr"] == CHECK_FPR
    fpr = check["statistics"][statistic]["heldapart_fpr"]
    assert 0.5 * CHECK_FPR <= fpr <= 2 * CHECK_FPR, (statistic, fpr)
    assert 0.0 < check["statistics"][statistic]["threshold"] <= s["threshold"] < 1.0


def test_thresholds_were_set_and_measured_on_separate_benign_sessions(
    real_model: HFEngine, pack: dict[str, LinearProbe], tmp_path: Path
) -> None:
    benign = benign_set(real_model, tmp_path)  # the bundled text: nothing is generated
    calibration, heldapart, train = ({str(x) for x in part} for part in (benign.calibration, benign.heldapart, benign.train))
    assert min(len(calibration), len(heldapart), len(train)) >= 180
    assert not calibration & heldapart and not train & (calibration | heldapart)
    for probe in pack.values():
        for s in probe.meta.calibration["statistics"].values():
            assert (s["calibration_n"], s["heldapart_n"]) == (len(benign.calibration), len(benign.heldapart))


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
