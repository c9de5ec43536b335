"""Calibrating a probe's thresholds on the statistics policies compute, per session.

A policy rule compares a statistic of a detector's recent scores (the last token's, the mean of
the last 16, an EMA ...) with a bound at every token, and flags the session the first time it
holds. So a threshold for a statistic is calibrated on that statistic, as the policy evaluator
computes it token by token over full windows (a rule with `min_scores` = `window`), and a
benign session counts as a false positive when the statistic reaches the threshold anywhere in
it: the threshold is the lowest value that at most `target_fpr` of the calibration sessions'
peaks reach. The false-positive rate is then measured on other benign sessions, held apart, and
recall on held-out positive texts, both at the same per-session unit.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import numpy.typing as npt

from monitor.engine.hf import HFEngine
from probes.linear import LinearProbe
from probes.onpolicy import BenignSet, Session
from probes.train import TrainedProbe, capture_all

FloatArray = npt.NDArray[np.float64]

STATISTICS = ("last", "mean@8", "mean@16", "mean@32", "mean@64", "ema@16", "ema@32")
"""Statistics calibrated by default, named as `monitor.policy.stat_key` names a condition's: a
windowed one over full windows (`min_scores` = `window` in a policy)."""


CHECK_FPR = 0.05
"""A second target, recorded beside the policy's: ~190 held-apart sessions hold about 2 false
positives at 1%, too few to tell a rate from its double or half; at 5% they hold about 10."""


def parse_statistic(key: str) -> tuple[str, int]:
    """'mean@16' -> ('mean', 16); 'last' -> ('last', 1)."""
    stat, _, window = key.partition("@")
    if stat == "last" and not window:
        return stat, 1
    if stat not in ("mean", "ema", "max") or not window.isdigit() or int(window) < 1:
        raise ValueError(f"unknown statistic {key!r}: use last, mean@N, ema@N or max@N")
    return stat, int(window)


def statistic_series(scores: FloatArray, key: str) -> FloatArray:
    """The statistic at every token of one session, exactly as the policy evaluator computes it
    over full windows (`min_scores` = `window`): NaN where fewer than `window` scores exist yet."""
    stat, window = parse_statistic(key)
    n = len(scores)
    out = np.full(n, np.nan)
    if n < window:
        return out
    if stat == "last":
        return np.asarray(scores, dtype=np.float64)
    if stat == "mean":
        sums = np.concatenate([[0.0], np.cumsum(scores, dtype=np.float64)])
        out[window - 1 :] = (sums[window:] - sums[:-window]) / window
        return out
    if stat == "max":
        out[window - 1 :] = np.lib.stride_tricks.sliding_window_view(scores, window).max(axis=1)
        return out
    alpha = 2 / (window + 1)  # ema from the oldest score in the window, recomputed at every token
    for i in range(window - 1, n):
        value = float(scores[i + 1 - window])
        for score in scores[i + 2 - window : i + 1]:
            value = alpha * float(score) + (1 - alpha) * value
        out[i] = value
    return out


def peaks(sessions: Sequence[FloatArray], key: str) -> FloatArray:
    """Each session's highest value of the statistic: the session is flagged at t iff peak >= t;
    -inf for a session too short for one full window (never flagged by it)."""
    out = np.full(len(sessions), -np.inf)
    for i, session in enumerate(sessions):
        values = statistic_series(session, key)
        values = values[~np.isnan(values)]
        if values.size:
            out[i] = values.max()
    return out


def rate_interval(rate: float, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Clopper-Pearson interval for a rate measured as `rate` of `n` sessions: what n can resolve
    (0 of 193 sessions is consistent with anything from 0% to 1.9%)."""
    from scipy.stats import beta

    k = round(rate * n)
    tail = (1 - confidence) / 2
    low = 0.0 if k == 0 else float(beta.ppf(tail, k, n - k + 1))
    high = 1.0 if k == n else float(beta.ppf(1 - tail, k + 1, n - k))
    return low, high


def threshold_at(negative_peaks: FloatArray, target_fpr: float) -> float:
    """Lowest t such that at most `target_fpr` of the negatives reach t (a score, so at most 1)."""
    if negative_peaks.size == 0:
        raise ValueError("calibration needs at least one benign session")
    ordered = np.sort(negative_peaks)[::-1]
    k = int(np.floor(target_fpr * ordered.size))
    if k >= ordered.size:
        return 0.0
    return float(max(0.0, min(1.0, np.nextafter(ordered[k], np.inf))))  # a score: in [0, 1]


