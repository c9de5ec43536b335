"""Policies: YAML rules that turn detections into flags (the schema is described in policies/README.md).

A policy is data, never code: each rule is a tree of `all` / `any` / `not` over conditions, and a
condition compares one statistic of a detector's latest scores with a bound. `load_policy`
validates a file and names the file, the rule and the field in every error; `PolicyEvaluator`
keeps one stream's score histories and says which rules fire at each token.
"""

from __future__ import annotations

import math
import operator
import re
from collections import deque
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any, Literal, NoReturn, TypeVar

import yaml

from monitor.types import ACTIONS, SEVERITIES, Action, Detection, Flag, Severity

Stat = Literal["last", "max", "mean", "ema", "count_over"]
Comparison = Literal["gte", "gt", "lte", "lt"]
Bound = float | Literal["calibrated"]

STATS: tuple[Stat, ...] = ("last", "max", "mean", "ema", "count_over")
COMPARISONS: tuple[Comparison, ...] = ("gte", "gt", "lte", "lt")
_SYMBOLS: dict[Comparison, str] = {"gte": ">=", "gt": ">", "lte": "<=", "lt": "<"}
_COMPARE: dict[Comparison, Callable[[float, float], bool]] = {
    "gte": operator.ge,
    "gt": operator.gt,
    "lte": operator.le,
    "lt": operator.lt,
}
_RULE_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]*")
_CATEGORY = re.compile(r"[a-z0-9_]+")
_CONDITION_KEYS = ("detector", "category", "stat", "window", *COMPARISONS, "over", "alpha")
_T = TypeVar("_T", bound=str)


class PolicyError(ValueError):
    """An invalid policy: the message names the file, the rule (when there is one) and the field."""

    def __init__(self, source: str, message: str, *, rule: str | None = None, field: str | None = None):
        self.source, self.rule, self.field = source, rule, field
        where = [source] + ([f"rule {rule!r}"] if rule else []) + ([f"field {field!r}"] if field else [])
        super().__init__(": ".join([*where, message]))


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

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"detector": self.detector}
        if self.category is not None:
            out["category"] = self.category
        out |= {"stat": self.stat, "window": self.window}
        out |= {k: v for k, v in (("over", self.over), ("alpha", self.alpha)) if v is not None}
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


@dataclass(frozen=True)
class Rule:
    """A named condition tree, and what to do when it holds (at most once per stream)."""

    name: str
    category: str
    severity: Severity
    when: When
    actions: tuple[Action, ...]

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


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys, where PyYAML would silently keep the last one."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Hashable, Any]:
        seen: set[object] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key_node.tag != "tag:yaml.org,2002:merge" and isinstance(key, Hashable):
                if key in seen:
                    raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
                seen.add(key)
        return super().construct_mapping(node, deep)


