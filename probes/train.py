"""Training linear probes on residual-stream activations, and calibrating their threshold.

Recipe (Apollo Research's deception probes): per-token activations of the response, a
`StandardScaler` and an L2 logistic regression whose strength is chosen by cross-validation
grouped by text; an example's score is the mean of its token scores; the layer with the best
validation AUROC wins; the threshold is the token score at which benign tokens (a control set,
or the negative validation texts) have the target false-positive rate.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
from safetensors.numpy import load_file, save_file
from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import GroupKFold
from sklearn.preprocessing import StandardScaler

from monitor.engine.hf import HFEngine
from monitor.types import ChatMessage
from probes.datasets import LabelledText, model_slug
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
    c: float
    """Inverse regularisation strength chosen by cross-validation."""

    def to_dict(self) -> dict[str, float]:
        return {"layer": self.layer, "c": self.c, "train_auroc": self.train_auroc, "val_auroc": self.val_auroc}


@dataclass(frozen=True)
class TrainedProbe:
    """A trained probe, its per-layer results, and its token scores on held-out positive texts."""

    probe: LinearProbe
    results: list[LayerResult]
    positives: list[npt.NDArray[np.float64]]
    """Token scores of each positive validation text (never trained on), to measure recall."""


class ActivationCache:
    """Per-text activations on disk, keyed by model, revision, layers and the text itself.

    Extraction writes one small safetensors file per text as it goes, so an interrupted run
    resumes where it stopped, and a second training run over the same data reads from disk.
    """

    def __init__(self, root: Path, engine: HFEngine, layers: Sequence[int]):
        slug = model_slug(engine.info.model_id)
        self.dir = root / f"{slug}@{engine.info.revision}"
        self.layers = tuple(layers)

    def _path(self, item: LabelledText) -> Path:
        key = json.dumps([[m.role, m.content] for m in item.messages] + [item.text, list(self.layers)])
        return self.dir / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.safetensors"

    def get(self, item: LabelledText) -> dict[int, npt.NDArray[np.float32]] | None:
        path = self._path(item)
        if not path.exists():
            return None
        tensors = load_file(str(path))
        return {layer: tensors[f"layer{layer}"] for layer in self.layers}

    def put(self, item: LabelledText, acts: dict[int, npt.NDArray[np.float32]]) -> None:
        path = self._path(item)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({f"layer{layer}": np.ascontiguousarray(acts[layer]) for layer in self.layers}, str(tmp))
        tmp.replace(path)  # atomic: a killed run never leaves a half-written entry


BATCH = 16
"""Texts teacher-forced in one forward (`HFEngine.capture_many`)."""


def capture_all(
    engine: HFEngine,
    items: Sequence[tuple[Sequence[ChatMessage], str]],
    layers: Sequence[int],
    progress: Progress | None = None,
) -> list[dict[int, npt.NDArray[np.float32]]]:
    """Activations of each (messages, text), BATCH at a time, texts of similar length together."""
    order = sorted(range(len(items)), key=lambda i: len(items[i][1]))
    found: dict[int, dict[int, npt.NDArray[np.float32]]] = {}
    for start in range(0, len(order), BATCH):
        chunk = order[start : start + BATCH]
        for i, acts in zip(chunk, engine.capture_many([items[i] for i in chunk], layers), strict=True):
            found[i] = {layer: t.numpy() for layer, t in acts.items()}
        if progress:
            progress(len(chunk))
    return [found[i] for i in range(len(items))]


def extract(
    engine: HFEngine,
    items: Sequence[LabelledText],
    layers: Sequence[int],
    progress: Progress | None = None,
    cache: ActivationCache | None = None,
) -> Activations:
    """Teacher-force each text after its messages and keep its tokens' activations."""
    chunks: dict[int, list[npt.NDArray[np.float32]]] = {layer: [] for layer in layers}
    labels, owner = [], []
    cached = [cache.get(item) if cache is not None else None for item in items]
    missing = [i for i, acts in enumerate(cached) if acts is None]
    if progress and len(missing) < len(items):
        progress(len(items) - len(missing))
    computed = capture_all(engine, [(items[i].messages, items[i].text) for i in missing], layers, progress)
    for i, acts in zip(missing, computed, strict=True):
        cached[i] = acts
        if cache is not None:
            cache.put(items[i], acts)
    for i, item in enumerate(items):
        acts = cached[i]
        assert acts is not None
        n = acts[layers[0]].shape[0]
        for layer in layers:
            chunks[layer].append(acts[layer])
        labels.append(np.full(n, item.label))
        owner.append(np.full(n, i))
    return Activations(
        {layer: np.concatenate(parts).astype(np.float32) for layer, parts in chunks.items()},
        np.concatenate(labels).astype(np.int64),
        np.concatenate(owner).astype(np.int64),
    )


REGULARISATION = (0.001, 0.01, 0.1, 1.0, 10.0)
"""Inverse L2 strengths tried by cross-validation."""
SEARCH_TOKENS = 12_000
"""Tokens (whole texts, seeded) the strength is searched on; the chosen strength is then fit on all."""


