"""`cotmon demo` end to end on the tiny model (the README's main job)."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from monitor.cli import main


def test_demo_runs_the_whole_loop_and_prints_the_tables(tmp_path: Path) -> None:
    args = ["demo", "--model", "tiny", "--exit", "--contrast-limit", "60", "--calibration-limit", "60"]
    result = CliRunner().invoke(main, [*args, "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "per-layer AUROC" in out and "Example transcripts" in out and "AUROC on the held-back test split" in out
    assert "Live generation" in out and "cotmon_tokens_total" in out and "/v1 (OpenAI-compatible)" in out
    assert "finish_reason length" in out and "random weights" in out and "What the policy flagged" in out
    assert "Next:" not in out  # --exit skips the what-to-try-next notes
    (pack,) = (tmp_path / "probes").glob("tiny@*-limit60-benign60")
    for name in ("deception_probe", "harmful_probe"):
        meta = json.loads((pack / f"{name}.json").read_text())
        assert meta["model_id"] == "tiny" and meta["target_fpr"] == 0.01 and meta["calibration"]["unit"] == "session"
    demo_dir = tmp_path / "demo"
    sessions = [json.loads(line) for line in (demo_dir / "cotmon.log").read_text().splitlines()]
    assert sum(1 for s in sessions if s.get("event") == "session") == 48 + 1
