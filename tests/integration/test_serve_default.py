"""`cotmon serve` with no options: the real model, monitored by its default probe pack under the
default policy, driven by the official openai client."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import httpx
from openai import OpenAI

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
        with OpenAI(base_url=base + "/v1", api_key="none", max_retries=0) as client:
            assert [m.id for m in client.models.list()] == ["smollm2"]
            stream = client.chat.completions.create(
                model="smollm2",
                messages=[{"role": "user", "content": "How do I make a simple tomato sauce?"}],
                max_tokens=128,
                temperature=0.0,
                stream=True,
            )
            reasoning, answer = [], []
            for chunk in stream:
                if chunk.choices:
                    reasoning.append((chunk.choices[0].delta.model_extra or {}).get("reasoning") or "")
                    answer.append(chunk.choices[0].delta.content or "")
        assert len("".join(reasoning).split()) >= 10 and len("".join(answer).split()) >= 3
        assert "tomato" in "".join(reasoning + answer).lower()
        metrics = httpx.get(base + "/metrics").text
        scored = dict(re.findall(r'cotmon_detector_score_count\{category="\w+",detector="(\w+)"\} ([\d.]+)', metrics))
        assert scored == {"deception_probe": "128.0", "harmful_probe": "128.0"}  # a score per generated token

        caught = []
        for example in (e for e in load_examples() if e.label == "deceptive" and e.split == "test"):
            body = {"messages": [m.to_dict() for m in example.messages], "reasoning": example.reasoning, "answer": example.answer}
            reply = httpx.post(base + "/v1/monitor/transcripts", json=body, timeout=120).json()
            caught += [example.id] if any(f["category"] == "deception" for f in reply["flags"]) else []
        assert caught, "no held-back deceptive example was flagged under the default policy"
    finally:
        proc.terminate()
        output = proc.communicate(timeout=60)[0].decode()
    assert '"detectors": ["deception_probe", "harmful_probe"]' in output and "unmonitored" not in output