def fit(
    x: npt.NDArray[np.float32], y: npt.NDArray[np.int64], groups: npt.NDArray[np.int64], seed: int = 0
) -> tuple[StandardScaler, LogisticRegression]:
    """Standardise, pick C by 3-fold cross-validation grouped by text (token AUROC) on at most
    `SEARCH_TOKENS` tokens, then fit that C on every token."""
    scaler = StandardScaler().fit(x)
    z = scaler.transform(x)
    folds = min(3, len(np.unique(groups)))
    if folds < 2 or len(np.unique(y)) < 2:
        return scaler, LogisticRegression(C=1.0, max_iter=2000, random_state=seed).fit(z, y)
    rows = _search_rows(groups, seed)
    search = LogisticRegressionCV(
        Cs=list(REGULARISATION),
        cv=list(GroupKFold(n_splits=folds).split(z[rows], y[rows], groups[rows])),
        scoring="roc_auc",
        max_iter=2000,
        random_state=seed,
        refit=False,
        l1_ratios=(0.0,),  # plain L2
        use_legacy_attributes=False,
    ).fit(z[rows], y[rows])
    c = float(np.ravel(search.C_)[0])
    return scaler, LogisticRegression(C=c, max_iter=2000, random_state=seed).fit(z, y)


def _search_rows(groups: npt.NDArray[np.int64], seed: int) -> npt.NDArray[np.int64]:
    """Rows of whole groups (texts), in a seeded order, until `SEARCH_TOKENS` are taken (all if fewer)."""
    if len(groups) <= SEARCH_TOKENS:
        return np.arange(len(groups))
    ids, sizes = np.unique(groups, return_counts=True)
    order = np.random.default_rng(seed).permutation(len(ids))  # the same shuffle as permuting `ids` itself
    chosen = ids[order[: max(2, int(np.searchsorted(np.cumsum(sizes[order]), SEARCH_TOKENS)))]]
    return np.flatnonzero(np.isin(groups, chosen))


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
    control: Sequence[LabelledText] = (),
    target_fpr: float = 0.01,
    val_fraction: float = 0.25,
    seed: int = 0,
    cache_dir: Path | None = None,
    progress: Progress | None = None,
) -> TrainedProbe:
    """Train one probe per layer, keep the best by validation AUROC, set a first per-token threshold.

    That threshold is set on `control` (benign texts; every token counts as a negative) when given,
    else on the negative validation texts; `probes.calibrate.calibrate_on_policy` then replaces it
    with thresholds per statistic set on the model's own benign sessions.
    """
    cache = ActivationCache(cache_dir, engine, layers) if cache_dir is not None else None
    train_items, val_items = split_by_group(items, val_fraction, seed)
    train = extract(engine, train_items, layers, progress, cache)
    val = extract(engine, val_items, layers, progress, cache)
    results, fitted = [], {}
    for layer in layers:
        scaler, model = fit(train.by_layer[layer], train.labels, train.item, seed=seed)
        train_scores = model.predict_proba(scaler.transform(train.by_layer[layer]))[:, 1]
        val_scores = model.predict_proba(scaler.transform(val.by_layer[layer]))[:, 1]
        fitted[layer] = (scaler, model, val_scores)
        results.append(
            LayerResult(
                layer,
                item_auroc(train_scores, train),
                item_auroc(val_scores, val),
                float(model.C),
            )
        )
    best = max(results, key=lambda r: (np.nan_to_num(r.val_auroc, nan=-1.0), -r.layer))
    scaler, model, val_scores = fitted[best.layer]
    if control:
        negatives = extract(engine, control, layers, progress, cache).by_layer[best.layer]
        calibrated_on = "control set"
    else:
        negatives = val.by_layer[best.layer][val.labels == 0]
        calibrated_on = "negative validation texts"
    negative_scores = model.predict_proba(scaler.transform(negatives))[:, 1]
    threshold = calibrate(negative_scores, target_fpr)
    meta = ProbeMetadata(
        name=name,
        category=category,
        model_id=engine.info.model_id,
        model_revision=engine.info.revision,
        layer=best.layer,
        d_model=engine.info.d_model,
        threshold=threshold,
        target_fpr=target_fpr,
        training_data=[*training_data, f"threshold calibrated per token on the {calibrated_on}"],
        layers=[r.to_dict() for r in results],
        metrics={
            "train_auroc": best.train_auroc,
            "val_auroc": best.val_auroc,
            "c": best.c,
            "train_items": float(len(train_items)),
            "val_items": float(len(val_items)),
            "calibration_tokens": float(len(negative_scores)),
            "calibration_token_fpr": float(np.mean(negative_scores >= threshold)),
        },
    )
    positives = [val_scores[val.item == i] for i in np.unique(val.item[val.labels == 1])]
    return TrainedProbe(to_probe(scaler, model, meta), results, positives)
