"""`cotmon serve` killed with SIGKILL after a flag: after a restart the flagged session is in the store,
closed as `interrupted`, with every token the client had received."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import httpx
import yaml

from conftest import ProbeFactory, free_port, spawn_serve, wait_ready

RULE = {
    "name": "early",
    "category": "deception",
    "severity": "critical",
    "when": {"detector": "p", "stat": "count_over", "over": 0.0, "window": 5, "gte": 5},
    "actions": ["alert", "store"],
}
COUNTED = 'cotmon_flags_total{category="deception",rule="early",severity="critical"} 1.0'


def _tokens(line: str) -> int:
    """1 for an SSE chunk that carries a token's text to the client."""
    if not line.startswith("data: {"):
        return 0
    delta = json.loads(line[6:])["choices"][0]["delta"]
    return int(bool(delta.get("reasoning") or delta.get("content")))


def _serve(tmp_path: Path, port: int) -> subprocess.Popen[bytes]:
    args = ["--model", "tiny", "--probes", str(tmp_path / "probes"), "--policy", str(tmp_path / "policy.yaml")]
    return spawn_serve(port, *args, env={"COTMON_DATA_DIR": str(tmp_path / "data")})


def test_a_flagged_session_survives_sigkill_right_after_its_flag(tmp_path: Path, make_probe: ProbeFactory) -> None:
    make_probe("p")
    (tmp_path / "policy.yaml").write_text(yaml.safe_dump({"name": "early", "rules": [RULE]}))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = _serve(tmp_path, port)
    try:
        wait_ready(base, proc)
        payload = {
            "model": "tiny",
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 4000,
            "stream": True,
            "ignore_eos": True,
        }
        with httpx.stream("POST", base + "/v1/chat/completions", json=payload, timeout=60) as reply:
            session_id = reply.headers["x-cotmon-session"]
            lines = reply.iter_lines()
            deadline = time.monotonic() + 30
            received = 0
            while COUNTED not in httpx.get(base + "/metrics").text:  # the alert's counter: the session is committed by now
                received += _tokens(next(lines))
                assert time.monotonic() < deadline, "the flag was never counted"
            at_flag = received
            while received < at_flag + 20:  # tokens streamed after the flag are kept too
                received += _tokens(next(lines))
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
        assert proc.returncode == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    restarted = _serve(tmp_path, port)
    try:
        wait_ready(base, restarted)
        listed = httpx.get(base + "/v1/sessions", params={"flagged": "true"}).json()["data"]
        assert [s["session_id"] for s in listed] == [session_id]
        stored = httpx.get(f"{base}/v1/sessions/{session_id}").json()
        assert stored["outcome"] == "interrupted" and [f["rule"] for f in stored["flags"]] == ["early"]
        assert stored["flags"][0]["index"] == 4 and len(stored["steps"]) >= received >= 20
    finally:
        restarted.send_signal(signal.SIGTERM)
        restarted.wait(timeout=30)
