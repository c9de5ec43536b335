"""`cotmon serve` as a real process: it starts, answers, and on SIGTERM drains in-flight streams."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import httpx

from conftest import free_port, spawn_serve, wait_ready


def test_sigterm_lets_an_in_flight_stream_finish_then_exits_cleanly(tmp_path: Path) -> None:
    port = free_port()
    env = {"COTMON_DATA_DIR": str(tmp_path), "COTMON_DRAIN_SECONDS": "20"}
    proc = spawn_serve(port, "--model", "tiny", "--no-probes", env=env, output=subprocess.PIPE)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_ready(base, proc)
        payload = {
            "model": "tiny",
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 400,
            "stream": True,
            "ignore_eos": True,
        }
        with httpx.stream("POST", base + "/v1/chat/completions", json=payload, timeout=60) as reply:
            lines = reply.iter_lines()
            next(lines)
            proc.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]" and '"finish_reason": "length"' in rest[-2]
        # uvicorn re-raises the signal once it has shut down, so the status says "ended by SIGTERM".
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM)
        output = proc.stdout.read().decode() if proc.stdout else ""
        assert '"outcome": "completed"' in output and "Traceback" not in output
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
