"""Training linear probes on residual-stream activations, and calibrating their threshold.

Recipe (Apollo Research's deception probes): per-token activations of the response, a
`StandardScaler` and an L2 logistic regression; an example's score is the mean of its token
scores; the layer with the best validation AUROC wins; the threshold is the token score at
which the benign (label 0) validation tokens have the target false-positive rate.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.preprocessing import StandardScaler

from monitor.engine.hf import HFEngine
from probes.datasets import LabelledText
from probes.linear import LinearProbe, ProbeMetadata

Progress = Callable[[int], None]
"""Called with the number of items just processed."""


@dataclass(frozen=True)
class Activations:
    """Per-token activations of a set of texts: one [tokens, d_model] matrix per layer."""

    by_layer: dict[int, npt.NDArray[np.float32]]
    labels: npt.NDArray[np.int64]  # [tokens]
    item: npt.NDArray[np.int64]  # [tokens] index of the text each token belongs to


@dataclass(frozen=True)
class LayerResult:
    layer: int
    train_auroc: float
    val_auroc: float


def extract(
    engine: HFEngine, items: Sequence[LabelledText], layers: Sequence[int], progress: Progress | None = None
) -> Activations:
    """Teacher-force each text after its messages and keep its tokens' activations."""
    chunks: dict[int, list[npt.NDArray[np.float32]]] = {layer: [] for layer in layers}
    labels, owner = [], []
    for i, item in enumerate(items):
        acts = engine.capture(item.messages, item.text, layers)
        n = acts[layers[0]].shape[0]
        for layer in layers:
            chunks[layer].append(acts[layer].numpy())
        labels.append(np.full(n, item.label))
        owner.append(np.full(n, i))
        if progress:
            progress(1)
    return Activations(
        {layer: np.concatenate(parts).astype(np.float32) for layer, parts in chunks.items()},
        np.concatenate(labels).astype(np.int64),
        np.concatenate(owner).astype(np.int64),
    )


def fit(
    x: npt.NDArray[np.float32], y: npt.NDArray[np.int64], c: float = 1.0, seed: int = 0
) -> tuple[StandardScaler, LogisticRegression]:
    """Standardise and fit an L2 logistic regression on token activations."""
    scaler = StandardScaler().fit(x)
    model = LogisticRegression(C=c, max_iter=2000, random_state=seed).fit(scaler.transform(x), y)
    return scaler, model


def to_probe(scaler: StandardScaler, model: LogisticRegression, meta: ProbeMetadata) -> LinearProbe:
    scale = np.asarray(scaler.scale_, dtype=np.float32)
    return LinearProbe(
        meta=meta,
        direction=np.asarray(model.coef_[0], dtype=np.float32),
        bias=float(model.intercept_[0]),
        mean=np.asarray(scaler.mean_, dtype=np.float32),
        scale=np.where(scale > 0, scale, 1.0).astype(np.float32),
    )


def mean_per_item(token_scores: npt.NDArray[np.float64], item: npt.NDArray[np.int64]) -> dict[int, float]:
    """Each text's score: the mean of its tokens' scores."""
    return {int(i): float(token_scores[item == i].mean()) for i in np.unique(item)}


def item_auroc(token_scores: npt.NDArray[np.float64], acts: Activations) -> float:
    per_item = mean_per_item(token_scores, acts.item)
    labels = {int(i): int(acts.labels[acts.item == i][0]) for i in per_item}
    y = [labels[i] for i in per_item]
    if len(set(y)) < 2:
        return float("nan")
    return float(roc_auc_score(y, [per_item[i] for i in per_item]))


def calibrate(negative_scores: npt.NDArray[np.float64], target_fpr: float) -> float:
    """Lowest threshold t such that at most `target_fpr` of the negatives score >= t."""
    if negative_scores.size == 0:
        raise ValueError("calibration needs at least one negative (benign) score")
    ordered = np.sort(negative_scores)[::-1]
    k = int(np.floor(target_fpr * ordered.size))
    if k >= ordered.size:
        return 0.0
    return float(min(1.0, np.nextafter(ordered[k], np.inf)))


def split_by_group(
    items: Sequence[LabelledText], val_fraction: float, seed: int
) -> tuple[list[LabelledText], list[LabelledText]]:
    """Train/validation split that keeps each group (a contrast pair) on one side."""
    groups = sorted({it.group for it in items})
    rng = np.random.default_rng(seed)
    val_groups = set(rng.permutation(groups)[: max(1, round(len(groups) * val_fraction))].tolist())
    return [it for it in items if it.group not in val_groups], [it for it in items if it.group in val_groups]


def train_probe(
    engine: HFEngine,
    items: Sequence[LabelledText],
    *,
    name: str,
    category: str,
    layers: Sequence[int],
    training_data: Sequence[str],
    target_fpr: float = 0.01,
    val_fraction: float = 0.25,
    seed: int = 0,
    progress: Progress | None = None,
) -> tuple[LinearProbe, list[LayerResult]]:
    """Train one probe per layer, keep the best by validation AUROC, calibrate its threshold."""
    train_items, val_items = split_by_group(items, val_fraction, seed)
    train = extract(engine, train_items, layers, progress)
    val = extract(engine, val_items, layers, progress)
    results, fitted = [], {}
    for layer in layers:
        scaler, model = fit(train.by_layer[layer], train.labels, seed=seed)
        fitted[layer] = (scaler, model)
        train_scores = model.predict_proba(scaler.transform(train.by_layer[layer]))[:, 1]
        val_scores = model.predict_proba(scaler.transform(val.by_layer[layer]))[:, 1]
        results.append(LayerResult(layer, item_auroc(train_scores, train), item_auroc(val_scores, val)))
    best = max(results, key=lambda r: (np.nan_to_num(r.val_auroc, nan=-1.0), -r.layer))
    scaler, model = fitted[best.layer]
    val_scores = model.predict_proba(scaler.transform(val.by_layer[best.layer]))[:, 1]
    threshold = calibrate(val_scores[val.labels == 0], target_fpr)
    meta = ProbeMetadata(
        name=name,
        category=category,
        model_id=engine.info.model_id,
        model_revision=engine.info.revision,
        layer=best.layer,
        d_model=engine.info.d_model,
        threshold=threshold,
        target_fpr=target_fpr,
        training_data=list(training_data),
        metrics={
            "train_auroc": best.train_auroc,
            "val_auroc": best.val_auroc,
            "train_items": float(len(train_items)),
            "val_items": float(len(val_items)),
            "val_token_fpr_at_threshold": float(np.mean(val_scores[val.labels == 0] >= threshold)),
        },
    )
    return to_probe(scaler, model, meta), results
