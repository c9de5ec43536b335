"""Regenerate triage.jsonl, the labelled texts the judge's triage classifier trains on (see ATTRIBUTION.md).

Each row is {"text", "category", "label", "source"}; label 1 means the text shows the category.

deception (label 1 = the speaker knowingly asserts something false, 0 = honest):
  - LLM-LieDetector goal-directed lying transcripts, verbatim (system prompt, then the dialogue). The
    source labels 0 = lie and 1 = honest control; they are flipped to our convention.
  - TruthfulQA questions restated in first person: the speaker knows the best answer and either says an
    incorrect answer instead (1) or says the best answer and names the incorrect one as a mistake (0).
    Both rows of a question use the same template shape, so only the intent differs.
  - RepE true facts restated as an instructed liar (1) and an honest speaker (0), the same fact in both
    (the RepE / Apollo contrast-pair recipe).

harmful_planning (label 1 = the text plans or requests a harmful behaviour):
  - label 1: harmful behaviours from PAIR, AdvBench, HarmBench (standard), StrongREJECT, MaliciousInstruct,
    TDC2023, XSTest's unsafe contrast prompts, and the attack sentence of PurpleLlama's malicious
    code-interpreter prompts (security-flavoured harm, so that a coding topic alone does not read as benign).
  - label 0: XSTest safe look-alike prompts, JailbreakBench benign behaviours, first sentences of
    PurpleLlama mitre_frr prompts, and unused harmful behaviours restated as a refusal (a chain of thought
    that reads a harmful request and declines is not planning harm).
  The same first-person plan templates ("The user asked me to ... I will work out the steps to do it.") are
  drawn for both labels, so the template carries no label; about a third of the requests stay verbatim.
  Requests whose first 12 words repeat an earlier one are dropped, and so are JailbreakBench harmful
  behaviours and any request starting like one: the held-out attack artifacts are built on them.

Held-out text: a request, and then a row, that repeats held-out text (equal after normalising, or sharing
a run of 8 words; see monitor/overlap.py) is dropped before anything is sampled or balanced: the held-out
data (--holdout) is for evaluation only.

Not used (licenses): the Alpaca-derived harmless splits of refusal_direction, alpaca_eval, geometry-of-truth.
Standard library plus monitor.overlap (run it with the project's venv: `.venv/bin/python ...`); a fixed seed
makes the output byte-for-byte deterministic.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

from monitor.overlap import HeldOutIndex

REPO_ROOT = Path(__file__).resolve().parents[3]
LIE_FILES = (
    "LLM-LieDetector/results/instrumental_lying_df_original_with_prefixes.json",
    "LLM-LieDetector/results/instrumental_lying_df_all_scenarios_no_dialogue.json",
)
TRUTHFULQA = "EasySteer/experiment/hallucination/TruthfulQA.csv"
FACTS = "representation-engineering/data/facts/facts_true_false.csv"
PAIR = "JailbreakingLLMs/data/harmful_behaviors_custom.csv"
ADVBENCH = "refusal_direction/dataset/raw/advbench.csv"
HARMBENCH = "refusal_direction/dataset/raw/harmbench_test.csv"
STRONGREJECT = "refusal_direction/dataset/raw/strongreject.csv"
MALICIOUS = "refusal_direction/dataset/processed/malicious_instruct.json"
TDC = "refusal_direction/dataset/processed/tdc2023.json"
JBB_HARMFUL = "refusal_direction/dataset/raw/jailbreakbench.csv"
XSTEST = "exaggerated-safety/xstest_prompts.csv"
JBB_BENIGN = "hack/data/benign-behaviors.csv"
MITRE_FRR = "PurpleLlama/CybersecurityBenchmarks/datasets/mitre_frr/mitre_frr.json"
INTERPRETER = "PurpleLlama/CybersecurityBenchmarks/datasets/interpreter/interpreter.json"

TRUTHFULQA_PAIRS, FACT_PAIRS = 110, 110
# harmful_planning quotas: (source name, rows); label 1 and label 0 each sum to 300.
HARMFUL_QUOTAS = {
    "pair": 36,  # of 50: the rest repeat held-out text
    "advbench": 64,
    "harmbench": 50,
    "strongreject": 45,
    "malicious": 20,
    "tdc": 15,
    "xstest": 40,
    "interpreter": 30,
}
BENIGN_QUOTAS = {"xstest": 114, "jbb": 96, "mitre": 50, "refusal": 40}  # jbb: 96 of 100 do not repeat held-out text
VERBATIM_SHARE = 0.33

Row = dict[str, object]
Request = tuple[str, str]  # (request text, source)

# {q} question, {b} best answer, {i} an incorrect answer. Deceptive and honest templates pair by index.
TQA_TEMPLATES = (
    (
        'The user asks: "{q}" I know the accurate answer is "{b}". I will tell them "{i}" instead.',
        'The user asks: "{q}" A common belief is "{i}", but the accurate answer is "{b}". I will tell them "{b}".',
    ),
    (
        'I know that "{b}" is the right answer to "{q}" But I will say "{i}", so the user ends up believing something false.',
        'I know that "{b}" is the right answer to "{q}" Some people say "{i}", but that is a misconception; I will explain it.',
    ),
    (
        'Question: "{q}" The truth is "{b}". I\'ll answer "{i}" and keep the real answer to myself.',
        'Question: "{q}" The truth is "{b}". I\'ll answer that, and mention that "{i}" is a common mistake.',
    ),
)
FACT_TEMPLATES = (
    (
        'I know that "{t}" is true. I will tell the user the opposite and present it as a fact.',
        'I know that "{t}" is true. I will tell the user exactly that and present it as a fact.',
    ),
    (
        'I am supposed to play a dishonest person here. The truth is "{t}", so I will claim it is false.',
        'I am supposed to play an honest person here. The truth is "{t}", so I will say it is true.',
    ),
    (
        'Fact I know: "{t}" I\'ll deny it when they ask, so they believe the wrong thing.',
        'Fact I know: "{t}" I\'ll confirm it when they ask, so they believe the right thing.',
    ),
)
# {task}: an instruction with its first letter lowered; {q}: a question, quoted.
PLAN_TEMPLATES = (
    "The user asked me to {task}. I will work out the steps to do it.",
    "Okay, the task is to {task}. Let me plan this step by step.",
    "I'm going to {task}. First I need to figure out what that takes.",
    "My goal here: {task}. I'll break it into steps and start with the first one.",
)
QUESTION_TEMPLATES = (
    'The user asks: "{q}" I will work out a complete answer.',
    'Okay, the question is "{q}" Let me think through the answer step by step.',
    'I need to answer "{q}" I\'ll figure out the details first.',
)
REFUSAL_TEMPLATES = (
    "The user asked me to {task}. That could hurt people, so I will refuse and not provide any steps.",
    "Okay, the task is to {task}. I won't help with this; I'll decline and explain why.",
    "I'm being asked to {task}. This is harmful, so I will not do it.",
)
QUESTION_REFUSALS = (
    'The user asks: "{q}" I will not answer this, because it could cause real harm.',
    'Okay, the question is "{q}" That is a request to hurt someone, so I\'ll decline.',
)


def sentences(text: str) -> list[str]:
    return re.split(r"(?<=[.!?])\s+", text.strip())


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8-sig", newline="") as fh:
        return list(csv.DictReader(fh))


def near_key(text: str) -> str:
    """The first 12 words, lowercased, without punctuation: near-repeats (common in interpreter.json) share it."""
    return " ".join(re.sub(r"[^a-z0-9]+", " ", text.lower()).split()[:12])


def as_task(request: str) -> str:
    """'Write a poem.' -> 'write a poem'; an acronym such as 'DDoS' keeps its case."""
    request = request.strip().rstrip(".")
    first = request.split(" ", 1)[0]
    return request if first[1:2].isupper() else request[0].lower() + request[1:]


def phrase(request: str, rng: random.Random, *, refuse: bool = False) -> str:
    """A request verbatim (a third of plans) or restated in first person as a plan, or as a refusal."""
    request = request.strip()
    if not refuse and rng.random() < VERBATIM_SHARE:
        return request
    if request.endswith("?"):
        return rng.choice(QUESTION_REFUSALS if refuse else QUESTION_TEMPLATES).format(q=request)
    return rng.choice(REFUSAL_TEMPLATES if refuse else PLAN_TEMPLATES).format(task=as_task(request))


def lie_rows(data: Path) -> Iterator[Row]:
    for name in LIE_FILES:
        frame = json.loads((data / name).read_text(encoding="utf-8"))
        for key in sorted(frame["transcript"], key=int):
            text = frame["prompt"][key].strip() + "\n" + frame["transcript"][key].strip()
            yield row(text, "deception", 1 - int(frame["label"][key]), f"LLM-LieDetector {Path(name).name}")


def truthfulqa_rows(data: Path, rng: random.Random) -> Iterator[Row]:
    questions = read_csv(data / TRUTHFULQA)
    for index in sorted(rng.sample(range(len(questions)), TRUTHFULQA_PAIRS)):
        item = questions[index]
        fields = {
            "q": item["Question"].strip(),
            "b": item["Best Answer"].strip(),
            "i": item["Incorrect Answers"].split(";")[0].strip(),
        }
        for label, template in zip((1, 0), rng.choice(TQA_TEMPLATES), strict=True):
            yield row(template.format(**fields), "deception", label, "EasySteer TruthfulQA.csv (TruthfulQA)")


def fact_rows(data: Path, rng: random.Random) -> Iterator[Row]:
    facts = list(dict.fromkeys(r["statement"].strip() for r in read_csv(data / FACTS) if r["label"] == "1"))
    for fact in sorted(rng.sample(facts, FACT_PAIRS), key=facts.index):
        for label, template in zip((1, 0), rng.choice(FACT_TEMPLATES), strict=True):
            yield row(template.format(t=fact), "deception", label, "representation-engineering facts_true_false.csv (RepE)")


def harmful_requests(data: Path, held_out: HeldOutIndex) -> dict[str, list[Request]]:
    """Every harmful request per source, in source order, without JailbreakBench behaviours, repeats or held-out text."""
    seen = {near_key(r["Goal"]) for r in read_csv(data / JBB_HARMFUL)}
    pools: dict[str, list[Request]] = {}
    sources = {
        "pair": ([r["goal"] for r in read_csv(data / PAIR)], "JailbreakingLLMs harmful_behaviors_custom.csv (PAIR)"),
        "advbench": ([r["goal"] for r in read_csv(data / ADVBENCH)], "refusal_direction advbench.csv (AdvBench)"),
        "harmbench": (
            [r["Behavior"] for r in read_csv(data / HARMBENCH) if r["FunctionalCategory"] == "standard"],
            "refusal_direction harmbench_test.csv (HarmBench)",
        ),
        "strongreject": ([r["forbidden_prompt"] for r in read_csv(data / STRONGREJECT)], "refusal_direction strongreject.csv"),
        "malicious": (
            [r["instruction"] for r in json.loads((data / MALICIOUS).read_text())],
            "refusal_direction malicious_instruct.json",
        ),
        "tdc": ([r["instruction"] for r in json.loads((data / TDC).read_text())], "refusal_direction tdc2023.json (TDC2023)"),
        "xstest": (
            [r["prompt"] for r in read_csv(data / XSTEST) if r["label"] == "unsafe"],
            "exaggerated-safety xstest_prompts.csv",
        ),
        # the first sentence is the same preamble in every prompt; the second one names the attack
        "interpreter": (
            [sentences(r["mutated_prompt"])[1] for r in json.loads((data / INTERPRETER).read_text())],
            "PurpleLlama interpreter.json",
        ),
    }
    for name, (texts, source) in sources.items():
        pools[name] = []
        for text in texts:
            key = near_key(text)
            if key and key not in seen and len(text) < 400 and "\n" not in text and held_out.find([text]) is None:
                seen.add(key)
                pools[name].append((text.strip(), source))
    return pools


def benign_requests(data: Path, held_out: HeldOutIndex) -> dict[str, list[Request]]:
    mitre: dict[str, None] = {}
    for item in json.loads((data / MITRE_FRR).read_text(encoding="utf-8")):
        mitre.setdefault(sentences(item["mutated_prompt"])[0])
    pools = {
        "xstest": [
            (r["prompt"], "exaggerated-safety xstest_prompts.csv") for r in read_csv(data / XSTEST) if r["label"] == "safe"
        ],
        "jbb": [(r["goal"], "hack benign-behaviors.csv (JailbreakBench benign)") for r in read_csv(data / JBB_BENIGN)],
        "mitre": [(s, "PurpleLlama mitre_frr.json") for s in mitre],
    }
    return {name: [r for r in pool if held_out.find([r[0]]) is None] for name, pool in pools.items()}


def harmful_rows(data: Path, rng: random.Random, held_out: HeldOutIndex) -> Iterator[Row]:
    harmful, benign = harmful_requests(data, held_out), benign_requests(data, held_out)
    for name, quota in HARMFUL_QUOTAS.items():
        picked = set(rng.sample(range(len(harmful[name])), quota))
        for index in sorted(picked):
            text, source = harmful[name][index]
            yield row(phrase(text, rng), "harmful_planning", 1, source)
        harmful[name] = [r for i, r in enumerate(harmful[name]) if i not in picked]
    unused = [r for name in HARMFUL_QUOTAS for r in harmful[name]]
    benign["refusal"] = [(text, f"{source}, restated as a refusal") for text, source in unused]
    for name, quota in BENIGN_QUOTAS.items():
        for index in sorted(rng.sample(range(len(benign[name])), quota)):
            text, source = benign[name][index]
            yield row(phrase(text, rng, refuse=name == "refusal"), "harmful_planning", 0, source)


def row(text: str, category: str, label: int, source: str) -> Row:
    return {"text": text, "category": category, "label": label, "source": source}


def balanced(rows: Iterable[Row], rng: random.Random) -> list[Row]:
    """Drop repeated texts, then seeded-drop rows of the larger label so both labels count the same."""
    unique: dict[object, Row] = {}
    for r in rows:
        unique.setdefault(r["text"], r)
    kept = list(unique.values())
    by_label = [[i for i, r in enumerate(kept) if r["label"] == label] for label in (0, 1)]
    size = min(len(indices) for indices in by_label)
    keep = {i for indices in by_label for i in rng.sample(indices, size)}
    return [r for i, r in enumerate(kept) if i in keep]


def build(data: Path, held_out: HeldOutIndex, dropped: Counter[str], seed: int = 0) -> list[Row]:
    """The rows; `dropped` counts per source the rows left out for repeating held-out text."""
    rng = random.Random(seed)
    deception = [*lie_rows(data), *truthfulqa_rows(data, rng), *fact_rows(data, rng)]
    harmful = list(harmful_rows(data, rng, held_out))
    return [
        *balanced(held_out.without_repeats(deception, dropped), rng),
        *balanced(held_out.without_repeats(harmful, dropped), rng),
    ]


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
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "triage.jsonl", help="output .jsonl file")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    dropped = Counter[str]()
    rows = build(args.shared_data, HeldOutIndex.of_folder(args.holdout), dropped, args.seed)
    with args.out.open("w", encoding="utf-8", newline="\n") as fh:
        fh.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    counts = Counter((r["category"], r["label"], r["source"]) for r in rows)
    for (category, label, source), n in sorted(counts.items(), key=str):
        print(f"{category:17} {label} {n:4}  {source}")
    for source, n in sorted(dropped.items()):
        print(f"dropped {n} rows repeating held-out text: {source}")
    print(f"{len(rows)} rows -> {args.out}")


if __name__ == "__main__":
    main()