@dataclass(frozen=True)
class StatCalibration:
    """One statistic's threshold and what it does on data that did not set it."""

    threshold: float
    calibration_n: int
    """Benign sessions the threshold was set on."""
    heldapart_fpr: float
    """Share of held-apart benign sessions the statistic flags at the threshold."""
    heldapart_n: int
    recall: float
    """Share of held-out positive texts it flags (NaN without positives)."""
    recall_n: int

    def to_dict(self) -> dict[str, float]:
        return {k: float(v) for k, v in asdict(self).items()}


def calibrate_statistic(
    key: str,
    calibration: Sequence[FloatArray],
    heldapart: Sequence[FloatArray],
    positives: Sequence[FloatArray],
    target_fpr: float,
) -> StatCalibration:
    """Set the threshold of statistic `key` on `calibration` sessions' token scores; measure it."""
    return calibrate_peaks(peaks(calibration, key), peaks(heldapart, key), peaks(positives, key), target_fpr)


def calibrate_peaks(calibration: FloatArray, held: FloatArray, pos: FloatArray, target_fpr: float) -> StatCalibration:
    """`calibrate_statistic` on the sessions' peaks of the statistic, computed once for several targets."""
    threshold = threshold_at(calibration, target_fpr)
    return StatCalibration(
        threshold=threshold,
        calibration_n=len(calibration),
        heldapart_fpr=float(np.mean(held >= threshold)) if held.size else float("nan"),
        heldapart_n=int(held.size),
        recall=float(np.mean(pos >= threshold)) if pos.size else float("nan"),
        recall_n=int(pos.size),
    )


def session_scores(
    engine: HFEngine, probes: Sequence[LinearProbe], sessions: Sequence[Session], progress: Callable[[int], None] | None = None
) -> dict[str, list[FloatArray]]:
    """Each probe's token scores on each session: the assistant text teacher-forced after its prompt
    (both channels, as a probe scores them live), the probe applied to the captured residual stream
    (what the engine's readout computes on device, to float rounding)."""
    layers = sorted({p.meta.layer for p in probes})
    scores: dict[str, list[FloatArray]] = {p.meta.name: [] for p in probes}
    for acts in capture_all(engine, sessions, layers, progress):
        for probe in probes:
            logits = probe.logits(acts[probe.meta.layer])
            scores[probe.meta.name].append(1 / (1 + np.exp(-logits)))
    return scores


def calibrate_on_policy(
    engine: HFEngine,
    trained: Sequence[TrainedProbe],
    benign: BenignSet,
    *,
    target_fpr: float = 0.01,
    statistics: Sequence[str] = STATISTICS,
    progress: Callable[[int], None] | None = None,
) -> list[LinearProbe]:
    """The probes with thresholds per statistic set on the model's own benign sessions (see the
    module docstring); `threshold` becomes the per-token (`last`) one."""
    probes = [t.probe for t in trained]
    calibration = session_scores(engine, probes, benign.calibration, progress)
    heldapart = session_scores(engine, probes, benign.heldapart, progress)
    out = []
    for t in trained:
        name = t.probe.meta.name
        session_peaks = {k: (peaks(calibration[name], k), peaks(heldapart[name], k), peaks(t.positives, k)) for k in statistics}
        stats = {k: calibrate_peaks(*session_peaks[k], target_fpr) for k in statistics}
        record: dict[str, Any] = {
            "unit": "session",
            "target_fpr": target_fpr,
            "texts": benign.source,
            "statistics": {k: s.to_dict() for k, s in stats.items()},
        }
        if target_fpr < CHECK_FPR:  # the same statistics set at a target the held-apart n can resolve
            check = {k: calibrate_peaks(*session_peaks[k], CHECK_FPR) for k in statistics}
            record["check"] = {
                "target_fpr": CHECK_FPR,
                "statistics": {k: {"threshold": c.threshold, "heldapart_fpr": c.heldapart_fpr} for k, c in check.items()},
            }
        training_data = [*t.probe.meta.training_data[:-1], f"thresholds calibrated per session on {benign.source}"]
        meta = replace(
            t.probe.meta,
            threshold=stats["last"].threshold,
            target_fpr=target_fpr,
            training_data=training_data,
            calibration=record,
        )
        out.append(replace(t.probe, meta=meta))
    return out
