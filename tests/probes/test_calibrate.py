"""Calibration per statistic: the statistics are the policy evaluator's own, thresholds set per
session hit their target on the sessions that set them, and a policy's `calibrated` bound takes
the threshold of the statistic it computes."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from monitor.policy import PolicyError, PolicyEvaluator, parse_policy
from monitor.types import Detection
from probes.calibrate import (
    STATISTICS,
    calibrate_statistic,
    parse_statistic,
    peaks,
    rate_interval,
    statistic_series,
    threshold_at,
)

RULE = {"name": "r", "category": "deception", "severity": "warning", "actions": ["alert"]}


def evaluator_values(scores: list[float], key: str) -> list[float]:
    """The statistic at every token as PolicyEvaluator computes it over full windows (NaN before):
    a rule on it that a second detector `gate` lets fire only at token i explains itself with the value."""
    stat, window = parse_statistic(key)
    when = {"detector": "p", "stat": stat, "gte": 0.0} | ({} if stat == "last" else {"window": window, "min_scores": window})
    gated = {"all": [when, {"detector": "gate", "gte": 0.5}]}
    policy = parse_policy({"name": "t", "rules": [{**RULE, "when": gated}]}, "t")
    values = []
    for i in range(len(scores)):
        evaluator = PolicyEvaluator(policy)
        for j, score in enumerate(scores[: i + 1]):
            flags = evaluator.observe([Detection("p", "c", score, j, j + 1), Detection("gate", "c", float(j == i), j, j + 1)], j)
        values.append(float(flags[0].reason.split("=", 1)[1].split(" ")[0]) if flags else math.nan)  # "p mean@4=0.250 >= 0"
    return values


@settings(max_examples=25, deadline=None)
@given(st.lists(st.floats(0.0, 1.0), min_size=1, max_size=40), st.sampled_from(["last", "mean@4", "mean@16", "ema@4", "max@3"]))
def test_statistic_series_is_what_the_policy_evaluator_computes(scores: list[float], key: str) -> None:
    assert statistic_series(np.array(scores), key) == pytest.approx(evaluator_values(scores, key), abs=1e-3, nan_ok=True)


def test_a_session_threshold_flags_at_most_the_target_share_of_the_sessions_that_set_it() -> None:
    rng = np.random.default_rng(0)
    sessions = [rng.beta(2, 5, size=rng.integers(20, 200)) for _ in range(400)]
    for key in STATISTICS:
        for target in (0.01, 0.05, 0.2):
            threshold = threshold_at(peaks(sessions, key), target)
            flagged = np.mean(peaks(sessions, key) >= threshold)
            assert flagged <= target and flagged >= target - 1 / 400


def test_windowed_means_need_lower_thresholds_than_single_tokens_for_the_same_session_rate() -> None:
    rng = np.random.default_rng(1)
    benign = [rng.beta(2, 5, size=150) for _ in range(300)]
    held = [rng.beta(2, 5, size=150) for _ in range(300)]
    positives = [rng.beta(3, 3, size=30) for _ in range(50)]
    last = calibrate_statistic("last", benign, held, positives, 0.05)
    mean16 = calibrate_statistic("mean@16", benign, held, positives, 0.05)
    assert mean16.threshold < last.threshold
    assert 0.025 <= mean16.heldapart_fpr <= 0.1 and 0.025 <= last.heldapart_fpr <= 0.1
    assert mean16.recall > last.recall and (mean16.calibration_n, mean16.heldapart_n, mean16.recall_n) == (300, 300, 50)


def _policy(when: dict[str, object], thresholds: dict[str, float | None]) -> PolicyEvaluator:
    return PolicyEvaluator(parse_policy({"name": "t", "rules": [RULE | {"when": when}]}, "t.yaml", thresholds), thresholds)


def test_calibrated_takes_the_threshold_of_the_statistic_the_condition_computes() -> None:
    thresholds = {"p": 0.9, "p:mean@16": 0.4, "p:ema@16": 0.5}
    assert _policy({"detector": "p", "gte": "calibrated"}, thresholds).bounds  # parses
    for when, expected in (
        ({"detector": "p", "gte": "calibrated"}, 0.9),
        ({"detector": "p", "stat": "max", "window": 8, "gte": "calibrated"}, 0.9),
        ({"detector": "p", "stat": "mean", "window": 16, "min_scores": 16, "gte": "calibrated"}, 0.4),
        ({"detector": "p", "stat": "ema", "window": 16, "min_scores": 16, "gte": "calibrated"}, 0.5),
    ):
        evaluator = _policy(when, thresholds)
        (condition,) = [c for r in evaluator.policy.rules for c in [r.when]]
        assert evaluator.bounds(condition)[0] == expected  # type: ignore[arg-type]


def test_a_mean_without_its_own_calibration_is_refused_when_the_detector_has_others() -> None:
    with pytest.raises(PolicyError, match=r"no threshold calibrated for mean@8 \(it has: last, mean@16\)"):
        _policy(
            {"detector": "p", "stat": "mean", "window": 8, "min_scores": 8, "gte": "calibrated"}, {"p": 0.9, "p:mean@16": 0.4}
        )
    with pytest.raises(PolicyError, match=r"no threshold calibrated for mean@16/from1 \(it has: last, mean@16\)"):
        _policy({"detector": "p", "stat": "mean", "window": 16, "gte": "calibrated"}, {"p": 0.9, "p:mean@16": 0.4})


def test_a_detector_calibrated_per_token_only_keeps_its_threshold_for_every_statistic() -> None:
    evaluator = _policy({"detector": "p", "stat": "mean", "window": 8, "gte": "calibrated"}, {"p": 0.7})
    (condition,) = [r.when for r in evaluator.policy.rules]
    assert evaluator.bounds(condition)[0] == 0.7  # type: ignore[arg-type]


def test_the_held_apart_rate_comes_with_what_n_can_resolve() -> None:
    # 0 of n: the upper bound solves (1 - p)^n = 2.5%; 1% of 193 sessions cannot be told from 0%.
    low, high = rate_interval(0.0, 193)
    assert low == 0.0 and high == pytest.approx(1 - 0.025 ** (1 / 193), rel=1e-9) and high > 0.01
    low, high = rate_interval(4 / 193, 193)
    assert low < 4 / 193 < high and 0.005 < low < 0.006 and 0.05 < high < 0.055
    assert rate_interval(1.0, 10) == (pytest.approx(0.025 ** (1 / 10)), 1.0)
