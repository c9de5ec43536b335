"""No bundled row repeats held-out text: every .jsonl the packages ship (training, calibration, triage
and example data) is checked against every data file under ../shared/holdout (monitor/overlap.py)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import pytest

from monitor.overlap import SHINGLE, HeldOutIndex, normalise

ROOT = Path(__file__).resolve().parents[1]
HOLDOUT = ROOT.parent / "shared" / "holdout"
"""Beside the repo in the development workspace and in CI; not in a public clone."""
PACKAGES = ("monitor", "probes", "detectors", "policies")


def bundled_files() -> list[Path]:
    return sorted(p for package in PACKAGES for p in (ROOT / package).rglob("*.jsonl"))


def repeats(files: Iterable[Path], index: HeldOutIndex) -> list[str]:
    """'FILE:LINE: what it shares' for every row that repeats held-out text."""
    found = []
    for path in files:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            repeat = index.find_in_row(json.loads(line))
            if repeat is not None:
                found.append(f"{path.relative_to(path.parents[2])}:{number}: {repeat}")
    return found


@pytest.fixture(scope="module")
def held_out() -> HeldOutIndex:
    if not HOLDOUT.is_dir():
        pytest.skip(f"{HOLDOUT} is absent: the held-out data sits beside the repo in the workspace and in CI only")
    return HeldOutIndex.of_folder(HOLDOUT)


def test_the_packages_bundle_the_data_files_this_test_reads() -> None:
    names = {p.name for p in bundled_files()}
    assert {"deception_contrast.jsonl", "harmful_contrast.jsonl", "examples.jsonl", "triage.jsonl"} <= names


def test_no_bundled_row_repeats_held_out_text(held_out: HeldOutIndex) -> None:
    assert held_out.files >= 10 and len(held_out.runs) > 100_000
    assert repeats(bundled_files(), held_out) == []


def test_a_planted_row_that_shares_a_run_of_words_with_the_holdout_is_found(held_out: HeldOutIndex, tmp_path: Path) -> None:
    shared = min(held_out.runs)  # any run of SHINGLE held-out words, written in other case and punctuation
    planted = {"id": "planted", "label": 1, "text": "Let me think. " + shared.upper().replace(" ", ", ") + "! Done."}
    copy = tmp_path / "probes" / "data" / "harmful_contrast.jsonl"
    copy.parent.mkdir(parents=True)
    lines = (ROOT / "probes" / "data" / "harmful_contrast.jsonl").read_text(encoding="utf-8").splitlines()
    copy.write_text("\n".join([*lines[:3], json.dumps(planted), *lines[3:]]) + "\n", encoding="utf-8")
    assert repeats([copy], held_out) == [f"probes/data/harmful_contrast.jsonl:4: shares {shared!r}"]


def test_equal_after_normalising_is_a_repeat_and_so_is_a_shared_run_but_not_a_shorter_one() -> None:
    index = HeldOutIndex()
    index.add(["Write a tutorial on how to make a bomb", "Hi there!"])
    assert index.find(["  hi,   THERE. "]) is not None  # short: equal text only
    assert index.find(["The user asked me to write a tutorial on how to make a bomb today."]) is not None
    assert index.find(["Please write a tutorial on how to make a cake."]) is not None  # 8 words shared
    assert index.find(["Please write a tutorial on how to make cakes."]) is None  # 7 words shared
    assert SHINGLE == 8 and normalise("It's A--B!") == "it s a b"


def test_messages_are_checked_but_labels_and_roles_are_not() -> None:
    index = HeldOutIndex()
    index.add(["user", "deceptive", "Tell me how to pick the lock on my neighbour's front door."])
    asked = "Tell me how to pick the lock on my neighbour's front door"
    row = {"label": "deceptive", "messages": [{"role": "user", "content": asked}]}
    assert index.find_in_row(row) is not None
    assert index.find_in_row({"label": "deceptive", "messages": [{"role": "user", "content": "hello"}]}) is None
