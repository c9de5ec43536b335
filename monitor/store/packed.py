"""The store's blobs: per-token data as numpy arrays behind a small JSON header, so thousands of
stored sessions decode in a blink (`cotmon replay --all` reads only the detections)."""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Mapping, Sequence
from typing import Any, cast

import numpy as np
import numpy.typing as npt

from monitor.store.codec import TranscriptFormatError
from monitor.store.columns import DetectionColumns, detection_columns
from monitor.types import CHANNELS, Detection, TraceStep

MAGIC = b"CTM1"


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
