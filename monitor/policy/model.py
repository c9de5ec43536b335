"""The policy data model: rules, conditions and their compositions, and PolicyError."""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from monitor.types import STAT_SEPARATOR, Action, Severity

Stat = Literal["last", "max", "mean", "ema", "count_over"]
Comparison = Literal["gte", "gt", "lte", "lt"]
Bound = float | Literal["calibrated"]

STATS: tuple[Stat, ...] = ("last", "max", "mean", "ema", "count_over")
COMPARISONS: tuple[Comparison, ...] = ("gte", "gt", "lte", "lt")
SYMBOLS: dict[Comparison, str] = {"gte": ">=", "gt": ">", "lte": "<=", "lt": "<"}
COMPARE: dict[Comparison, Callable[[float, float], bool]] = {
    "gte": operator.ge,
    "gt": operator.gt,
    "lte": operator.le,
    "lt": operator.lt,
}


class PolicyError(ValueError):
    """An invalid policy: the message names the file, the rule (when there is one) and the field."""

    def __init__(self, source: str, message: str, *, rule: str | None = None, field: str | None = None):
        self.source, self.rule, self.field = source, rule, field
        where = [source] + ([f"rule {_quoted(rule)}"] if rule else []) + ([f"field {_quoted(field)}"] if field else [])
        super().__init__(": ".join([*where, message]))


def _quoted(text: str, limit: int = 80) -> str:
    """repr of a name from a policy, cut to `limit` characters (a hostile name can be any size)."""
    return repr(text if len(text) <= limit else text[: limit - 3] + "...")


@dataclass(frozen=True)
class Condition:
    """One statistic of a detector's last `window` scores, compared with a bound."""

    detector: str  # detector instance name (DetectorSpec.name)
    comparison: Comparison  # how the statistic is compared with `value`
    value: Bound  # a score in [0, 1] or `calibrated`; for count_over an integer count in [0, window]
    stat: Stat = "last"
    window: int = 1  # how many of the latest scores the statistic looks at
    category: str | None = None  # when set, only the detector's detections of this category count
    over: Bound | None = None  # count_over only: a score counts when it is >= this
    alpha: float | None = None  # ema only: the smoothing factor; None means 2 / (window + 1)
    min_scores: int = 1  # the condition is false until its history holds this many scores (<= window)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"detector": self.detector}
        if self.category is not None:
            out["category"] = self.category
        out |= {"stat": self.stat, "window": self.window}
        out |= {k: v for k, v in (("over", self.over), ("alpha", self.alpha)) if v is not None}
        out |= {"min_scores": self.min_scores} if self.min_scores != 1 else {}
        return out | {self.comparison: self.value}


@dataclass(frozen=True)
class AllOf:
    """Holds when every condition holds."""

    conditions: tuple[When, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"all": [c.to_dict() for c in self.conditions]}


@dataclass(frozen=True)
class AnyOf:
    """Holds when at least one condition holds."""

    conditions: tuple[When, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"any": [c.to_dict() for c in self.conditions]}


@dataclass(frozen=True)
class NotOf:
    """Holds when the condition does not, which includes while its detector has no scores yet."""

    condition: When

    def to_dict(self) -> dict[str, Any]:
        return {"not": self.condition.to_dict()}


When = Condition | AllOf | AnyOf | NotOf


def stat_key(cond: Condition) -> str:
    """How calibrations name the statistic `cond` computes: last, mean@16 (over full windows of 16:
    `min_scores: 16`), mean@16/from1 (windows counted from the first score), ema@16, max@32 ..."""
    if cond.stat in ("last", "count_over"):
        return "last"
    alpha = "" if cond.alpha is None else f"/alpha={cond.alpha:g}"
    start = "" if cond.min_scores >= cond.window else f"/from{cond.min_scores}"
    return f"{cond.stat}@{cond.window}{alpha}{start}"


def detector_names(thresholds: Mapping[str, float | None]) -> list[str]:
    """The detectors of a thresholds mapping (without its per-statistic entries)."""
    return sorted(k for k in thresholds if STAT_SEPARATOR not in k)


def statistic_thresholds(thresholds: Mapping[str, float | None], detector: str) -> dict[str, float | None]:
    """A detector's thresholds calibrated per statistic (`mean@16` -> ...), from a thresholds mapping."""
    prefix = detector + STAT_SEPARATOR
    return {k.removeprefix(prefix): v for k, v in thresholds.items() if k.startswith(prefix)}


def calibrated_bound(cond: Condition, thresholds: Mapping[str, float | None], *, over: bool = False) -> float:
    """The threshold a `calibrated` bound of `cond` stands for (its `over` bound with `over`).

    A mean or EMA compares an average, so it takes the threshold calibrated for that very statistic
    when the detector has one; a detector calibrated for other statistics only is an error (its
    per-token threshold would not mean the same false-positive rate). `last`, `max` and
    count_over's `over` compare single scores and take the per-token threshold, as do the means of a
    detector calibrated per token only. LookupError says why there is none.
    """
    name = cond.detector
    if not over and cond.stat in ("mean", "ema"):
        key = stat_key(cond)
        specific = thresholds.get(name + STAT_SEPARATOR + key)
        if specific is not None:
            return specific
        if others := sorted(statistic_thresholds(thresholds, name)):
            raise LookupError(
                f"detector {name!r} has no threshold calibrated for {key} (it has: last, {', '.join(others)}); "
                "use one of those, calibrate it for this statistic, or give a number"
            )
    threshold = thresholds.get(name)
    if threshold is None:
        raise LookupError(f"detector {name!r} has no calibrated threshold, which a 'calibrated' bound needs")
    return threshold


def conditions_of(when: When) -> Iterator[Condition]:
    """Every condition in a `when` tree, depth first."""
    if isinstance(when, Condition):
        yield when
    elif isinstance(when, NotOf):
        yield from conditions_of(when.condition)
    else:
        for c in when.conditions:
            yield from conditions_of(c)


@dataclass(frozen=True)
class Rule:
    """A named condition tree, and what to do when it holds (at most once per stream)."""

    name: str
    category: str
    severity: Severity
    when: When
    actions: tuple[Action, ...]

    def lookback(self) -> int:
        """How many of the latest tokens the rule's conditions look at (the span a flag covers)."""
        return max(c.window for c in conditions_of(self.when))

    def detectors(self) -> frozenset[str]:
        """Names of the detectors the rule's conditions read."""
        return frozenset(c.detector for c in conditions_of(self.when))

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "category": self.category,
            "severity": self.severity,
            "when": self.when.to_dict(),
            "actions": list(self.actions),
        }


@dataclass(frozen=True)
class Policy:
    """A validated policy; `source` is the file (or the name given to `parse_policy`)."""

    name: str
    description: str
    rules: tuple[Rule, ...]
    source: str

    def to_dict(self) -> dict[str, Any]:
        """Plain data, without `source`, that `parse_policy` turns back into an equal policy."""
        return {"name": self.name, "description": self.description, "rules": [r.to_dict() for r in self.rules]}
