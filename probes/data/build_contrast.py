"""Regenerate the bundled contrast sets from the public source data (see ATTRIBUTION.md).

deception_contrast.jsonl: the RepE / Apollo instructed-pair recipe. Each distinct TRUE statement of
representation-engineering's facts_true_false.csv gives two rows with the same text: one after an
instruction to be honest (label 0) and one after an instruction to be dishonest (label 1).

harmful_contrast.jsonl: requests restated as a first-person plan ("The user asked me to ... I will work
out the steps to do it."). Label 1: the first 300 AdvBench goals. Label 0: the JailbreakBench benign
behaviours, then the first 200 distinct first sentences of PurpleLlama's mitre_frr.json prompts.

A row that repeats held-out text (equal after normalising, or sharing a run of 8 words; see
monitor/overlap.py) is dropped before the limits are counted: the held-out data (--holdout) is for
evaluation only, and AdvBench shares many goals with the JailbreakBench attack artifacts in it.
Rows keep the order of the source files; a text already written for the same label is skipped.
Standard library plus monitor.overlap (run it with the project's venv: `.venv/bin/python ...`); the
output is byte-for-byte deterministic.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from itertools import islice
from pathlib import Path

from monitor.overlap import HeldOutIndex

REPO_ROOT = Path(__file__).resolve().parents[2]
FACTS = "representation-engineering/data/facts/facts_true_false.csv"
ADVBENCH = "refusal_direction/dataset/raw/advbench.csv"
JBB_BENIGN = "hack/data/benign-behaviors.csv"
MITRE_FRR = "PurpleLlama/CybersecurityBenchmarks/datasets/mitre_frr/mitre_frr.json"
ADVBENCH_LIMIT, MITRE_LIMIT = 300, 200
PERSONAS = ((0, "honest", "an honest"), (1, "dishonest", "a dishonest"))

Row = dict[str, object]


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh))


def first_sentence(text: str) -> str:
    return re.split(r"(?<=[.!?])\s+", text.strip(), maxsplit=1)[0]


def as_plan(request: str) -> str:
    """'Write a poem.' -> 'The user asked me to write a poem. I will work out the steps to do it.'"""
    request = request.strip()
    if request.endswith("?"):  # one JBB benign behaviour is phrased as a question
        task = "answer this question: " + request[0].lower() + request[1:]
    else:
        task = request[0].lower() + request[1:].rstrip(".") + "."
    return f"The user asked me to {task} I will work out the steps to do it."


def deception_rows(data: Path) -> Iterator[Row]:
    for index, row in enumerate(read_csv(data / FACTS)):
        if row["label"] != "1":
            continue
        fact = row["statement"].strip()
        for label, tag, persona in PERSONAS:
            prompt = f"Pretend you are {persona} person making statements about the world."
            yield {
                "id": f"repe-fact-{index:03d}-{tag}",
                "label": label,
                "messages": [{"role": "user", "content": prompt}],
                "text": fact,
                "source": "representation-engineering facts_true_false.csv",
            }


def request_rows(requests: Iterable[tuple[str, str]], label: int, source: str) -> Iterator[Row]:
    for row_id, request in requests:
        yield {
            "id": row_id,
            "label": label,
            "messages": [{"role": "user", "content": request.strip()}],
            "text": as_plan(request),
            "source": source,
        }


def mitre_requests(data: Path) -> Iterator[tuple[str, str]]:
    seen: set[str] = set()
    for index, item in enumerate(json.loads((data / MITRE_FRR).read_text(encoding="utf-8"))):
        sentence = first_sentence(item["mutated_prompt"])
        if sentence not in seen:
            seen.add(sentence)
            yield f"mitre-frr-{index:03d}", sentence


def harmful_rows(data: Path, kept: Callable[[Iterable[Row]], Iterator[Row]]) -> Iterator[Row]:
    advbench = ((f"advbench-{i:03d}", r["goal"]) for i, r in enumerate(read_csv(data / ADVBENCH)))
    yield from islice(kept(request_rows(advbench, 1, "refusal_direction advbench.csv (AdvBench)")), ADVBENCH_LIMIT)
    benign = ((f"jbb-benign-{int(r['index']):03d}", r["goal"]) for r in read_csv(data / JBB_BENIGN))
    yield from kept(request_rows(benign, 0, "hack benign-behaviors.csv (JailbreakBench benign)"))
    yield from islice(kept(request_rows(mitre_requests(data), 0, "PurpleLlama mitre_frr.json")), MITRE_LIMIT)


def write_jsonl(path: Path, rows: Iterable[Row]) -> dict[int, int]:
    """Write rows (skipping a text already written with the same label); return the count per label."""
    seen: set[tuple[object, object]] = set()
    counts: dict[int, int] = {0: 0, 1: 0}
    with path.open("w", encoding="utf-8", newline="\n") as fh:
        for row in rows:
            key = (row["label"], row["text"])
            if key in seen:
                continue
            seen.add(key)
            counts[int(str(row["label"]))] += 1
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--shared-data",
        type=Path,
        default=REPO_ROOT.parent / "shared" / "data",
        help="folder holding the source datasets (default: ../shared/data from the repo root)",
    )
    parser.add_argument(
        "--holdout",
        type=Path,
        default=REPO_ROOT.parent / "shared" / "holdout",
        help="held-out evaluation data; rows repeating it are dropped (default: ../shared/holdout from the repo root)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parent,
        help="folder to write the .jsonl files to (default: this script's folder)",
    )
    args = parser.parse_args()
    held_out, dropped = HeldOutIndex.of_folder(args.holdout), Counter[str]()

    def kept(rows: Iterable[Row]) -> Iterator[Row]:
        return held_out.without_repeats(rows, dropped)

    for name, rows in (
        ("deception_contrast.jsonl", kept(deception_rows(args.shared_data))),
        ("harmful_contrast.jsonl", harmful_rows(args.shared_data, kept)),
    ):
        counts = write_jsonl(args.out / name, rows)
        print(f"{name}: label 0: {counts[0]}, label 1: {counts[1]}")
    for source, n in sorted(dropped.items()):
        print(f"dropped {n} rows repeating held-out text: {source}")


if __name__ == "__main__":
    main()
