"""Evaluating one stream's detections against a policy, token by token."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from itertools import islice

from monitor.policy.model import (
    COMPARE,
    SYMBOLS,
    AllOf,
    Bound,
    Condition,
    NotOf,
    Policy,
    PolicyError,
    Rule,
    When,
    calibrated_bound,
    conditions_of,
)
from monitor.types import Detection, Flag

Key = tuple[str, str | None]
"""A score history: (detector, None) for all its detections, or (detector, category) for one category's."""


class PolicyEvaluator:
    """Evaluates one stream's detections against a policy; make one per stream.

    A condition looks at the last `window` scores of its history, or all of them while there are
    fewer. A condition whose detector has no scores yet is false, so `not` of it is true: a rule
    that is only a `not` fires at the first observed token unless a positive condition guards it.
    """

    def __init__(self, policy: Policy, thresholds: Mapping[str, float | None] | None = None) -> None:
        """Resolve `calibrated` bounds from `thresholds`; PolicyError if a detector there has none."""
        self.policy = policy
        self._bounds: dict[Condition, tuple[float, float]] = {}  # (value, over) with `calibrated` resolved
        self._pending: list[tuple[Rule, frozenset[Key]]] = []  # rules not fired yet, with their histories
        self._started = False
        sizes: dict[Key, int] = {}
        for rule in policy.rules:
            conditions = list(conditions_of(rule.when))
            for c in conditions:
                self._bounds[c] = (
                    _resolve(policy, rule, c, c.value, thresholds or {}, over=False),
                    _resolve(policy, rule, c, c.over, thresholds or {}, over=True),
                )
                sizes[key_of(c)] = max(sizes.get(key_of(c), 1), c.window)
            self._pending.append((rule, frozenset(map(key_of, conditions))))
        self._history: dict[Key, deque[float]] = {key: deque(maxlen=size) for key, size in sizes.items()}

    def observe(self, detections: Sequence[Detection], index: int) -> list[Flag]:
        """Record `detections` (found at token `index`); return the flags of rules that fire now.

        Each rule fires at most once per stream. A rule is evaluated at the first call and then
        only when one of its histories got a score, since nothing else can change its outcome.
        """
        touched: set[Key] = set()
        for det in detections:
            for key in ((det.detector, None), (det.detector, det.category)):
                if (history := self._history.get(key)) is not None:
                    history.append(det.score)
                    touched.add(key)
        first, self._started = not self._started, True
        return self._fire(index, touched, first)

    @property
    def windows(self) -> dict[Key, int]:
        """Each score history the policy reads, with how many of its latest scores it keeps."""
        return {key: history.maxlen or 1 for key, history in self._history.items()}

    def bounds(self, cond: Condition) -> tuple[float, float]:
        """The condition's bound and `over`, with `calibrated` resolved."""
        return self._bounds[cond]

    def jump(self, histories: Mapping[Key, Iterable[float]], touched: set[Key], index: int, *, first: bool) -> list[Flag]:
        """Set the histories to `histories` (the latest scores of each key) and evaluate as `observe`
        would after the call that left them so: the flags of the rules it touched (of every rule at
        the `first` call). A policy-only replay jumps to the calls where a rule can fire."""
        for key, history in self._history.items():
            history.clear()
            history.extend(histories.get(key, ()))
        self._started = True
        return self._fire(index, touched, first)

    def _fire(self, index: int, touched: set[Key], first: bool) -> list[Flag]:
        flags = [
            Flag(rule.name, rule.category, rule.severity, rule.actions, index, self._explain(rule.when))
            for rule, keys in self._pending
            if (first or not keys.isdisjoint(touched)) and self._holds(rule.when)
        ]
        if flags:
            fired = {flag.rule for flag in flags}
            self._pending = [(rule, keys) for rule, keys in self._pending if rule.name not in fired]
        return flags

    def _holds(self, when: When) -> bool:
        if isinstance(when, Condition):
            value = self._value(when)
            return value is not None and COMPARE[when.comparison](value, self._bounds[when][0])
        if isinstance(when, NotOf):
            return not self._holds(when.condition)
        return (all if isinstance(when, AllOf) else any)(self._holds(c) for c in when.conditions)

    def _explain(self, when: When) -> str:
        """The conditions that hold, with their values (for a `when` that does not: what fails)."""
        if isinstance(when, Condition):
            value, (bound, over) = self._value(when), self._bounds[when]
            stat = f"count_over({_show_bound(when.over, over)})" if when.stat == "count_over" else when.stat
            stat += "" if when.alpha is None else f"(alpha={when.alpha:g})"
            stat += "" if when.stat == "last" else f"@{when.window}"
            label = when.detector + (f"[{when.category}]" if when.category else "") + f" {stat}"
            if value is None:
                have = len(self._history[key_of(when)])
                return f"{label}: no scores yet" if not have else f"{label}: {have} of {when.min_scores} scores yet"
            shown = f"{value:.0f}" if when.stat == "count_over" else f"{value:.3f}"
            return f"{label}={shown} {SYMBOLS[when.comparison]} {_show_bound(when.value, bound)}"
        if isinstance(when, NotOf):
            return f"not({self._explain(when.condition)})"
        held = [self._explain(c) for c in when.conditions if self._holds(c)]
        failed = [self._explain(c) for c in when.conditions if not self._holds(c)]
        if isinstance(when, AllOf):
            return "; ".join(held) if not failed else failed[0]
        return "; ".join(held or failed)

    def _value(self, cond: Condition) -> float | None:
        """The condition's statistic over its window; None while its history is empty."""
        history = self._history[key_of(cond)]
        if len(history) < max(1, cond.min_scores):
            return None
        n = len(history)
        scores: Iterable[float] = history if cond.window >= n else islice(history, n - cond.window, None)
        if cond.stat == "last":
            return history[-1]
        if cond.stat == "max":
            return max(scores)
        if cond.stat == "count_over":
            over = self._bounds[cond][1]  # once, not per score: a Condition hashes all its fields
            return float(sum(1 for score in scores if score >= over))
        if cond.stat == "mean":
            window = list(scores)
            return sum(window) / len(window)
        alpha = cond.alpha or 2 / (cond.window + 1)  # ema, from the oldest score in the window
        it = iter(scores)
        value = next(it)
        for score in it:
            value = alpha * score + (1 - alpha) * value
        return value


def key_of(cond: Condition) -> Key:
    return cond.detector, cond.category


def _resolve(
    policy: Policy, rule: Rule, cond: Condition, bound: Bound | None, thresholds: Mapping[str, float | None], *, over: bool
) -> float:
    if bound != "calibrated":
        return bound or 0.0
    try:
        return calibrated_bound(cond, thresholds, over=over)
    except LookupError as exc:
        raise PolicyError(policy.source, str(exc.args[0]), rule=rule.name) from None


def _show_bound(bound: Bound | None, value: float) -> str:
    return f"calibrated {value:g}" if bound == "calibrated" else f"{value:g}"
