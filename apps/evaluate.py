"""Evaluating detectors on a labelled dataset, through the same pipeline as live monitoring.

Each item's text is teacher-forced as the model's chain of thought (after its messages) through
a `Pipeline` with no policy rules, so the scores are exactly those a live stream would get.
A detector's per-token scores over the reasoning tokens become one item score: their mean (as in
probe training), their max, or the peak of a policy statistic such as `mean@16` (the highest mean
over 16 consecutive tokens: what a rule `{stat: mean, window: 16, min_scores: 16}` compares).
AUROC, recall at a fixed false-positive rate and the confusion matrix at the detector's threshold
calibrated for that same statistic follow from those item scores.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from prometheus_client import CollectorRegistry
from sklearn.metrics import roc_auc_score, roc_curve

from monitor.build import NO_RULES
from monitor.detector import DetectorError, DetectorRegistry
from monitor.engine.base import Engine
from monitor.engine.text import THINK_OPEN
from monitor.observability import Metrics
from monitor.pipeline import Pipeline
from monitor.policy import Condition, calibrated_bound, statistic_thresholds
from monitor.types import DetectorSpec, Transcript
from probes.calibrate import parse_statistic, peaks
from probes.datasets import NO_PROMPT, LabelledText

Aggregate = str
"""`mean` or `max` over an item's reasoning tokens, or a statistic's peak: `last`, `mean@N`, `ema@N`, `max@N`."""
TARGET_FPRS = (0.01, 0.05)
CONCURRENCY = 16
"""Items teacher-forced at a time: the engine reads texts that wait together in shared forwards."""


class EvaluationError(ValueError):
    """A detector spec that cannot be parsed; the message quotes it."""


@dataclass(frozen=True)
class DatasetRef:
    """Where the items came from and how they were read (the file itself is read in place)."""

    path: str
    text_field: str = "text"
    label_field: str = "label"
    positive: str | None = None
    """Label value counted as positive; None: labels are 1/true and 0/false."""
    messages_field: str | None = "messages"
    limit: int | None = None


@dataclass(frozen=True)
class ItemScore:
    """One item's score per detector; a detector that scored no reasoning token is absent."""

    id: str
    label: int
    scores: Mapping[str, float]


@dataclass(frozen=True)
class Confusion:
    """Counts at a threshold: an item is flagged when its score is >= the threshold."""

    threshold: float
    tp: int
    fp: int
    tn: int
    fn: int


@dataclass(frozen=True)
class DetectorResult:
    """One detector's metrics over the items it scored. Undefined metrics (one class only) are None."""

    spec: DetectorSpec
    n_positive: int
    n_negative: int
    n_unscored: int
    """Items without any scored reasoning token, or too short for the statistic's window (left out of every metric)."""
    auroc: float | None
    recall_at_fpr: Mapping[float, float | None]
    """Best true-positive rate with a false-positive rate <= each target (0.01, 0.05)."""
    confusion: Confusion | None
    """At the detector's calibrated threshold; None when it has none."""
    fpr: tuple[float, ...] = ()
    tpr: tuple[float, ...] = ()

    @property
    def name(self) -> str:
        return self.spec.name

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "spec": self.spec.to_dict(),
            "n_positive": self.n_positive,
            "n_negative": self.n_negative,
            "n_unscored": self.n_unscored,
            "auroc": self.auroc,
            "recall_at_1pct_fpr": self.recall_at_fpr.get(0.01),
            "recall_at_5pct_fpr": self.recall_at_fpr.get(0.05),
            "confusion": asdict(self.confusion) if self.confusion else None,
            "roc": {"fpr": list(self.fpr), "tpr": list(self.tpr)},
        }


