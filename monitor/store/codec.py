"""Transcripts as plain data: the JSON export, the HTTP API and the spool's journals.

The JSON form is what `cotmon transcripts export` writes and `cotmon replay FILE` reads back;
`transcript_from_dict` names the field that is wrong. The store keeps per-token data packed
instead (`monitor.store.packed`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from monitor.types import (
    ACTIONS,
    CHANNELS,
    EVIDENCE_KINDS,
    MODES,
    OUTCOMES,
    SEVERITIES,
    ChatMessage,
    Detection,
    DetectorSpec,
    Evidence,
    Flag,
    ModelInfo,
    TraceStep,
    Transcript,
    legacy_evidence_kind,
)


class TranscriptFormatError(ValueError):
    """A transcript file or record that cannot be read; the message names the field."""


def detection_to_dict(d: Detection) -> dict[str, Any]:
    """Plain data for a detection; `evidence` only when it has some."""
    out: dict[str, Any] = {"detector": d.detector, "category": d.category, "score": d.score, "start": d.start, "end": d.end}
    if d.evidence:
        out["evidence"] = [evidence_to_dict(e) for e in d.evidence]
    return out


def evidence_to_dict(e: Evidence) -> dict[str, Any]:
    """Plain data for one piece of evidence."""
    return {"label": e.label, "detail": e.detail, "quotes": list(e.quotes), "kind": e.kind}


def evidence_from(label: str, detail: str, quotes: Sequence[str], kind: Any) -> Evidence:
    """Evidence as stored; stored before evidence had a kind, its kind is read from its label."""
    return Evidence(label, detail, tuple(quotes), kind or legacy_evidence_kind(label, detail))


def step_to_dict(s: TraceStep) -> dict[str, Any]:
    """Plain data for one step, as it appears in `transcript_to_dict`'s `steps`."""
    return {"index": s.index, "token_id": s.token_id, "text": s.text, "channel": s.channel, "readouts": dict(s.readouts)} | (
        {"final": True} if s.final else {}
    )


def transcript_to_dict(t: Transcript) -> dict[str, Any]:
    """Plain data for a transcript (JSON-serialisable); `transcript_from_dict` reverses it exactly."""
    return {
        "session_id": t.session_id,
        "model": dataclasses.asdict(t.model),
        "messages": [m.to_dict() for m in t.messages],
        "steps": [step_to_dict(s) for s in t.steps],
        "detections": [detection_to_dict(d) for d in t.detections],
        "flags": [f.to_dict() for f in t.flags],
        "outcome": t.outcome,
        "mode": t.mode,
        "request": dict(t.request),
        "thresholds": dict(t.thresholds),
        "evaluations": [list(e) for e in t.evaluations],
        "detector_specs": [s.to_dict() for s in t.detector_specs],
        "policy": dict(t.policy),
        "started_at": t.started_at,
        "ended_at": t.ended_at,
        "error": t.error,
    }


class _Reader:
    """Typed access to a JSON object that names the path of whatever is missing or wrong."""

    def __init__(self, data: Any, where: str):
        if not isinstance(data, Mapping):
            raise TranscriptFormatError(f"{where}: expected an object")
        self.data, self.where = data, where

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
        if key not in self.data:
            if default is ...:
                raise TranscriptFormatError(f"{self.where}.{key}: missing")
            return default
        value = self.data[key]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if not isinstance(value, kind) or (isinstance(value, bool) and kind in (int, float)):
            names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            raise TranscriptFormatError(f"{self.where}.{key}: expected {names}, got {type(value).__name__}")
        return value

    def choice(self, key: str, options: Sequence[str], default: Any = ...) -> Any:
        value = self.get(key, str, default)
        if value not in options and value is not default:
            raise TranscriptFormatError(f"{self.where}.{key}: {value!r} is not one of {', '.join(options)}")
        return value

    def items(self, key: str, default: Any = ...) -> list[_Reader]:
        values = self.get(key, list, default)
        return [_Reader(v, f"{self.where}.{key}[{i}]") for i, v in enumerate(values)]


def transcript_from_dict(data: Any, where: str = "transcript") -> Transcript:
    """The transcript `transcript_to_dict` made; TranscriptFormatError names the bad field."""
    r = _Reader(data, where)
    m = _Reader(r.get("model", dict), f"{where}.model")
    model = ModelInfo(m.get("model_id", str), m.get("revision", str), m.get("d_model", int), m.get("n_layers", int))
    steps = []
    for s in r.items("steps"):
        readouts = s.get("readouts", dict, {})
        bad = [k for k, v in readouts.items() if isinstance(v, bool) or not isinstance(v, int | float)]
        if bad:
            raise TranscriptFormatError(f"{s.where}.readouts.{bad[0]}: expected a number")
        channel = s.choice("channel", CHANNELS)
        index = s.get("index", int)
        steps.append(
            TraceStep(
                r.get("session_id", str),
                index,
                s.get("token_id", int),
                s.get("text", str),
                channel,
                {k: float(v) for k, v in readouts.items()},
                s.get("final", bool, False),
            )
        )
    detections = [
        Detection(
            d.get("detector", str),
            d.get("category", str),
            d.get("score", float),
            d.get("start", int),
            d.get("end", int),
            tuple(
                evidence_from(
                    e.get("label", str),
                    e.get("detail", str, ""),
                    e.get("quotes", list, []),
                    e.choice("kind", EVIDENCE_KINDS, None),
                )
                for e in d.items("evidence", [])
            ),
        )
        for d in r.items("detections", [])
    ]
    flags = []
    for f in r.items("flags", []):
        actions = f.get("actions", list)
        if any(a not in ACTIONS for a in actions):
            raise TranscriptFormatError(f"{f.where}.actions: each must be one of {', '.join(ACTIONS)}")
        flags.append(
            Flag(
                f.get("rule", str),
                f.get("category", str),
                f.choice("severity", SEVERITIES),
                tuple(actions),
                f.get("index", int),
                f.get("reason", str, ""),
            )
        )
    evaluations = []
    for i, e in enumerate(r.get("evaluations", list, [])):
        if not (isinstance(e, list) and len(e) == 2 and all(isinstance(x, int) for x in e)):
            raise TranscriptFormatError(f"{where}.evaluations[{i}]: expected [token index, detections seen]")
        evaluations.append((e[0], e[1]))
    specs = []
    for s in r.items("detector_specs", []):
        s.get("kind", str)
        s.get("name", str)
        s.get("args", dict, {})
        specs.append(DetectorSpec.from_dict(s.data))
    return Transcript(
        session_id=r.get("session_id", str),
        model=model,
        messages=tuple(ChatMessage(x.get("role", str), x.get("content", str)) for x in r.items("messages")),
        steps=tuple(steps),
        detections=tuple(detections),
        flags=tuple(flags),
        outcome=r.choice("outcome", OUTCOMES, "completed"),
        detector_specs=tuple(specs),
        policy=r.get("policy", dict, {}),
        started_at=r.get("started_at", float, 0.0),
        ended_at=r.get("ended_at", float, 0.0),
        error=r.get("error", (str, type(None)), None),
        mode=r.choice("mode", MODES, "generate"),
        request=r.get("request", dict, {}),
        thresholds=_thresholds(r.get("thresholds", dict, {}), f"{where}.thresholds"),
        evaluations=tuple(evaluations),
    )


def _thresholds(data: Mapping[str, Any], where: str) -> dict[str, float | None]:
    for name, value in data.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise TranscriptFormatError(f"{where}.{name}: expected a number or null")
    return {name: None if value is None else float(value) for name, value in data.items()}
