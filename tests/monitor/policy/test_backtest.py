"""The policy-only replay's fast path gives exactly the flags of the live evaluator, call by call."""

from __future__ import annotations

import dataclasses
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from monitor.policy import PolicyEvaluator, backtest, parse_policy
from monitor.store.packed import pack_detections, unpack_detections
from monitor.types import Detection, Flag

DETECTORS = ("a", "b", "missing")
CATEGORIES = ("x", "y")
# Scores repeat the bounds so that equality at a threshold, and float rounding of means, get exercised.
EDGES = (0.0, 0.1, 0.25, 0.3, 0.5, 0.7, 0.75, 0.9, 1.0)
scores = st.one_of(st.sampled_from(EDGES), st.floats(0.0, 1.0, allow_nan=False))


@st.composite
def conditions(draw: st.DrawFn) -> dict[str, Any]:
    stat = draw(st.sampled_from(("last", "max", "mean", "ema", "count_over")))
    window = 1 if stat == "last" else draw(st.integers(1, 6))
    cond: dict[str, Any] = {"detector": draw(st.sampled_from(DETECTORS)), "stat": stat}
    if stat != "last":
        cond["window"] = window
    if draw(st.booleans()):
        cond["category"] = draw(st.sampled_from(CATEGORIES))
    comparison = draw(st.sampled_from(("gte", "gt", "lte", "lt")))
    if stat == "count_over":
        cond["over"] = draw(st.sampled_from(EDGES))
        cond[comparison] = draw(st.integers(0, window))
    else:
        cond[comparison] = draw(st.sampled_from(EDGES))
    if stat == "ema" and draw(st.booleans()):
        cond["alpha"] = draw(st.sampled_from((0.3, 0.5, 1.0)))
    if draw(st.booleans()):
        cond["min_scores"] = draw(st.integers(1, window))
    return cond


def whens(depth: int = 2) -> st.SearchStrategy[dict[str, Any]]:
    if depth == 0:
        return conditions()
    inner = whens(depth - 1)
    return st.one_of(
        conditions(),
        st.builds(lambda c: {"not": c}, inner),
        st.builds(lambda cs: {"all": cs}, st.lists(inner, min_size=1, max_size=3)),
        st.builds(lambda cs: {"any": cs}, st.lists(inner, min_size=1, max_size=3)),
    )


@st.composite
def policies(draw: st.DrawFn) -> dict[str, Any]:
    rules = []
    for i in range(draw(st.integers(1, 4))):
        actions = ["alert", "halt"] if draw(st.integers(0, 4)) == 0 else ["alert"]
        rules.append({"name": f"r{i}", "category": "c", "severity": "warning", "when": draw(whens()), "actions": actions})
    return {"name": "random", "rules": rules}


@st.composite
def streams(draw: st.DrawFn) -> list[tuple[int, list[Detection]]]:
    """Evaluation calls: (token index, detections of the call); late batches repeat an index."""
    calls, index = [], 0
    for _ in range(draw(st.integers(1, 40))):
        batch = [
            Detection(draw(st.sampled_from(DETECTORS[:2])), draw(st.sampled_from(CATEGORIES)), draw(scores), index, index + 1)
            for _ in range(draw(st.integers(0, 3)))
        ]
        calls.append((index, batch))
        index += draw(st.sampled_from((0, 1, 1, 1)))
    return calls


def live_flags(policy: Any, calls: list[tuple[int, list[Detection]]]) -> list[Flag]:
    evaluator = PolicyEvaluator(policy)
    flags: list[Flag] = []
    for index, batch in calls:
        fired = evaluator.observe(batch, index)
        flags.extend(fired)
        if any("halt" in f.actions for f in fired):
            break
    return flags


@settings(max_examples=400, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(policy_data=policies(), calls=streams())
def test_backtest_equals_the_live_evaluator(policy_data: dict[str, Any], calls: list[tuple[int, list[Detection]]]) -> None:
    policy = parse_policy(policy_data, "random.yaml")
    detections = [d for _, batch in calls for d in batch]
    evaluations, seen = [], 0
    for index, batch in calls:
        seen += len(batch)
        evaluations.append((index, seen))
    columns = unpack_detections(pack_detections(detections, evaluations))
    expected = [dataclasses.astuple(f) for f in live_flags(policy, calls)]
    assert [dataclasses.astuple(f) for f in backtest(policy, columns)] == expected


def test_a_mean_that_rounds_above_its_bound_fires_as_it_does_live() -> None:
    # 0.1 + 0.1 + 0.1 = 0.30000000000000004: the live mean of three 0.1s is a hair over 0.1.
    policy = parse_policy(
        {
            "name": "p",
            "rules": [
                {
                    "name": "m",
                    "category": "c",
                    "severity": "info",
                    "when": {"detector": "a", "stat": "mean", "window": 3, "gt": 0.1},
                    "actions": ["alert"],
                }
            ],
        },
        "p.yaml",
    )
    calls = [(i, [Detection("a", "x", 0.1, i, i + 1)]) for i in range(3)]
    columns = unpack_detections(pack_detections([d for _, b in calls for d in b], [(i, i + 1) for i in range(3)]))
    assert [f.index for f in live_flags(policy, calls)] == [f.index for f in backtest(policy, columns)] == [2]