def load_policy(path: str | Path, detectors: Mapping[str, float | None] | None = None) -> Policy:
    """Read and validate a policy file; PolicyError when it cannot be read or is not a valid policy.

    `detectors` maps the detectors that exist to their calibrated threshold (None when uncalibrated):
    when given, conditions on other detectors, and `calibrated` bounds on uncalibrated ones, are
    errors; when None, detector names are not checked.
    """
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PolicyError(source, f"cannot read policy: {exc}") from exc
    try:
        data = yaml.load(text, Loader=_StrictLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise PolicyError(source, f"{where}invalid YAML: {exc.problem or exc.context}") from exc
    except yaml.YAMLError as exc:
        raise PolicyError(source, f"invalid YAML: {exc}") from exc
    return parse_policy(data, source, detectors)


def parse_policy(data: object, source: str, detectors: Mapping[str, float | None] | None = None) -> Policy:
    """Validate parsed policy data (e.g. `Policy.to_dict()`), as `load_policy`; `source` names it."""
    top = _Fields(source, None, detectors)
    if data is None:
        top.fail("", "the policy is empty")
    data = top.mapping("", data, ("name", "description", "rules"), ("name", "rules"))
    name = top.string("name", data["name"])
    description = top.string("description", data.get("description", ""), empty=True)
    items = data["rules"]
    if not isinstance(items, list) or not items:
        top.fail("rules", f"expected a non-empty list of rules, got {_show(items)}")
    rules: dict[str, Rule] = {}
    for i, item in enumerate(items):
        rule = _parse_rule(source, i, item, detectors)
        if rule.name in rules:
            first = list(rules).index(rule.name)
            raise PolicyError(source, f"duplicate rule name (first at rules[{first}])", rule=rule.name, field="name")
        rules[rule.name] = rule
    return Policy(name=name, description=description, rules=tuple(rules.values()), source=source)


def _parse_rule(source: str, i: int, item: object, detectors: Mapping[str, float | None] | None) -> Rule:
    keys = ("name", "category", "severity", "when", "actions")
    unnamed = _Fields(source, None, detectors)  # until the rule has a valid name, errors locate it by index
    item = unnamed.mapping(f"rules[{i}]", item, keys, ("name",))
    f = _Fields(source, unnamed.string(f"rules[{i}].name", item["name"], pattern=_RULE_NAME), detectors)
    item = f.mapping("", item, keys, keys)
    category = f.string("category", item["category"], pattern=_CATEGORY)
    severity = f.choice("severity", item["severity"], "severity", SEVERITIES)
    when = f.when("when", item["when"])
    if not isinstance(item["actions"], list) or not item["actions"]:
        f.fail("actions", f"expected a non-empty list of actions, got {_show(item['actions'])}")
    actions = tuple(f.choice(f"actions[{j}]", a, "action", ACTIONS) for j, a in enumerate(item["actions"]))
    for j, action in enumerate(actions):
        if action in actions[:j]:
            f.fail(f"actions[{j}]", f"duplicate action {action!r}")
    return Rule(item["name"], category, severity, when, actions)


@dataclass(frozen=True)
class _Fields:
    """Validators whose errors name this file, this rule and the field's path."""

    source: str
    rule: str | None
    detectors: Mapping[str, float | None] | None

    def fail(self, field: str, message: str) -> NoReturn:
        raise PolicyError(self.source, message, rule=self.rule, field=field or None)

    def mapping(self, field: str, value: object, allowed: Sequence[str], required: Sequence[str]) -> dict[str, Any]:
        if not isinstance(value, dict):
            self.fail(field, f"expected a mapping, got {_show(value)}")
        for key in value:
            if key not in allowed:
                self.fail(_join(field, str(key)), f"unknown key {key!r} (allowed: {', '.join(allowed)})")
        for key in required:
            if key not in value:
                self.fail(_join(field, key), "missing required field")
        return value

    def string(self, field: str, value: object, *, pattern: re.Pattern[str] | None = None, empty: bool = False) -> str:
        if not isinstance(value, str) or not (value or empty):
            self.fail(field, f"expected a non-empty string, got {_show(value)}")
        if pattern is not None and not pattern.fullmatch(value):
            self.fail(field, f"{value!r} does not match {pattern.pattern}")
        return value

    def choice(self, field: str, value: object, what: str, options: Sequence[_T]) -> _T:
        for option in options:
            if value == option:
                return option
        self.fail(field, f"unknown {what} {value!r} (use one of: {', '.join(options)})")

    def number(self, field: str, value: object, *, open_zero: bool = False, calibrated: str | None = None) -> Bound:
        """A number in [0, 1] ((0, 1] with `open_zero`), or `calibrated` when it names the detector."""
        if calibrated is not None and value == "calibrated":
            if self.detectors is not None and self.detectors.get(calibrated) is None:
                self.fail(field, f"detector {calibrated!r} has no calibrated threshold; give a number instead")
            return "calibrated"
        wanted = f"a number in {'(0, 1]' if open_zero else '[0, 1]'}" + (" or 'calibrated'" if calibrated else "")
        if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
            self.fail(field, f"expected {wanted}, got {_show(value)}")
        if not 0 <= value <= 1 or (open_zero and value == 0):
            self.fail(field, f"{value!r} is out of range (use {wanted})")
        return float(value)

    def integer(self, field: str, value: object, low: int, high: int | None = None) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
            upper = "" if high is None else f" and <= {high}"
            self.fail(field, f"expected an integer >= {low}{upper}, got {_show(value)}")
        return value

    def when(self, field: str, value: object) -> When:
        if isinstance(value, dict) and ("all" in value or "any" in value):
            key = "all" if "all" in value else "any"
            items = self.mapping(field, value, (key,), (key,))[key]
            if not isinstance(items, list) or not items:
                self.fail(f"{field}.{key}", f"expected a non-empty list of conditions, got {_show(items)}")
            parts = tuple(self.when(f"{field}.{key}[{i}]", c) for i, c in enumerate(items))
            return AllOf(parts) if key == "all" else AnyOf(parts)
        if isinstance(value, dict) and "not" in value:
            return NotOf(self.when(f"{field}.not", self.mapping(field, value, ("not",), ("not",))["not"]))
        return self.condition(field, value)

    def condition(self, field: str, value: object) -> Condition:
        m = self.mapping(field, value, _CONDITION_KEYS, ("detector",))
        at = f"{field}.{{}}".format
        detector = self.string(at("detector"), m["detector"])
        if self.detectors is not None and detector not in self.detectors:
            known = ", ".join(sorted(self.detectors)) or "none"
            self.fail(at("detector"), f"unknown detector {detector!r} (known: {known})")
        category = self.string(at("category"), m["category"], pattern=_CATEGORY) if "category" in m else None
        stat = self.choice(at("stat"), m.get("stat", "last"), "stat", STATS)
        window = self.integer(at("window"), m.get("window", 1 if stat == "last" else 32), 1)
        if stat == "last" and window != 1:
            self.fail(at("window"), "stat 'last' looks at the latest score only; drop window or use another stat")
        for key, only in (("over", "count_over"), ("alpha", "ema")):
            if key in m and stat != only:
                self.fail(at(key), f"{key!r} applies only to stat {only}")
        given = [c for c in COMPARISONS if c in m]
        if len(given) != 1:
            self.fail(field, f"give exactly one of {', '.join(COMPARISONS)} (got {', '.join(given) or 'none'})")
        comparison, over = given[0], None
        if stat == "count_over":
            if "over" not in m:
                self.fail(at("over"), "missing required field (count_over counts the scores >= over)")
            over = self.number(at("over"), m["over"], calibrated=detector)
            bound: Bound = self.integer(at(comparison), m[comparison], 0, window)
        else:
            bound = self.number(at(comparison), m[comparison], calibrated=detector)
        alpha = float(self.number(at("alpha"), m["alpha"], open_zero=True)) if "alpha" in m else None
        return Condition(detector, comparison, bound, stat, window, category, over, alpha)


def _join(field: str, key: str) -> str:
    return f"{field}.{key}" if field else key


def _show(value: object) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 40 else text[:37] + '...'}"


