"""`cotmon transcripts` and `cotmon replay` against a real store filled by real sessions."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner
from prometheus_client import CollectorRegistry

from conftest import ProbeFactory
from monitor.cli import main
from monitor.engine.hf import HFEngine
from monitor.observability import Metrics
from monitor.pipeline import Pipeline
from monitor.policy import parse_policy
from monitor.store import TranscriptStore, transcript_from_dict
from monitor.types import ChatMessage, Detection, DetectorSpec, Evidence, GenerationRequest

RULE = {
    "name": "early",
    "category": "deception",
    "severity": "warning",
    "when": {"detector": "p", "stat": "count_over", "over": 0.0, "window": 20, "gte": 20},
    "actions": ["alert", "store"],
}


@pytest.fixture
def filled(tmp_path: Path, engine: HFEngine, make_probe: ProbeFactory) -> tuple[str, list[str]]:
    """A SQLite store with a flagged (30 tokens) and an unflagged (10 tokens) generated session."""
    url = f"sqlite:///{tmp_path / 'store.db'}"
    spec = DetectorSpec("linear_probe", "p", {"artifact": str(make_probe())})
    policy = parse_policy({"name": "cli", "rules": [RULE]}, "cli.yaml")
    ids = []
    with TranscriptStore(url, keep="all") as store:
        pipeline = Pipeline(engine, [spec], policy, metrics=Metrics(CollectorRegistry()), sinks=[store])
        for n in (30, 10):
            request = GenerationRequest(
                (ChatMessage("user", f"count to {n}"),), max_tokens=n, temperature=0.7, seed=n, ignore_eos=True
            )
            ids.append(asyncio.run(pipeline.generate(request).run()).session_id)
    return url, ids


def _run(*args: str) -> Any:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return result


def test_list_filters_and_prints_json(filled: tuple[str, list[str]]) -> None:
    url, (flagged, calm) = filled
    everything = json.loads(_run("transcripts", "list", "--store", url, "--json").output)
    assert everything["total"] == 2 and {s["session_id"] for s in everything["data"]} == {flagged, calm}
    only = json.loads(_run("transcripts", "list", "--store", url, "--flagged", "--json").output)
    assert [s["session_id"] for s in only["data"]] == [flagged] and only["data"][0]["flags"][0]["rule"] == "early"
    table = _run("transcripts", "list", "--store", url, "--rule", "early")
    assert table.exit_code == 0 and flagged in table.output and calm not in table.output
    bad = _run("transcripts", "list", "--store", url, "--since", "yesterday")
    assert bad.exit_code == 2 and "--since" in bad.output


def test_show_prints_the_session(filled: tuple[str, list[str]]) -> None:
    url, (flagged, _) = filled
    shown = _run("transcripts", "show", flagged, "--store", url)
    assert shown.exit_code == 0 and "early (warning, deception) at token 19" in shown.output
    as_json = json.loads(_run("transcripts", "show", flagged, "--store", url, "--json").output)
    assert as_json["session_id"] == flagged and len(as_json["steps"]) == 30
    missing = _run("transcripts", "show", "nope", "--store", url)
    assert missing.exit_code == 1 and "'nope' is not in the store" in missing.output


def test_show_prints_the_judges_evidence_told_apart_by_its_kind(filled: tuple[str, list[str]]) -> None:
    url, (flagged, _) = filled
    judged = Detection("cot_judge", "deception", 0.9, 0, 5, (Evidence("deception", "Plans to lie.", ("count",), "judge"),))
    namesake = Detection("p", "deception", 0.8, 0, 1, (Evidence("judge: a probe's own label", "Not the judge."),))
    with TranscriptStore(url, keep="all") as store:
        stored = store.get(flagged)
        assert stored is not None
        store.save(dataclasses.replace(stored, session_id="judged", detections=(*stored.detections, judged, namesake)))
    shown = _run("transcripts", "show", "judged", "--store", url).output
    assert "Plans to lie." in shown and "> count" in shown and "Not the judge." not in shown


def test_export_writes_jsonl_that_reads_back_as_the_stored_sessions(filled: tuple[str, list[str]], tmp_path: Path) -> None:
    url, ids = filled
    out = tmp_path / "export.jsonl"
    assert _run("transcripts", "export", "--store", url, "--out", str(out)).exit_code == 0
    exported = [transcript_from_dict(json.loads(line)) for line in out.read_text().splitlines()]
    with TranscriptStore(url) as store:
        assert sorted(exported, key=lambda t: t.session_id) == sorted((store.get(i) for i in ids), key=lambda t: t.session_id)


def test_replay_by_id_and_from_an_exported_file_reproduces_the_session(filled: tuple[str, list[str]], tmp_path: Path) -> None:
    url, (flagged, _) = filled
    by_id = json.loads(_run("replay", flagged, "--store", url, "--json").output)
    assert by_id["mode"] == "full" and not by_id["changed"] and by_id["readouts_max_diff"] == 0.0 and by_id["tokens_equal"]
    out = tmp_path / "one.jsonl"
    _run("transcripts", "export", "--store", url, "--flagged", "--out", str(out))
    from_file = _run("replay", str(out))
    assert from_file.exit_code == 0 and "same" in from_file.output and "largest readout difference 0.0" in from_file.output


def test_replay_with_a_new_policy_and_policy_only(filled: tuple[str, list[str]], tmp_path: Path) -> None:
    url, (flagged, _) = filled
    policy = tmp_path / "never.yaml"
    never = {**RULE, "when": {**RULE["when"], "window": 1000, "gte": 1000}}  # needs 1000 tokens; the session has 30
    policy.write_text(yaml.safe_dump({"name": "never", "rules": [never]}))
    full = json.loads(_run("replay", flagged, "--store", url, "--policy", str(policy), "--json").output)
    quick = json.loads(_run("replay", flagged, "--store", url, "--policy", str(policy), "--policy-only", "--json").output)
    assert (full["mode"], quick["mode"]) == ("full", "policy")
    assert [c["change"] for c in full["changes"]] == [c["change"] for c in quick["changes"]] == ["gone"]


def test_replay_all_backtests_a_policy_over_the_store(filled: tuple[str, list[str]], tmp_path: Path) -> None:
    url, _ = filled
    policy = tmp_path / "all.yaml"
    policy.write_text(yaml.safe_dump({"name": "all", "rules": [{**RULE, "name": "any", "when": {"detector": "p", "gte": 0.0}}]}))
    report = json.loads(_run("replay", "--all", "--policy", str(policy), "--store", url, "--json").output)
    assert report["sessions"] == 2 and report["flagged_old"] == 1 and report["flagged_new"] == 2
    assert {r["rule"]: (r["new"], r["added"], r["removed"]) for r in report["rules"]} == {"any": (2, 2, 0), "early": (0, 0, 1)}
    table = _run("replay", "--all", "--policy", str(policy), "--store", url, "--unflagged")
    assert table.exit_code == 0 and "1 sessions" in table.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["replay"], "give a session ID"),
        (["replay", "--all"], "--all needs --policy"),
        (["replay", "nope"], "'nope' is neither a file nor a session"),
    ],
)
def test_replay_usage_errors_say_what_to_do(filled: tuple[str, list[str]], args: list[str], message: str) -> None:
    url, _ = filled
    result = _run(*args, "--store", url)
    assert result.exit_code != 0 and message in result.output


def test_a_malformed_transcript_file_is_named_with_the_field(tmp_path: Path, filled: tuple[str, list[str]]) -> None:
    url, _ = filled
    out = tmp_path / "bad.jsonl"
    _run("transcripts", "export", "--store", url, "--flagged", "--out", str(out))
    record = json.loads(out.read_text())
    record["steps"][3]["channel"] = "monologue"
    out.write_text(json.dumps(record) + "\n")
    result = _run("replay", str(out))
    assert result.exit_code == 1 and f"{out}:1.steps[3].channel" in result.output and "monologue" in result.output
