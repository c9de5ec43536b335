"""Policy loading, validation errors and evaluation (monitor/policy.py)."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path
from typing import Any

import pytest

from monitor.policy import MAX_POLICY_BYTES, Policy, PolicyError, PolicyEvaluator, load_policy, parse_policy, read_policy_yaml
from monitor.types import Detection, Flag

REPO = Path(__file__).resolve().parents[3]
DETECTORS: dict[str, float | None] = {"deception_probe": 0.7, "harmful_probe": 0.6, "cot_judge": None}


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "bad.yaml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def one_rule(when: str, actions: str = "[alert]") -> str:
    return f"""\
        name: test
        rules:
          - name: deception-critical
            category: deception
            severity: critical
            when: {when}
            actions: {actions}
        """


def policy_of(*whens: dict[str, Any]) -> Policy:
    rules = [
        {"name": f"r{i}", "category": "deception", "severity": "warning", "when": when, "actions": ["alert"]}
        for i, when in enumerate(whens)
    ]
    return parse_policy({"name": "test", "rules": rules}, "test", DETECTORS)


def det(score: float, detector: str = "deception_probe", category: str = "deception") -> Detection:
    return Detection(detector=detector, category=category, score=score, start=0, end=1)


def fires(when: dict[str, Any], scores: list[float]) -> bool:
    """Whether `when` holds after `scores`, evaluated once, after the last of them."""
    evaluator = PolicyEvaluator(policy_of(when), DETECTORS)
    return bool(evaluator.observe([det(s) for s in scores], len(scores) - 1))


def assert_stat(when: dict[str, Any], scores: list[float], expected: float) -> None:
    """The statistic equals `expected`: `gte` just under it holds, `gte` just over it does not."""
    assert fires({**when, "gte": expected - 1e-9}, scores)
    assert not fires({**when, "gte": expected + 1e-9}, scores)


# Errors name the file, the rule and the field.


def test_unknown_detector_error_names_file_rule_and_field(tmp_path: Path) -> None:
    path = write(tmp_path, one_rule("{all: [{detector: deception_probe, gte: 0.5}, {detector: lie_probe, gte: 0.5}]}"))
    with pytest.raises(PolicyError) as err:
        load_policy(path, DETECTORS)
    assert str(err.value) == (
        f"{path}: rule 'deception-critical': field 'when.all[1].detector': "
        "unknown detector 'lie_probe' (known: cot_judge, deception_probe, harmful_probe)"
    )


def test_unknown_stat_error_names_file_rule_and_field(tmp_path: Path) -> None:
    path = write(tmp_path, one_rule("{all: [{detector: deception_probe, stat: median, window: 32, gte: 0.9}]}"))
    with pytest.raises(PolicyError) as err:
        load_policy(path, DETECTORS)
    assert str(err.value) == (
        f"{path}: rule 'deception-critical': field 'when.all[0].stat': "
        "unknown stat 'median' (use one of: last, max, mean, ema, count_over)"
    )


def test_threshold_out_of_range_error_names_file_rule_and_field(tmp_path: Path) -> None:
    path = write(tmp_path, one_rule("{not: {detector: deception_probe, stat: max, gte: 1.5}}"))
    with pytest.raises(PolicyError) as err:
        load_policy(path, DETECTORS)
    assert str(err.value) == (
        f"{path}: rule 'deception-critical': field 'when.not.gte': 1.5 is out of range (use a number in [0, 1] or 'calibrated')"
    )


def test_count_over_bound_above_window_is_out_of_range(tmp_path: Path) -> None:
    path = write(tmp_path, one_rule("{detector: deception_probe, stat: count_over, over: 0.5, window: 8, gte: 9}"))
    with pytest.raises(PolicyError, match=r"field 'when.gte': expected an integer >= 0 and <= 8, got int 9"):
        load_policy(path, DETECTORS)


def test_unknown_action_error_names_file_rule_and_field(tmp_path: Path) -> None:
    path = write(tmp_path, one_rule("{detector: deception_probe, gte: 0.5}", actions="[alert, page]"))
    with pytest.raises(PolicyError) as err:
        load_policy(path, DETECTORS)
    assert str(err.value) == (
        f"{path}: rule 'deception-critical': field 'actions[1]': unknown action 'page' (use one of: alert, store, halt, hold)"
    )


def test_malformed_yaml_error_names_file_line_and_column(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        name: test
        rules:
          - name: deception-critical
            when: {detector: deception_probe
            actions: [alert]
        """,
    )
    with pytest.raises(PolicyError, match=rf"^{re.escape(str(path))}: line 5, column 12: invalid YAML: "):
        load_policy(path)


