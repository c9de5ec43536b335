"""Loading and validating policy YAML: every error names the file, the rule and the field."""

from __future__ import annotations

import math
import re
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import yaml

from monitor.policy.model import (
    COMPARISONS,
    STATS,
    AllOf,
    AnyOf,
    Bound,
    Condition,
    NotOf,
    Policy,
    PolicyError,
    Rule,
    When,
    calibrated_bound,
    detector_names,
)
from monitor.types import ACTIONS, SEVERITIES, STAT_SEPARATOR

_RULE_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]*")
_CATEGORY = re.compile(r"[a-z0-9_]+")
_CONDITION_KEYS = ("detector", "category", "stat", "window", *COMPARISONS, "over", "alpha", "min_scores")
_T = TypeVar("_T", bound=str)


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
        if self.detectors is not None and (detector not in self.detectors or STAT_SEPARATOR in detector):
            known = ", ".join(detector_names(self.detectors)) or "none"
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
        min_scores = self.integer(at("min_scores"), m.get("min_scores", 1), 1, window)
        condition = Condition(detector, comparison, bound, stat, window, category, over, alpha, min_scores)
        if self.detectors is not None and bound == "calibrated":
            try:
                calibrated_bound(condition, self.detectors)
            except LookupError as exc:
                self.fail(at(comparison), str(exc.args[0]))
        return condition


def _join(field: str, key: str) -> str:
    return f"{field}.{key}" if field else key


def _show(value: object) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 40 else text[:37] + '...'}"