_Key = tuple[str, str | None]  # a score history: (detector, None) for all its detections, or one category's


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
        self._pending: list[tuple[Rule, frozenset[_Key]]] = []  # rules not fired yet, with their histories
        self._started = False
        sizes: dict[_Key, int] = {}
        for rule in policy.rules:
            conditions = list(_conditions(rule.when))
            for c in conditions:
                self._bounds[c] = (
                    _resolve(policy, rule, c, c.value, thresholds or {}),
                    _resolve(policy, rule, c, c.over, thresholds or {}),
                )
                sizes[_key(c)] = max(sizes.get(_key(c), 1), c.window)
            self._pending.append((rule, frozenset(map(_key, conditions))))
        self._history: dict[_Key, deque[float]] = {key: deque(maxlen=size) for key, size in sizes.items()}

    def observe(self, detections: Sequence[Detection], index: int) -> list[Flag]:
        """Record `detections` (found at token `index`); return the flags of rules that fire now.

        Each rule fires at most once per stream. A rule is evaluated at the first call and then
        only when one of its histories got a score, since nothing else can change its outcome.
        """
        touched: set[_Key] = set()
        for det in detections:
            for key in ((det.detector, None), (det.detector, det.category)):
                if (history := self._history.get(key)) is not None:
                    history.append(det.score)
                    touched.add(key)
        first, self._started = not self._started, True
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
            return value is not None and _COMPARE[when.comparison](value, self._bounds[when][0])
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
                return f"{label}: no scores yet"
            shown = f"{value:.0f}" if when.stat == "count_over" else f"{value:.3f}"
            return f"{label}={shown} {_SYMBOLS[when.comparison]} {_show_bound(when.value, bound)}"
        if isinstance(when, NotOf):
            return f"not({self._explain(when.condition)})"
        held = [self._explain(c) for c in when.conditions if self._holds(c)]
        failed = [self._explain(c) for c in when.conditions if not self._holds(c)]
        if isinstance(when, AllOf):
            return "; ".join(held) if not failed else failed[0]
        return "; ".join(held or failed)

    def _value(self, cond: Condition) -> float | None:
        """The condition's statistic over its window; None while its history is empty."""
        history = self._history[_key(cond)]
        if not history:
            return None
        n = len(history)
        scores: Iterable[float] = history if cond.window >= n else islice(history, n - cond.window, None)
        if cond.stat == "last":
            return history[-1]
        if cond.stat == "max":
            return max(scores)
        if cond.stat == "count_over":
            return float(sum(1 for score in scores if score >= self._bounds[cond][1]))
        if cond.stat == "mean":
            window = list(scores)
            return sum(window) / len(window)
        alpha = cond.alpha or 2 / (cond.window + 1)  # ema, from the oldest score in the window
        it = iter(scores)
        value = next(it)
        for score in it:
            value = alpha * score + (1 - alpha) * value
        return value


def _conditions(when: When) -> Iterator[Condition]:
    if isinstance(when, Condition):
        yield when
    elif isinstance(when, NotOf):
        yield from _conditions(when.condition)
    else:
        for c in when.conditions:
            yield from _conditions(c)


def _key(cond: Condition) -> _Key:
    return cond.detector, cond.category


def _resolve(policy: Policy, rule: Rule, cond: Condition, bound: Bound | None, thresholds: Mapping[str, float | None]) -> float:
    if bound != "calibrated":
        return bound or 0.0
    if (threshold := thresholds.get(cond.detector)) is None:
        raise PolicyError(
            policy.source,
            f"detector {cond.detector!r} has no calibrated threshold, which a 'calibrated' bound needs",
            rule=rule.name,
        )
    return threshold


def _show_bound(bound: Bound | None, value: float) -> str:
    return f"calibrated {value:g}" if bound == "calibrated" else f"{value:g}"
