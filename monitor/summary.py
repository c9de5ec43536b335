"""Transcript-level figures: a channel's mean score per detector, and the canonical per-session log line."""

from __future__ import annotations

from typing import Any

from monitor.types import Channel, Transcript, max_scores


def mean_scores(t: Transcript, channel: Channel = "reasoning") -> dict[str, float]:
    """Mean score per detector over the tokens of one channel (a transcript-level score)."""
    in_channel = {s.index for s in t.steps if s.channel == channel}
    sums: dict[str, list[float]] = {}
    for det in t.detections:
        if det.start in in_channel:
            sums.setdefault(det.detector, []).append(det.score)
    return {name: sum(v) / len(v) for name, v in sums.items()}


def session_summary(t: Transcript) -> dict[str, Any]:
    """The fields of the canonical per-session log line."""
    return {
        "session_id": t.session_id,
        "model": t.model.model_id,
        "outcome": t.outcome,
        "mode": t.mode,
        "tokens": len(t.steps),
        "reasoning_tokens": sum(1 for s in t.steps if s.channel == "reasoning"),
        "flags": [f.rule for f in t.flags],
        "halted_by": next((f.rule for f in t.flags if "halt" in f.actions), None),
        "max_scores": {k: round(v, 4) for k, v in max_scores(t.detections).items()},
        "duration_s": round(t.ended_at - t.started_at, 4),
        "error": t.error,
    }
