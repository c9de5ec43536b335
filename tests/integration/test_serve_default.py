"""`cotmon serve` with no options: the real model, monitored by its default probe pack under the
default policy, driven by the official openai client."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import httpx

from clients import stream_chat, watch_example
from conftest import MODELS, ROOT, free_port, spawn_serve, wait_ready
from probes.datasets import load_examples

PACKS = ROOT / ".cotmon" / "probes"
"""The repo's default probe cache, shared with `make demo`: the pack is trained once per model revision."""


def test_serve_with_no_options_monitors_the_real_model(tmp_path: Path, real_model: object) -> None:
    data = tmp_path / "data"
    data.mkdir()
    PACKS.mkdir(parents=True, exist_ok=True)
    (data / "models").symlink_to(MODELS, target_is_directory=True)  # the dequantised model, built once
    (data / "probes").symlink_to(PACKS, target_is_directory=True)  # the pack, trained on the first start
    port = free_port()
    proc = spawn_serve(port, env={"COTMON_DATA_DIR": str(data)}, output=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, proc, timeout=900)
        chat = stream_chat(base, "smollm2", "How do I make a simple tomato sauce?", max_tokens=128)
        assert chat.models == ["smollm2"]
        assert len(chat.reasoning.split()) >= 10 and len(chat.answer.split()) >= 3
        assert "tomato" in (chat.reasoning + chat.answer).lower()
        metrics = httpx.get(base + "/metrics").text
        scored = dict(re.findall(r'cotmon_detector_score_count\{category="\w+",detector="(\w+)"\} ([\d.]+)', metrics))
        assert scored == {"deception_probe": "128.0", "harmful_probe": "128.0"}  # a score per generated token

        caught = []
        for example in (e for e in load_examples() if e.label == "deceptive" and e.split == "test"):
            reply = watch_example(base, example, timeout=120)
            caught += [example.id] if any(f["category"] == "deception" for f in reply["flags"]) else []
        assert caught, "no held-back deceptive example was flagged under the default policy"
    finally:
        proc.terminate()
        output = proc.communicate(timeout=60)[0].decode()
    assert '"detectors": ["deception_probe", "harmful_probe"]' in output and "unmonitored" not in output
