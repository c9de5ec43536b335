"""Transcripts as plain data (JSON export, the HTTP API) and as packed columns (the store's blobs).

The JSON form is what `cotmon transcripts export` writes and `cotmon replay FILE` reads back;
`transcript_from_dict` names the field that is wrong. The packed form keeps per-token data as
numpy arrays behind a small JSON header, so thousands of stored sessions decode in a blink
(`cotmon replay --all` reads only the detections).
"""

from __future__ import annotations

import dataclasses
import json
import struct
import zlib
from collections.abc import Mapping, Sequence
from typing import Any, cast

import numpy as np
import numpy.typing as npt

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

MAGIC = b"CTM1"


class TranscriptFormatError(ValueError):
    """A transcript file or record that cannot be read; the message names the field."""


# -- plain data -----------------------------------------------------------------------------------


def detection_to_dict(d: Detection) -> dict[str, Any]:
    """Plain data for a detection; `evidence` only when it has some."""
    out: dict[str, Any] = {"detector": d.detector, "category": d.category, "score": d.score, "start": d.start, "end": d.end}
    if d.evidence:
        out["evidence"] = [_evidence_dict(e) for e in d.evidence]
    return out


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
                _evidence(
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


# -- packed columns -------------------------------------------------------------------------------


def pack(arrays: Mapping[str, npt.NDArray[Any]], meta: Mapping[str, Any] | None = None) -> bytes:
    """Arrays plus JSON metadata in one compressed blob (see `unpack`)."""
    layout, chunks, offset = [], [], 0
    for name, array in arrays.items():
        data = np.ascontiguousarray(array).reshape(np.shape(array))  # keeps 0-d arrays 0-d
        layout.append([name, data.dtype.str, list(data.shape), offset])
        chunks.append(data.tobytes())
        offset += data.nbytes
    header = json.dumps({"arrays": layout, "meta": dict(meta or {})}, separators=(",", ":")).encode()
    return zlib.compress(MAGIC + struct.pack("<I", len(header)) + header + b"".join(chunks), 1)


def unpack(blob: bytes) -> tuple[dict[str, npt.NDArray[Any]], dict[str, Any]]:
    """The arrays and metadata `pack` stored."""
    raw = zlib.decompress(blob)
    if raw[:4] != MAGIC:
        raise TranscriptFormatError("stored blob: unknown format (no CTM1 header)")
    (size,) = struct.unpack_from("<I", raw, 4)
    header = json.loads(raw[8 : 8 + size])
    body = memoryview(raw)[8 + size :]
    arrays = {}
    for name, dtype, shape, offset in header["arrays"]:
        dt = np.dtype(dtype)
        count = int(np.prod(shape)) if shape else 1
        arrays[name] = np.frombuffer(body, dtype=dt, count=count, offset=offset).reshape(shape)
    return arrays, header["meta"]


def _exact_floats(values: npt.NDArray[np.float64]) -> npt.NDArray[Any]:
    """float32 when that loses nothing (readouts come off the device as float32), else float64."""
    with np.errstate(over="ignore"):  # values beyond float32's range simply stay float64
        narrow = values.astype(np.float32)
    return narrow if np.array_equal(narrow.astype(np.float64), values, equal_nan=True) else values


def pack_steps(steps: Sequence[TraceStep]) -> bytes:
    """Token ids, channels and texts."""
    return pack(
        {
            "token_id": np.fromiter((s.token_id for s in steps), np.int64, len(steps)),
            "channel": np.fromiter((CHANNELS.index(s.channel) for s in steps), np.uint8, len(steps)),
            "index": np.fromiter((s.index for s in steps), np.int64, len(steps)),
            "final": np.fromiter((s.final for s in steps), np.bool_, len(steps)),
        },
        {"text": [s.text for s in steps]},
    )


def pack_readouts(steps: Sequence[TraceStep]) -> bytes:
    """Per-token readouts as one [tokens, names] matrix (per-token maps when the names vary)."""
    names = list(steps[0].readouts) if steps else []
    if all(list(s.readouts) == names for s in steps):
        matrix = np.array([list(s.readouts.values()) for s in steps], dtype=np.float64).reshape(len(steps), len(names))
        return pack({"values": _exact_floats(matrix)}, {"names": names})
    return pack({}, {"per_step": [dict(s.readouts) for s in steps]})


def unpack_steps(session_id: str, steps_blob: bytes, readouts_blob: bytes) -> tuple[TraceStep, ...]:
    arrays, meta = unpack(steps_blob)
    values, rmeta = unpack(readouts_blob)
    n = len(meta["text"])
    if "per_step" in rmeta:
        readouts: list[dict[str, float]] = rmeta["per_step"]
    else:
        names, matrix = rmeta["names"], values["values"].astype(np.float64).tolist()
        readouts = [dict(zip(names, row, strict=True)) for row in matrix]
    ids, channels, index = arrays["token_id"].tolist(), arrays["channel"].tolist(), arrays["index"].tolist()
    final = arrays["final"].tolist()
    return tuple(
        TraceStep(session_id, index[i], ids[i], meta["text"][i], cast(Any, CHANNELS[channels[i]]), readouts[i], final[i])
        for i in range(n)
    )


def _evidence_dict(e: Evidence) -> dict[str, Any]:
    return {"label": e.label, "detail": e.detail, "quotes": list(e.quotes), "kind": e.kind}


def _evidence(label: str, detail: str, quotes: Sequence[str], kind: Any) -> Evidence:
    """Evidence as stored; stored before evidence had a kind, its kind is read from its label."""
    return Evidence(label, detail, tuple(quotes), kind or legacy_evidence_kind(label, detail))


@dataclasses.dataclass(frozen=True)
class DetectionColumns:
    """A stored session's detections as arrays: what a policy-only replay reads."""

    detectors: list[str]
    categories: list[str]
    detector: npt.NDArray[np.int32]
    category: npt.NDArray[np.int32]
    score: npt.NDArray[np.float64]
    start: npt.NDArray[np.int64]
    end: npt.NDArray[np.int64]
    evaluations: npt.NDArray[np.int64]
    """[calls, 2]: token index, detections seen after the call."""
    evidence: npt.NDArray[np.int32]
    """Per detection: index into the distinct evidence tuples, -1 for none."""
    evidence_json: bytes
    """The distinct evidence tuples, as JSON (parsed only by `detections()`)."""

    def detections(self) -> tuple[Detection, ...]:
        groups = [
            tuple(_evidence(e["label"], e["detail"], e["quotes"], e.get("kind")) for e in group)
            for group in json.loads(self.evidence_json)
        ]
        det, cat, ev = self.detector.tolist(), self.category.tolist(), self.evidence.tolist()
        score, start, end = self.score.tolist(), self.start.tolist(), self.end.tolist()
        return tuple(
            Detection(
                self.detectors[det[i]], self.categories[cat[i]], score[i], start[i], end[i], groups[ev[i]] if ev[i] >= 0 else ()
            )
            for i in range(len(det))
        )


def detection_columns(detections: Sequence[Detection], evaluations: Sequence[tuple[int, int]]) -> DetectionColumns:
    """Detections as columns (names, categories and evidence as small integer codes) plus the
    evaluation steps. Each distinct evidence tuple is kept once (a probe attaches the same one to
    every token), as JSON bytes that only `DetectionColumns.detections()` parses."""
    names: dict[str, int] = {}
    categories: dict[str, int] = {}
    evidence: dict[tuple[Evidence, ...], int] = {}
    n = len(detections)
    return DetectionColumns(
        detector=np.fromiter((names.setdefault(d.detector, len(names)) for d in detections), np.int32, n),
        category=np.fromiter((categories.setdefault(d.category, len(categories)) for d in detections), np.int32, n),
        score=np.fromiter((d.score for d in detections), np.float64, n),
        start=np.fromiter((d.start for d in detections), np.int64, n),
        end=np.fromiter((d.end for d in detections), np.int64, n),
        evaluations=np.array(list(evaluations), dtype=np.int64).reshape(len(evaluations), 2),
        evidence=np.fromiter(
            (evidence.setdefault(d.evidence, len(evidence)) if d.evidence else -1 for d in detections), np.int32, n
        ),
        evidence_json=json.dumps([[_evidence_dict(e) for e in group] for group in evidence], separators=(",", ":")).encode(),
        detectors=list(names),
        categories=list(categories),
    )


def pack_detections(detections: Sequence[Detection], evaluations: Sequence[tuple[int, int]]) -> bytes:
    """`detection_columns` as a blob (see `unpack_detections`)."""
    c = detection_columns(detections, evaluations)
    arrays: dict[str, npt.NDArray[Any]] = {
        "detector": c.detector,
        "category": c.category,
        "score": c.score,
        "start": c.start,
        "end": c.end,
        "evidence": c.evidence,
        "evidence_json": np.frombuffer(c.evidence_json, dtype=np.uint8),
        "evaluations": c.evaluations,
    }
    return pack(arrays, {"detectors": c.detectors, "categories": c.categories})


def unpack_detections(blob: bytes) -> DetectionColumns:
    arrays, meta = unpack(blob)
    return DetectionColumns(
        meta["detectors"],
        meta["categories"],
        arrays["detector"],
        arrays["category"],
        arrays["score"],
        arrays["start"],
        arrays["end"],
        arrays["evaluations"],
        arrays["evidence"],
        arrays["evidence_json"].tobytes(),
    )