@dataclass(frozen=True)
class Report:
    """The evaluation of some detectors on one dataset with one model."""

    dataset: DatasetRef
    model_id: str
    model_revision: str
    aggregate: Aggregate
    n_items: int
    detectors: tuple[DetectorResult, ...]
    items: tuple[ItemScore, ...] = field(default=(), repr=False)
    """Per-item scores, for callers; left out of `to_dict` (they mirror the dataset's labels)."""

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable data: the metrics and ROC curves, no per-item data."""
        return {
            "dataset": asdict(self.dataset),
            "model": {"id": self.model_id, "revision": self.model_revision},
            "aggregate": self.aggregate,
            "n_items": self.n_items,
            "detectors": [d.to_dict() for d in self.detectors],
        }


def parse_detector_spec(value: str, kinds: Collection[str]) -> DetectorSpec:
    """A spec from the command line: a probe artifact path, an inline JSON object, or a kind name."""
    text = value.strip()
    if text.startswith("{"):
        try:
            raw = json.loads(text)
            if not isinstance(raw, dict) or not isinstance(raw.get("args", {}), dict):
                raise TypeError("expected an object whose 'args' is an object")
            return DetectorSpec.from_dict({"name": raw["kind"], **raw})
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise EvaluationError(f"detector spec {value!r}: not a valid {{kind, name, args}} JSON object ({exc})") from None
    path = Path(text)
    stem = path.with_suffix("") if path.suffix in (".json", ".safetensors") else path
    if stem.with_suffix(".json").is_file():
        return DetectorSpec("linear_probe", stem.name, {"artifact": str(stem)})
    if text in kinds:
        return DetectorSpec(text, text)
    raise EvaluationError(
        f"detector spec {value!r}: no probe artifact {stem.with_suffix('.json')}, not a JSON object, "
        f"and not a registered detector kind ({', '.join(sorted(kinds)) or 'none registered'})"
    )


UNAVAILABLE = "judge_unavailable"  # a failure marker, never a score of the text


def check_aggregate(aggregate: str) -> Aggregate:
    """`aggregate` if it names a way to score an item, else a ValueError saying what does."""
    if aggregate not in ("mean", "max"):
        try:
            parse_statistic(aggregate)
        except ValueError as exc:
            raise ValueError(f"{exc} (or mean / max over all reasoning tokens)") from None
    return aggregate


def reduce_scores(scores: Sequence[float], aggregate: Aggregate) -> float | None:
    """One item score from its per-token scores, in token order; None when a statistic's window
    never fills (an item shorter than the window, which a full-window rule never flags)."""
    if aggregate == "mean":
        return float(sum(scores) / len(scores))
    if aggregate == "max":
        return float(max(scores))
    (peak,) = peaks([np.asarray(scores, dtype=np.float64)], aggregate)
    return float(peak) if math.isfinite(peak) else None


def item_score(transcript: Transcript, aggregate: Aggregate, category: str | None = None) -> dict[str, float]:
    """Each detector's scores over the transcript's reasoning tokens (of one category, when given), as one number."""
    reasoning = {s.index for s in transcript.steps if s.channel == "reasoning"}
    scores: dict[str, list[float]] = {}
    for det in sorted(transcript.detections, key=lambda d: d.start):
        if det.start in reasoning and det.category != UNAVAILABLE and category in (None, det.category):
            scores.setdefault(det.detector, []).append(det.score)
    reduced = {name: reduce_scores(v, aggregate) for name, v in scores.items()}
    return {name: value for name, value in reduced.items() if value is not None}


def threshold_for(thresholds: Mapping[str, float | None], name: str, aggregate: Aggregate) -> float | None:
    """The detector's calibrated threshold that means for this item score what it means in a policy:
    the one a `calibrated` bound of the rule `{stat, window: N, min_scores: N}` takes
    (`monitor.policy.calibrated_bound`), None where it has none. A whole-item `mean` is no policy
    statistic: a detector calibrated per token only uses its one threshold, as a policy would; a
    probe calibrated per statistic has none for it (no confusion matrix)."""
    if aggregate == "mean":
        return None if statistic_thresholds(thresholds, name) else thresholds.get(name)
    stat, window = ("max", 1) if aggregate == "max" else parse_statistic(aggregate)
    rule = Condition(name, "gte", "calibrated", stat=stat, window=window, min_scores=window)  # type: ignore[arg-type]
    try:
        return calibrated_bound(rule, thresholds)
    except LookupError:
        return None


async def score_items(
    pipeline: Pipeline,
    items: Sequence[LabelledText],
    aggregate: Aggregate = "mean",
    progress: Callable[[int], None] | None = None,
    category: str | None = None,
    concurrency: int = CONCURRENCY,
) -> list[ItemScore]:
    """Teacher-force every item's text as reasoning after its messages and score it; up to
    `concurrency` items at a time (their texts share the engine's forwards), scores in item order."""
    slots = asyncio.Semaphore(concurrency)

    async def score(i: int, item: LabelledText) -> ItemScore:
        async with slots:
            messages = item.messages or NO_PROMPT
            # The text is the CoT: inside the think block, opened by the prompt or by us.
            opened = pipeline.engine.prompt_opens_reasoning(messages)
            text = item.text if opened else f"{THINK_OPEN}\n{item.text}"
            transcript = await pipeline.teacher_force(messages, text, session_id=f"eval-{i}").run()
        if progress:
            progress(1)
        return ItemScore(item.id, item.label, item_score(transcript, aggregate, category))

    return list(await asyncio.gather(*(score(i, item) for i, item in enumerate(items))))


def recall_at_fpr(fpr: Sequence[float], tpr: Sequence[float], target: float) -> float:
    """Best true-positive rate among ROC points whose false-positive rate is <= `target`."""
    return max(t for f, t in zip(fpr, tpr, strict=True) if f <= target + 1e-12)


def confusion_at(labels: Sequence[int], scores: Sequence[float], threshold: float) -> Confusion:
    y, flagged = np.asarray(labels) == 1, np.asarray(scores) >= threshold
    return Confusion(
        threshold,
        tp=int(np.sum(flagged & y)),
        fp=int(np.sum(flagged & ~y)),
        tn=int(np.sum(~flagged & ~y)),
        fn=int(np.sum(~flagged & y)),
    )


def summarise(spec: DetectorSpec, items: Sequence[ItemScore], threshold: float | None) -> DetectorResult:
    """A detector's metrics from item scores (items it did not score are counted, not used)."""
    scored = [it for it in items if spec.name in it.scores and math.isfinite(it.scores[spec.name])]
    labels = [it.label for it in scored]
    scores = [it.scores[spec.name] for it in scored]
    n_pos = sum(labels)
    n_neg = len(labels) - n_pos
    auroc: float | None = None
    fpr: tuple[float, ...] = ()
    tpr: tuple[float, ...] = ()
    recall: dict[float, float | None] = dict.fromkeys(TARGET_FPRS)
    if n_pos and n_neg:
        auroc = float(roc_auc_score(labels, scores))
        f, t, _ = roc_curve(labels, scores)
        fpr, tpr = tuple(float(x) for x in f), tuple(float(x) for x in t)
        recall = {target: recall_at_fpr(fpr, tpr, target) for target in TARGET_FPRS}
    return DetectorResult(
        spec=spec,
        n_positive=n_pos,
        n_negative=n_neg,
        n_unscored=len(items) - len(scored),
        auroc=auroc,
        recall_at_fpr=recall,
        confusion=confusion_at(labels, scores, threshold) if threshold is not None and scored else None,
        fpr=fpr,
        tpr=tpr,
    )


def evaluate(
    engine: Engine,
    specs: Sequence[DetectorSpec],
    items: Sequence[LabelledText],
    dataset: DatasetRef,
    *,
    aggregate: Aggregate = "mean",
    registry: DetectorRegistry | None = None,
    metrics: Metrics | None = None,
    base_dir: Path | None = None,
    progress: Callable[[int], None] | None = None,
    category: str | None = None,
) -> Report:
    """Score `items` with the detectors of `specs` on `engine` and measure each detector.

    The confusion matrix compares the item score with the detector's threshold for the same
    statistic (`threshold_for`): with `max` that is "some reasoning token reached the per-token
    threshold"; with `mean@16`, "some full window of 16 reached the mean@16 threshold" (what the
    policy rule would flag). Runs its own event loop: async callers build a `Pipeline` and await
    `score_items` instead.
    """
    if not specs:
        raise DetectorError("no detectors to evaluate")
    check_aggregate(aggregate)
    # A fresh metric registry: an evaluation must not show up in the process's live metrics.
    pipeline = Pipeline(
        engine, specs, NO_RULES, registry=registry, metrics=metrics or Metrics(CollectorRegistry()), base_dir=base_dir
    )
    scored = asyncio.run(score_items(pipeline, items, aggregate, progress, category))
    results = tuple(summarise(spec, scored, threshold_for(pipeline.thresholds, spec.name, aggregate)) for spec in pipeline.specs)
    info = engine.info
    return Report(dataset, info.model_id, info.revision, aggregate, len(items), results, tuple(scored))


def plot_roc(report: Report, path: Path) -> Path:
    """One PNG with every detector's ROC curve, its AUROC in the legend, and the chance line."""
    fig = Figure(figsize=(7, 5.5), dpi=100)
    FigureCanvasAgg(fig)  # attaches itself to the figure: no pyplot, no global state
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="chance")
    for result in report.detectors:
        if result.auroc is None:
            ax.plot([], [], linestyle="none", label=f"{result.name} (undefined: one class)")
        else:
            ax.plot(result.fpr, result.tpr, linewidth=2, label=f"{result.name} (AUROC {result.auroc:.3f})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("False positive rate")
    ax.set_ylabel("True positive rate")
    dataset = Path(report.dataset.path).name
    ax.set_title(f"ROC on {dataset}\n{report.n_items} items, {report.aggregate} score over the reasoning tokens")
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path
