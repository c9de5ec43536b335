"""Loading and validating policy YAML: every error names the file, the rule and the field."""

from __future__ import annotations

import math
import re
import reprlib
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
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`: merged by SafeConstructor, may be overridden
                continue
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, Hashable):
                if key in seen:
                    raise yaml.constructor.ConstructorError(None, None, f"duplicate key {_brief(key)}", key_node.start_mark)
                seen.add(key)
        return super().construct_mapping(node, deep)


MAX_POLICY_BYTES = 256 * 1024
"""Policy YAML larger than this is refused before it is parsed (the bundled ones are ~2 KiB)."""
MAX_POLICY_EXPANDED = 1_000_000
"""Nodes plus scalar characters a policy may hold once its aliases are expanded: a few hundred
bytes of nested aliases ("billion laughs") would otherwise expand to gigabytes."""


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
    return parse_policy(read_policy_yaml(text, source), source, detectors)


def read_policy_yaml(text: str, source: str) -> object:
    """YAML text -> data, within limits a hostile document cannot pass (MAX_POLICY_BYTES, and
    MAX_POLICY_EXPANDED measured on the composed node graph before anything is built); duplicate
    keys are errors. PolicyError naming `source` and, where known, the line."""
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_POLICY_BYTES:
        raise PolicyError(source, f"policy YAML is {size} bytes; the limit is {MAX_POLICY_BYTES}")
    loader = _StrictLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_size(node, MAX_POLICY_EXPANDED) > MAX_POLICY_EXPANDED:
            raise PolicyError(
                source, f"policy YAML expands (through its aliases) beyond {MAX_POLICY_EXPANDED} nodes and characters"
            )
        return loader.construct_document(node)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise PolicyError(source, f"{where}invalid YAML: {exc.problem or exc.context}") from None
    except yaml.YAMLError as exc:
        raise PolicyError(source, f"invalid YAML: {exc}") from None
    finally:
        loader.dispose()


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return []


def _expanded_size(root: yaml.Node, limit: int) -> int:
    """Nodes plus scalar characters of the document as built, each alias counted as a copy of what
    it names; computed on the node graph (each node once), stopping as soon as it passes `limit`.
    A recursive alias (a node inside itself) counts as unbounded."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, finished = stack.pop()
        key = id(node)
        if finished:
            open_nodes.discard(key)
            own = len(node.value) if isinstance(node, yaml.ScalarNode) else 0
            sizes[key] = 1 + own + sum(sizes[id(child)] for child in _children(node))
            if sizes[key] > limit:
                return sizes[key]
        elif key not in sizes:
            if key in open_nodes:
                return limit + 1
            open_nodes.add(key)
            stack.append((node, True))
            stack.extend((child, False) for child in _children(node) if id(child) not in sizes)
    return sizes[id(root)]


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
            f.fail(f"actions[{j}]", f"duplicate action {_brief(action)}")
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
                self.fail(_join(field, str(key)), f"unknown key {_brief(key)} (allowed: {', '.join(allowed)})")
        for key in required:
            if key not in value:
                self.fail(_join(field, key), "missing required field")
        return value

    def string(self, field: str, value: object, *, pattern: re.Pattern[str] | None = None, empty: bool = False) -> str:
        if not isinstance(value, str) or not (value or empty):
            self.fail(field, f"expected a non-empty string, got {_show(value)}")
        if pattern is not None and not pattern.fullmatch(value):
            self.fail(field, f"{_brief(value)} does not match {pattern.pattern}")
        return value

    def choice(self, field: str, value: object, what: str, options: Sequence[_T]) -> _T:
        for option in options:
            if value == option:
                return option
        self.fail(field, f"unknown {what} {_brief(value)} (use one of: {', '.join(options)})")

    def number(self, field: str, value: object, *, open_zero: bool = False, calibrated: str | None = None) -> Bound:
        """A number in [0, 1] ((0, 1] with `open_zero`), or `calibrated` when it names the detector."""
        if calibrated is not None and value == "calibrated":
            if self.detectors is not None and self.detectors.get(calibrated) is None:
                self.fail(field, f"detector {_brief(calibrated)} has no calibrated threshold; give a number instead")
            return "calibrated"
        wanted = f"a number in {'(0, 1]' if open_zero else '[0, 1]'}" + (" or 'calibrated'" if calibrated else "")
        if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
            self.fail(field, f"expected {wanted}, got {_show(value)}")
        if not 0 <= value <= 1 or (open_zero and value == 0):
            self.fail(field, f"{_brief(value)} is out of range (use {wanted})")
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
            self.fail(at("detector"), f"unknown detector {_brief(detector)} (known: {known})")
        category = self.string(at("category"), m["category"], pattern=_CATEGORY) if "category" in m else None
        stat = self.choice(at("stat"), m.get("stat", "last"), "stat", STATS)
        window = self.integer(at("window"), m.get("window", 1 if stat == "last" else 32), 1)
        if stat == "last" and window != 1:
            self.fail(at("window"), "stat 'last' looks at the latest score only; drop window or use another stat")
        for key, only in (("over", "count_over"), ("alpha", "ema")):
            if key in m and stat != only:
                self.fail(at(key), f"{_brief(key)} applies only to stat {only}")
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


_BRIEF = reprlib.Repr()
_BRIEF.maxstring, _BRIEF.maxother, _BRIEF.maxlevel, _BRIEF.maxlist, _BRIEF.maxdict = 60, 60, 3, 4, 4


def _brief(value: object) -> str:
    """repr of a value from a policy, bounded whatever its size (errors quote what they refuse)."""
    return _BRIEF.repr(value)


def _show(value: object) -> str:
    text = _brief(value)
    return f"{type(value).__name__} {text if len(text) <= 40 else text[:37] + '...'}"