def test_duplicate_yaml_key_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, one_rule("{detector: deception_probe, gte: 0.5, gte: 0.9}"))
    with pytest.raises(PolicyError) as err:
        load_policy(path)
    assert str(err.value) == f"{path}: line 6, column 49: invalid YAML: duplicate key 'gte'"


def test_missing_field_error_names_the_field(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        name: test
        rules:
          - name: deception-critical
            category: deception
            when: {detector: deception_probe, gte: 0.5}
            actions: [alert]
        """,
    )
    with pytest.raises(PolicyError) as err:
        load_policy(path)
    assert str(err.value) == f"{path}: rule 'deception-critical': field 'severity': missing required field"


def test_rule_without_name_is_located_by_index(tmp_path: Path) -> None:
    path = write(tmp_path, "name: test\nrules:\n  - {category: deception}\n")
    with pytest.raises(PolicyError) as err:
        load_policy(path)
    assert str(err.value) == f"{path}: field 'rules[0].name': missing required field"


def test_unknown_key_error_names_the_key(tmp_path: Path) -> None:
    path = write(tmp_path, one_rule("{detector: deception_probe, gte: 0.5, windw: 4}"))
    with pytest.raises(PolicyError) as err:
        load_policy(path)
    assert str(err.value).startswith(f"{path}: rule 'deception-critical': field 'when.windw': unknown key 'windw' (")


def test_duplicate_rule_names_are_an_error(tmp_path: Path) -> None:
    rule = "{name: twice, category: d, severity: info, when: {detector: deception_probe, gte: 0.5}, actions: [store]}"
    path = write(tmp_path, f"name: test\nrules:\n  - {rule}\n  - {rule}\n")
    with pytest.raises(PolicyError) as err:
        load_policy(path)
    assert str(err.value) == f"{path}: rule 'twice': field 'name': duplicate rule name (first at rules[0])"


def test_wrong_type_error_names_the_field_and_the_type(tmp_path: Path) -> None:
    path = write(tmp_path, one_rule("{detector: deception_probe, stat: max, window: eight, gte: 0.5}"))
    with pytest.raises(PolicyError) as err:
        load_policy(path)
    assert str(err.value) == (
        f"{path}: rule 'deception-critical': field 'when.window': expected an integer >= 1, got str 'eight'"
    )


def test_empty_rules_list_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, "name: test\nrules: []\n")
    with pytest.raises(PolicyError) as err:
        load_policy(path)
    assert str(err.value) == f"{path}: field 'rules': expected a non-empty list of rules, got list []"


def test_two_comparisons_in_one_condition_are_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, one_rule("{detector: deception_probe, gte: 0.5, lt: 0.9}"))
    with pytest.raises(PolicyError, match=r"field 'when': give exactly one of gte, gt, lte, lt \(got gte, lt\)"):
        load_policy(path)


def test_detector_names_are_not_checked_without_detectors(tmp_path: Path) -> None:
    path = write(tmp_path, one_rule("{detector: anything, gte: calibrated}"))
    assert load_policy(path).rules[0].name == "deception-critical"


# Each statistic, compared with a hand computation.


def test_last_is_the_latest_score() -> None:
    assert_stat({"detector": "deception_probe"}, [0.9, 0.3], 0.3)


def test_max_looks_only_at_the_window() -> None:
    assert_stat({"detector": "deception_probe", "stat": "max", "window": 2}, [0.9, 0.3, 0.5], 0.5)


def test_mean_looks_only_at_the_window() -> None:
    assert_stat({"detector": "deception_probe", "stat": "mean", "window": 3}, [0.9, 0.1, 0.2, 0.6], 0.3)


def test_ema_runs_oldest_first_with_default_alpha() -> None:
    # window 3 -> alpha 2/4 = 0.5 over [0.2, 0.4, 0.8]: 0.2 -> 0.3 -> 0.55
    assert_stat({"detector": "deception_probe", "stat": "ema", "window": 3}, [0.9, 0.2, 0.4, 0.8], 0.55)


def test_ema_uses_the_given_alpha() -> None:
    # alpha 0.25 over [0.2, 0.4, 0.8]: 0.2 -> 0.25 -> 0.3875
    assert_stat({"detector": "deception_probe", "stat": "ema", "window": 3, "alpha": 0.25}, [0.2, 0.4, 0.8], 0.3875)


def test_count_over_counts_window_scores_at_or_above_over() -> None:
    when = {"detector": "deception_probe", "stat": "count_over", "over": 0.5, "window": 4}
    scores = [0.9, 0.5, 0.2, 0.7, 0.4]  # window [0.5, 0.2, 0.7, 0.4]: two scores >= 0.5
    assert fires({**when, "gte": 2}, scores)
    assert not fires({**when, "gte": 3}, scores)


def test_a_young_stream_uses_the_scores_it_has() -> None:
    assert_stat({"detector": "deception_probe", "stat": "mean", "window": 16}, [0.2, 0.4], 0.3)


def test_category_keeps_only_that_category() -> None:
    evaluator = PolicyEvaluator(policy_of({"detector": "cot_judge", "category": "deception", "gte": 0.7}))
    assert evaluator.observe([det(0.9, "cot_judge", "harmful_planning")], 0) == []
    assert evaluator.observe([det(0.8, "cot_judge", "deception")], 1)[0].rule == "r0"


def test_default_window_is_32_for_statistics_other_than_last() -> None:
    policy = policy_of({"detector": "deception_probe", "stat": "max", "gte": 0.5})
    assert policy.rules[0].to_dict()["when"]["window"] == 32


# Composition.


def test_all_holds_only_when_every_condition_holds() -> None:
    evaluator = PolicyEvaluator(
        policy_of({"all": [{"detector": "deception_probe", "gte": 0.5}, {"detector": "harmful_probe", "gte": 0.5}]})
    )
    assert evaluator.observe([det(0.9)], 0) == []
    assert len(evaluator.observe([det(0.9, "harmful_probe", "harmful_planning")], 1)) == 1


def test_any_holds_when_one_condition_holds() -> None:
    evaluator = PolicyEvaluator(
        policy_of({"any": [{"detector": "deception_probe", "gte": 0.5}, {"detector": "harmful_probe", "gte": 0.5}]})
    )
    assert evaluator.observe([det(0.1)], 0) == []
    assert len(evaluator.observe([det(0.9, "harmful_probe", "harmful_planning")], 1)) == 1


def test_not_inverts_its_condition() -> None:
    when = {"all": [{"detector": "harmful_probe", "gte": 0.5}, {"not": {"detector": "deception_probe", "gte": 0.5}}]}
    evaluator = PolicyEvaluator(policy_of(when))
    assert evaluator.observe([det(0.9), det(0.9, "harmful_probe", "harmful_planning")], 0) == []
    assert len(evaluator.observe([det(0.1), det(0.9, "harmful_probe", "harmful_planning")], 1)) == 1


def test_not_of_a_detector_without_scores_is_true() -> None:
    evaluator = PolicyEvaluator(policy_of({"not": {"detector": "cot_judge", "gte": 0.5}}))
    [flag] = evaluator.observe([], 0)
    assert flag.reason == "not(cot_judge last: no scores yet)"


# `calibrated`.


def test_calibrated_resolves_to_the_detector_threshold() -> None:
    when = {"detector": "deception_probe", "gte": "calibrated"}
    assert fires(when, [0.7])  # threshold 0.7
    assert not fires(when, [0.69])


def test_calibrated_over_resolves_to_the_detector_threshold() -> None:
    when = {"detector": "harmful_probe", "stat": "count_over", "over": "calibrated", "window": 4, "gte": 2}
    evaluator = PolicyEvaluator(policy_of(when), DETECTORS)  # harmful_probe threshold 0.6
    scores = [det(s, "harmful_probe", "harmful_planning") for s in (0.59, 0.6, 0.5, 0.9)]
    assert evaluator.observe(scores, 3)[0].reason == "harmful_probe count_over(calibrated 0.6)@4=2 >= 2"


def test_calibrated_on_a_detector_without_threshold_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, one_rule("{detector: cot_judge, category: deception, gte: calibrated}"))
    with pytest.raises(PolicyError) as err:
        load_policy(path, DETECTORS)
    assert str(err.value) == (
        f"{path}: rule 'deception-critical': field 'when.gte': "
        "detector 'cot_judge' has no calibrated threshold; give a number instead"
    )


def test_evaluator_without_the_threshold_is_an_error() -> None:
    policy = policy_of({"detector": "deception_probe", "gte": "calibrated"})
    with pytest.raises(PolicyError, match=r"^test: rule 'r0': detector 'deception_probe' has no calibrated threshold"):
        PolicyEvaluator(policy, {"deception_probe": None})


# Firing.


def test_a_rule_fires_once_per_stream() -> None:
    evaluator = PolicyEvaluator(policy_of({"detector": "deception_probe", "gte": 0.5}))
    assert len(evaluator.observe([det(0.9)], 0)) == 1
    assert evaluator.observe([det(0.95)], 1) == []


def test_flag_carries_the_rule_and_the_token_index() -> None:
    policy = parse_policy(
        {
            "name": "t",
            "rules": [
                {
                    "name": "deception-probe-critical",
                    "category": "deception",
                    "severity": "critical",
                    "when": {"detector": "deception_probe", "stat": "max", "window": 32, "gte": 0.9},
                    "actions": ["alert", "store", "halt"],
                }
            ],
        },
        "t",
    )
    evaluator = PolicyEvaluator(policy)
    assert evaluator.observe([det(0.5)], 6) == []
    assert evaluator.observe([det(0.973)], 7) == [
        Flag(
            rule="deception-probe-critical",
            category="deception",
            severity="critical",
            actions=("alert", "store", "halt"),
            index=7,
            reason="deception_probe max@32=0.973 >= 0.9",
        )
    ]


def test_flag_reason_lists_the_conditions_that_held() -> None:
    when = {
        "any": [
            {
                "all": [
                    {"detector": "deception_probe", "stat": "max", "window": 32, "gte": 0.9},
                    {"detector": "cot_judge", "category": "deception", "gte": 0.7},
                ]
            },
            {"detector": "harmful_probe", "stat": "mean", "window": 4, "gte": "calibrated"},
        ]
    }
    evaluator = PolicyEvaluator(policy_of(when), DETECTORS)
    [flag] = evaluator.observe([det(0.973), det(0.8, "cot_judge"), det(0.1, "harmful_probe", "harmful_planning")], 3)
    assert flag.reason == "deception_probe max@32=0.973 >= 0.9; cot_judge[deception] last=0.800 >= 0.7"


# Bundled policies and round trips.


@pytest.mark.parametrize("name", ["default", "strict"])
def test_bundled_policy_loads(name: str) -> None:
    policy = load_policy(REPO / "policies" / f"{name}.yaml", {"deception_probe": 0.7, "harmful_probe": 0.6})
    assert policy.name == name
    assert {rule.severity for rule in policy.rules} == {"warning", "critical"}


def test_default_policy_warns_on_a_full_window_mean_and_halts_on_its_mean_over_32() -> None:
    thresholds = {"deception_probe": 0.99, "deception_probe:mean@8": 0.6, "deception_probe:mean@32": 0.7}
    thresholds |= {"harmful_probe": 0.99, "harmful_probe:mean@16": 0.6, "harmful_probe:mean@32": 0.7}
    evaluator = PolicyEvaluator(load_policy(REPO / "policies" / "default.yaml", thresholds), thresholds)
    # full windows only: the first 7 tokens cannot warn however high they score
    flags = [flag for i in range(8) for flag in evaluator.observe([det(0.99 if i < 4 else 0.3)], i)]
    assert [(f.rule, f.index) for f in flags] == [("deception-probe-warning", 7)]  # mean@8 = 0.645
    flags = [flag for i in range(8, 40) for flag in evaluator.observe([det(0.8)], i)]
    assert [(f.rule, f.index, f.actions[-1]) for f in flags] == [("deception-probe-critical", 31, "halt")]  # mean@32 = 0.761


@pytest.mark.parametrize("name", ["default", "strict"])
def test_to_dict_round_trips_through_parse_policy(name: str) -> None:
    policy = load_policy(REPO / "policies" / f"{name}.yaml")
    assert parse_policy(policy.to_dict(), policy.source) == policy


def test_to_dict_round_trips_every_kind_of_condition() -> None:
    policy = policy_of(
        {
            "not": {
                "any": [
                    {"detector": "cot_judge", "category": "deception", "lt": 0.2},
                    {"detector": "deception_probe", "stat": "ema", "window": 8, "alpha": 0.3, "gt": 0.5},
                ]
            }
        },
        {"detector": "harmful_probe", "stat": "count_over", "over": "calibrated", "window": 8, "lte": 3},
    )
    assert parse_policy(policy.to_dict(), "test", DETECTORS) == policy


def billion_laughs(depth: int = 9) -> str:
    """~400 bytes of YAML whose aliases expand to 9**depth strings."""
    lines = ['l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, depth)]
    return "\n".join(lines) + "\nname: bomb\nrules: []\n"


def test_a_yaml_alias_bomb_is_refused_at_once_without_expanding_it() -> None:
    import time
    import tracemalloc

    text = billion_laughs()
    assert len(text) < 1000
    tracemalloc.start()
    started = time.perf_counter()
    with pytest.raises(PolicyError, match="expands") as err:
        read_policy_yaml(text, "<request policy>")
    seconds = time.perf_counter() - started
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert seconds < 0.1 and peak < 5_000_000, (seconds, peak)
    assert str(err.value).startswith("<request policy>") and len(str(err.value)) < 300


def test_recursive_and_oversized_yaml_are_refused_naming_the_source() -> None:
    with pytest.raises(PolicyError, match="expands"):
        read_policy_yaml("a: &a [1, *a]\n", "p.yaml")
    with pytest.raises(PolicyError, match=f"limit is {MAX_POLICY_BYTES}"):
        read_policy_yaml("name: x\n" + "#" * MAX_POLICY_BYTES, "p.yaml")


def test_anchors_a_person_would_write_still_load(tmp_path: Path) -> None:
    path = tmp_path / "anchored.yaml"
    path.write_text(
        textwrap.dedent(
            """
            name: anchored
            rules:
              - &warn {name: a, category: deception, severity: warning, actions: [alert],
                       when: {detector: p, gte: 0.9}}
              - {<<: *warn, name: b, when: {detector: p, stat: mean, window: 4, gte: 0.8}}
            """
        )
    )
    assert [r.name for r in load_policy(path).rules] == ["a", "b"]


def test_an_error_quotes_a_huge_value_briefly() -> None:
    with pytest.raises(PolicyError) as err:
        parse_policy({"name": "x", "rules": [{"name": "r" * 100_000}]}, "p.yaml")
    assert len(str(err.value)) < 400
