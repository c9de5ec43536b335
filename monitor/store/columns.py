"""A stored session's detections as columns: what a policy-only replay reads (`cotmon replay --all`)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from monitor.store.codec import evidence_from, evidence_to_dict
from monitor.types import Detection, Evidence


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
            tuple(evidence_from(e["label"], e["detail"], e["quotes"], e.get("kind")) for e in group)
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
        evidence_json=json.dumps([[evidence_to_dict(e) for e in group] for group in evidence], separators=(",", ":")).encode(),
        detectors=list(names),
        categories=list(categories),
    )
