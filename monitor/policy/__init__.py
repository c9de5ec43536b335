"""Policies: YAML rules that turn detections into flags (the schema is described in policies/README.md).

A policy is data, never code: each rule is a tree of `all` / `any` / `not` over conditions, and a
condition compares one statistic of a detector's latest scores with a bound. `load_policy`
validates a file and names the file, the rule and the field in every error; `PolicyEvaluator`
keeps one stream's score histories and says which rules fire at each token.
"""

from monitor.policy.backtest import ScoreColumns, backtest
from monitor.policy.evaluate import PolicyEvaluator
from monitor.policy.model import (
    COMPARISONS,
    STATS,
    AllOf,
    AnyOf,
    Bound,
    Comparison,
    Condition,
    NotOf,
    Policy,
    PolicyError,
    Rule,
    Stat,
    When,
    calibrated_bound,
    stat_key,
    statistic_thresholds,
)
from monitor.policy.parse import MAX_POLICY_BYTES, MAX_POLICY_EXPANDED, load_policy, parse_policy, read_policy_yaml

__all__ = [
    "COMPARISONS",
    "MAX_POLICY_BYTES",
    "MAX_POLICY_EXPANDED",
    "STATS",
    "AllOf",
    "AnyOf",
    "Bound",
    "Comparison",
    "Condition",
    "NotOf",
    "Policy",
    "PolicyError",
    "PolicyEvaluator",
    "Rule",
    "ScoreColumns",
    "Stat",
    "When",
    "backtest",
    "calibrated_bound",
    "load_policy",
    "parse_policy",
    "read_policy_yaml",
    "stat_key",
    "statistic_thresholds",
]
