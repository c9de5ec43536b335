"""Policy-only replay: the flags a policy raises over a stored session's detections, no model.

A stored session keeps its detections and the policy's evaluation steps (`Transcript.evaluations`).
Re-running a `PolicyEvaluator` call by call gives exactly the live flags, but costs Python work
per token. `backtest` first bounds every condition's statistic over all calls at once with numpy
(the max and min of the window bound `last`, `max`, `mean` and `ema`; `mean` and `count_over`
also come from cumulative sums), finds the calls where some rule *can* hold, and runs the real
evaluator only there (`PolicyEvaluator.jump`). A rule cannot fire at a call the bounds rule out,
so the flags are the evaluator's own, and most unflagged sessions cost a few array operations.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from monitor.policy.evaluate import Key, PolicyEvaluator, key_of
from monitor.policy.model import AllOf, AnyOf, Comparison, Condition, NotOf, Policy, When, conditions_of
from monitor.types import Flag

EPS = 1e-9  # slack for statistics whose float rounding may differ from the evaluator's (mean, ema)

Bools = npt.NDArray[np.bool_]
Floats = npt.NDArray[np.float64]


class ScoreColumns(Protocol):
    """A session's detections as arrays (`monitor.store.columns.DetectionColumns` is one)."""

    @property
    def detectors(self) -> list[str]: ...

    @property
    def categories(self) -> list[str]: ...

    @property
    def detector(self) -> npt.NDArray[Any]:
        """Index into `detectors`, per detection."""
        ...

    @property
    def category(self) -> npt.NDArray[Any]:
        """Index into `categories`, per detection."""
        ...

    @property
    def score(self) -> npt.NDArray[np.float64]: ...

    @property
    def evaluations(self) -> npt.NDArray[Any]:
        """[calls, 2]: the token index of each policy evaluation and the detections seen by then."""
        ...


class _History:
    """One key's scores and, per call, how many of them the evaluator had seen."""

    def __init__(self, scores: Floats, seen: npt.NDArray[np.int64]):
        self.scores, self.seen = scores, seen
        self.touched: Bools = np.diff(seen, prepend=0) > 0
        self._cumsum: dict[float, Floats] = {}

    def tail(self, call: int, window: int) -> Floats:
        n = int(self.seen[call])
        return self.scores[max(0, n - window) : n]

    def rolling(self, window: int, reduce: Any, fill: float) -> Floats:
        """reduce (np.max / np.min) over the window ending after each of the m scores, per call."""
        m = len(self.scores)
        if m == 0:
            return np.full(len(self.seen), fill)
        if window >= m:
            per_end = (np.maximum if reduce is np.max else np.minimum).accumulate(self.scores)
        else:
            padded = np.concatenate([np.full(window - 1, fill), self.scores])
            per_end = reduce(np.lib.stride_tricks.sliding_window_view(padded, window), axis=1)
        out: Floats = per_end[np.maximum(self.seen - 1, 0)]
        return out

    def window_sum(self, window: int, values: Floats) -> Floats:
        sums: Floats = np.concatenate([[0.0], np.cumsum(values)])
        out: Floats = sums[self.seen] - sums[np.maximum(self.seen - window, 0)]
        return out


def backtest(policy: Policy, columns: ScoreColumns, thresholds: Mapping[str, float | None] | None = None) -> list[Flag]:
    """The flags `policy` raises over a stored session's detections, in order, up to its first halt."""
    evaluator = PolicyEvaluator(policy, thresholds)
    calls = np.asarray(columns.evaluations, dtype=np.int64).reshape(-1, 2)
    if not len(calls) or not policy.rules:
        return []
    windows = evaluator.windows
    histories = {key: _history(key, columns, calls[:, 1]) for key in windows}
    candidates = np.zeros(len(calls), dtype=bool)
    for rule in policy.rules:
        keys = {key_of(c) for c in conditions_of(rule.when)}
        evaluated = np.logical_or.reduce([histories[k].touched for k in keys])
        evaluated[0] = True  # the first call evaluates every rule
        candidates |= evaluated & _may(rule.when, evaluator, histories)[0]
    flags: list[Flag] = []
    for call in np.flatnonzero(candidates).tolist():
        tails = {key: h.tail(call, windows[key]).tolist() for key, h in histories.items()}
        touched = {key for key, h in histories.items() if h.touched[call]}
        fired = evaluator.jump(tails, touched, int(calls[call, 0]), first=call == 0)
        flags.extend(fired)
        if any("halt" in f.actions for f in fired):
            break
    return flags


def _history(key: Key, columns: ScoreColumns, seen_after: npt.NDArray[np.int64]) -> _History:
    detector, category = key
    mask = np.asarray(columns.detector) == (columns.detectors.index(detector) if detector in columns.detectors else -1)
    if category is not None:
        mask &= np.asarray(columns.category) == (columns.categories.index(category) if category in columns.categories else -1)
    positions = np.flatnonzero(mask)
    return _History(np.asarray(columns.score, dtype=np.float64)[positions], np.searchsorted(positions, seen_after, side="left"))


def _may(when: When, evaluator: PolicyEvaluator, histories: Mapping[Key, _History]) -> tuple[Bools, Bools]:
    """(may hold, may fail) per call: False only where the bounds prove otherwise."""
    if isinstance(when, Condition):
        return _may_condition(when, evaluator, histories[key_of(when)])
    if isinstance(when, NotOf):
        may_true, may_false = _may(when.condition, evaluator, histories)
        return may_false, may_true
    parts = [_may(c, evaluator, histories) for c in when.conditions]
    trues, falses = [p[0] for p in parts], [p[1] for p in parts]
    if isinstance(when, AllOf):
        return np.logical_and.reduce(trues), np.logical_or.reduce(falses)
    assert isinstance(when, AnyOf)
    return np.logical_or.reduce(trues), np.logical_and.reduce(falses)


def _may_condition(cond: Condition, evaluator: PolicyEvaluator, h: _History) -> tuple[Bools, Bools]:
    bound, over = evaluator.bounds(cond)
    w = cond.window
    empty = h.seen == 0
    if cond.stat == "count_over":
        lo = hi = h.window_sum(w, (h.scores >= over).astype(np.float64))  # an exact integer count
    elif cond.stat == "last":
        lo = hi = h.scores[np.maximum(h.seen - 1, 0)] if len(h.scores) else np.zeros(len(h.seen))
    elif cond.stat == "max":
        lo = hi = h.rolling(w, np.max, -np.inf)
    elif cond.stat == "mean":
        mean = h.window_sum(w, h.scores) / np.maximum(np.minimum(h.seen, w), 1)
        lo, hi = mean - EPS, mean + EPS
    else:  # ema: a weighted mean of the window, between its min and max
        lo, hi = h.rolling(w, np.min, np.inf) - EPS, h.rolling(w, np.max, -np.inf) + EPS
    may_true, may_false = _compare(cond.comparison, lo, hi, bound)
    empty |= h.seen < cond.min_scores  # the evaluator's value is None until min_scores scores exist
    return may_true & ~empty, may_false | empty


def _compare(comparison: Comparison, lo: Floats, hi: Floats, bound: float) -> tuple[Bools, Bools]:
    """Whether a value in [lo, hi] may satisfy `comparison` with `bound`, and whether it may not."""
    if comparison == "gte":
        return hi >= bound, lo < bound
    if comparison == "gt":
        return hi > bound, lo <= bound
    if comparison == "lte":
        return lo <= bound, hi > bound
    return lo < bound, hi >= bound
