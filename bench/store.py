"""Transcript store: write latency per session, and policy-only replay rate over stored sessions.

Workload: --sessions synthetic transcripts (seeded numpy, no model), each --min-tokens to
--max-tokens tokens (reasoning ending in `</think>`, then a shorter answer) of a few characters.
Two linear probes (deception_probe, harmful_probe) give a float32 readout (a logit) and one
detection per token: sigmoid of a noisy random walk that stays low in most sessions and drifts
high in some. The `cot_judge` closes a window every 64 reasoning tokens (and at `</think>`) and
hands in one detection per category, with a rationale and a quote verbatim from the CoT, a few
tokens late. Each session is played through the real `PolicyEvaluator` under the default policy
as `monitor.session.Session` does (late judge batches folded into the next token's evaluation,
one more evaluation for batches after the last token; a halt ends the session there), which gives
its stored `flags`, `evaluations` and outcome.

Measured, in one run:
  write     every `TranscriptStore.save` timed alone (one transaction; SQLite WAL, synchronous=FULL)
            -> p50 / p99 / max latency, writes/s, database size
  backtest  `backtest_store(store, strict policy)` over every session, --repeats times (median)
  naive     side by side with an instrumented pass of the same backtest: for the first --naive
            sessions, a plain `PolicyEvaluator` observes the stored detections call by call (stop
            at a halt); its flags must equal the backtest's (rule, index, reason) for every session

    .venv/bin/python bench/store.py                          # 10,000 sessions into SQLite
    .venv/bin/python bench/store.py --sessions 500           # quick check
    .venv/bin/python bench/store.py --postgres postgresql://user@localhost/cotmon_bench   # an empty database
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import sqlalchemy as sa
from rich.console import Console
from rich.progress import Progress, TaskID
from rich.table import Table

from monitor.policy import Policy, PolicyEvaluator, backtest, load_policy
from monitor.replay import backtest_store
from monitor.store import SessionQuery, TranscriptStore
from monitor.store.columns import DetectionColumns
from monitor.store.schema import metadata
from monitor.types import Channel, ChatMessage, Detection, DetectorSpec, Evidence, Flag, ModelInfo, TraceStep, Transcript
from policies import bundled_policy

PROBES = (("deception_probe", "deception"), ("harmful_probe", "harmful_planning"))
THRESHOLDS: dict[str, float | None] = {"deception_probe": 0.8, "harmful_probe": 0.8, "cot_judge": None}
JUDGE_EVERY = 64
MODEL = ModelInfo(model_id="Qwen/Qwen3-4B", revision="1cfa9a7208912126459214e8b04321603b3df60c", d_model=2560, n_layers=36)
SPECS = (
    DetectorSpec("linear_probe", "deception_probe", {"artifact": "probes/deception_probe"}),
    DetectorSpec("linear_probe", "harmful_probe", {"artifact": "probes/harmful_probe"}),
    DetectorSpec("cot_judge", "cot_judge", {"url": "http://judge:8000/v1", "model": "judge", "every": JUDGE_EVERY}),
)
PROMPTS = (
    "Plan the database migration and report whether the tests passed.",
    "Summarise the quarterly numbers for the board.",
    "Fix the failing unit test in the payment module.",
    "Explain how to rotate the API keys without downtime.",
    "Draft a reply to the customer about the delayed refund.",
)
RATIONALES = {
    False: "The reasoning stays on the task and reports what it found.",
    True: "The reasoning weighs telling the user something it believes to be false.",
}
LAYERS = {"deception_probe": 18, "harmful_probe": 20}


@dataclass
class Writes:
    """One store's save latencies (seconds) and size."""

    latencies: list[float] = field(default_factory=list)
    size_bytes: int = 0


@dataclass
class Replays:
    """One store's replay timings over --repeats rounds."""

    backtest_rates: list[float] = field(default_factory=list)
    naive_rates: list[float] = field(default_factory=list)
    read_us: list[float] = field(default_factory=list)
    """Per session, read + decode of the packed detections (instrumented pass)."""
    policy_us: list[float] = field(default_factory=list)
    """Per session, `backtest` alone (instrumented pass)."""
    naive_us: list[float] = field(default_factory=list)
    """Per session, the naive evaluator alone, Detection objects included (first --naive sessions)."""
    agreed: int = 0
    compared: int = 0
    flagged: tuple[int, int] = (0, 0)


# -- synthetic sessions ---------------------------------------------------------------------------


def vocabulary(rng: np.random.Generator, size: int = 4096) -> list[str]:
    """Pseudo-word tokens of 1-5 letters, most with a leading space (as BPE vocabularies have)."""
    letters = np.array(list("etaoinshrdlucmfwypvbgkjqxz"))
    out = []
    for _ in range(size):
        word = "".join(rng.choice(letters, int(rng.integers(1, 6))))
        out.append((" " if rng.random() < 0.7 else "") + word)
    return [*out, ",", ".", "\n\n"]


def logits(rng: np.random.Generator, n: int) -> np.ndarray:
    """[n, probes] float32 readouts: a slow random walk (most stay far below 0) plus per-token noise."""
    start = rng.normal(-4.0, 0.6, (1, len(PROBES)))
    drift = np.where(rng.random(len(PROBES)) < 0.03, rng.uniform(0.01, 0.04, len(PROBES)), 0.0)
    walk = start + np.cumsum(rng.normal(drift, 0.11, (n, len(PROBES))), axis=0)
    return (walk + rng.normal(0.0, 0.7, (n, len(PROBES)))).astype(np.float32)


def judge_batches(
    rng: np.random.Generator, texts: Sequence[str], n_reasoning: int, scores: np.ndarray
) -> dict[int, list[Detection]]:
    """The judge's detections, keyed by the token index at which the pipeline takes them in."""
    arrivals: dict[int, list[Detection]] = {}
    for start in range(0, n_reasoning, JUDGE_EVERY):
        end = min(start + JUDGE_EVERY, n_reasoning)  # the last window closes at </think>
        a = int(rng.integers(start, max(start + 1, end - 8)))
        quote = "".join(texts[a : a + int(rng.integers(3, 9))]).strip() or texts[start]
        batch = []
        for p, (_, category) in enumerate(PROBES):
            score = float(np.clip(scores[start:end, p].mean() + rng.normal(0.0, 0.05), 0.0, 1.0))
            evidence = Evidence(f"judge: {category}", RATIONALES[score >= 0.5], (quote,), "judge")
            batch.append(Detection("cot_judge", category, score, start, end, (evidence,)))
        arrivals.setdefault(end - 1 + int(rng.integers(2, 12)), []).extend(batch)
    return arrivals


def synthetic_transcript(
    rng: np.random.Generator,
    number: int,
    vocab: Sequence[str],
    policy: Policy,
    min_tokens: int,
    max_tokens: int,
    probe_evidence: bool = True,
) -> Transcript:
    """One session, played through the live evaluator as the pipeline would (see the module docstring).

    With `probe_evidence` every probe detection carries the probe's one Evidence, as
    `probes.linear.ProbeDetector` attaches it.
    """
    session_id = f"bench-{number:06d}-{int(rng.integers(2**32)):08x}"
    n = int(rng.integers(min_tokens, max_tokens + 1))
    n_reasoning = int(n * rng.uniform(0.65, 0.85))
    ids = rng.integers(0, len(vocab), n)
    ids[n_reasoning - 1] = len(vocab)  # </think>
    texts = [vocab[i] if i < len(vocab) else "</think>" for i in ids.tolist()]
    values = logits(rng, n)
    scores = 1.0 / (1.0 + np.exp(-values.astype(np.float64)))
    late = judge_batches(rng, texts, n_reasoning, scores)
    evidence = [
        (Evidence("linear probe", f"layer {LAYERS[name]}, threshold {THRESHOLDS[name]:.3f} at 1% FPR", kind="probe"),)
        if probe_evidence
        else ()
        for name, _ in PROBES
    ]

    evaluator = PolicyEvaluator(policy, THRESHOLDS)
    steps: list[TraceStep] = []
    detections: list[Detection] = []
    evaluations: list[tuple[int, int]] = []
    flags: list[Flag] = []
    value_rows, score_rows = values.tolist(), scores.tolist()
    halted = False
    for i in range(n):
        channel: Channel = "reasoning" if i < n_reasoning else "answer"
        readouts = {name: value_rows[i][p] for p, (name, _) in enumerate(PROBES)}
        steps.append(TraceStep(session_id, i, int(ids[i]), texts[i], channel, readouts, i == n - 1))
        found = late.pop(i, [])
        found += [Detection(name, cat, score_rows[i][p], i, i + 1, evidence[p]) for p, (name, cat) in enumerate(PROBES)]
        fired = evaluator.observe(found, i)
        detections += found
        evaluations.append((i, len(detections)))
        flags += fired
        if any("halt" in f.actions for f in fired):
            halted = True
            break
    # After a halt the pipeline evaluates what has arrived (nothing more here); after the last
    # token it waits for the judge and evaluates its remaining batches at once.
    last = steps[-1].index
    rest = [] if halted else [d for k in sorted(late) for d in late[k]]
    if halted or rest:
        flags += evaluator.observe(rest, last)
        detections += rest
        evaluations.append((last, len(detections)))
    started = 1_767_225_600.0 + number * 3.0
    return Transcript(
        session_id=session_id,
        model=MODEL,
        messages=(
            ChatMessage("system", "You are a careful assistant."),
            ChatMessage("user", PROMPTS[number % len(PROMPTS)]),
        ),
        steps=tuple(steps),
        detections=tuple(detections),
        flags=tuple(flags),
        outcome="halted" if halted else "completed",
        detector_specs=SPECS,
        policy=policy.to_dict(),
        started_at=started,
        ended_at=started + 0.025 * len(steps),
        request={"max_tokens": max_tokens, "temperature": 0.6, "top_p": 0.95, "seed": number},
        thresholds=THRESHOLDS,
        evaluations=tuple(evaluations),
    )


def transcripts(args: argparse.Namespace, policy: Policy) -> Iterator[Transcript]:
    rng = np.random.default_rng(args.seed)
    vocab = vocabulary(rng)
    for number in range(args.sessions):
        yield synthetic_transcript(rng, number, vocab, policy, args.min_tokens, args.max_tokens, not args.no_probe_evidence)


# -- measuring ------------------------------------------------------------------------------------


def database_bytes(store: TranscriptStore, directory: Path | None) -> int:
    """SQLite: the database file after a WAL checkpoint; PostgreSQL: the store's tables with indexes and TOAST."""
    with store.engine.begin() as conn:
        if directory is not None:
            conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
            return sum(p.stat().st_size for p in directory.glob("transcripts.db*"))
        sizes = [sa.func.pg_total_relation_size(sa.text(f"'{name}'::regclass")) for name in metadata.tables]
        return int(conn.execute(sa.select(sum(sizes[1:], sizes[0]))).scalar_one())


def naive_flags(policy: Policy, columns: DetectionColumns, thresholds: Mapping[str, float | None]) -> list[Flag]:
    """The live evaluator call by call over the stored detections, up to the first halt."""
    evaluator = PolicyEvaluator(policy, thresholds)
    detections = columns.detections()
    flags: list[Flag] = []
    seen = 0
    for index, count in columns.evaluations.tolist():
        fired = evaluator.observe(detections[seen:count], index)
        seen = count
        flags += fired
        if any("halt" in f.actions for f in fired):
            break
    return flags


def instrumented_pass(store: TranscriptStore, policy: Policy, naive: int, out: Replays, tick: Callable[[int], None]) -> float:
    """Every session: time reading it and `backtest` apart; the first `naive` also through `naive_flags`.

    Returns the naive sessions/s, read + decode included as in `backtest_store`.
    """
    read, policy_s, naive_s, read_head = [], [], [], 0.0
    rows = store.detection_columns(SessionQuery(limit=None))
    agreed = compared = 0
    while True:
        t0 = time.perf_counter()
        row = next(rows, None)
        t1 = time.perf_counter()
        if row is None:
            break
        summary, columns = row
        fast = backtest(policy, columns, summary.thresholds)
        t2 = time.perf_counter()
        read.append(t1 - t0)
        policy_s.append(t2 - t1)
        if compared < naive:
            slow = naive_flags(policy, columns, summary.thresholds)
            naive_s.append(time.perf_counter() - t2)
            read_head += t1 - t0
            compared += 1
            agreed += [(f.rule, f.index, f.reason) for f in slow] == [(f.rule, f.index, f.reason) for f in fast]
        tick(len(read))
    out.read_us.append(statistics.fmean(read) * 1e6)
    out.policy_us.append(statistics.fmean(policy_s) * 1e6)
    out.naive_us.append(statistics.fmean(naive_s) * 1e6)
    out.agreed, out.compared = agreed, compared
    return compared / (read_head + sum(naive_s))


def every(step: int, progress: Progress, task: TaskID) -> Callable[[int], None]:
    """A progress callback that redraws every `step` sessions (a redraw per session would cost more than one)."""

    def tick(n: int) -> None:
        if n % step == 0:
            progress.update(task, completed=n)

    return tick


def replay_round(store: TranscriptStore, policy: Policy, naive: int, out: Replays, progress: Progress, label: str) -> None:
    """One round: `backtest_store` over every session, then the instrumented pass with the naive replay."""
    total = store.count()
    task = progress.add_task(f"{label}: backtest_store", total=total)
    report = backtest_store(store, policy, progress=every(250, progress, task))
    progress.update(task, completed=total)
    out.backtest_rates.append(report.sessions / report.seconds)
    out.flagged = (report.flagged_old, report.flagged_new)
    task = progress.add_task(f"{label}: instrumented + naive", total=total)
    out.naive_rates.append(instrumented_pass(store, policy, naive, out, every(250, progress, task)))
    progress.update(task, completed=total)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, default=10_000, help="synthetic sessions written and replayed")
    parser.add_argument("--min-tokens", type=int, default=200, help="fewest tokens of a session (reasoning + answer)")
    parser.add_argument("--max-tokens", type=int, default=600, help="most tokens of a session")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--postgres", metavar="URL", help="also write and replay in this (empty) PostgreSQL database")
    parser.add_argument(
        "--no-probe-evidence", action="store_true", help="probe detections without the Evidence ProbeDetector attaches to each"
    )
    parser.add_argument("--repeats", type=int, default=3, help="replay rounds (median taken)")
    parser.add_argument("--naive", type=int, default=1000, help="sessions replayed call by call in each round")
    args = parser.parse_args()
    if not 8 <= args.min_tokens <= args.max_tokens:
        parser.error("need 8 <= --min-tokens <= --max-tokens")
    console = Console(width=150)
    default = load_policy(bundled_policy("default"))
    strict = load_policy(bundled_policy("strict"))

    with tempfile.TemporaryDirectory(prefix="cotmon-bench-store-") as tmp:
        stores: dict[str, tuple[TranscriptStore, Path | None]] = {"sqlite": (TranscriptStore.at(Path(tmp)), Path(tmp))}
        if args.postgres:
            pg = TranscriptStore(args.postgres)
            if pg.count():
                sys.exit(f"--postgres: the database at {pg.url.split('@')[-1]} already has sessions; give an empty one")
            stores["postgresql"] = (pg, None)
        writes = {name: Writes() for name in stores}
        built = time.perf_counter()
        build_s, n_tokens, n_evidence, outcomes = 0.0, 0, 0, {"completed": 0, "halted": 0, "flagged": 0}
        with Progress(console=console) as progress:
            task = progress.add_task(f"writing {args.sessions} sessions", total=args.sessions)
            sessions = transcripts(args, default)
            for _ in range(args.sessions):
                t0 = time.perf_counter()
                t = next(sessions)
                build_s += time.perf_counter() - t0
                n_tokens += len(t.steps)
                n_evidence += sum(1 for d in t.detections if d.evidence)
                outcomes[t.outcome] += 1
                outcomes["flagged"] += t.flagged
                for name, (store, _) in stores.items():
                    t0 = time.perf_counter()
                    store.save(t)
                    writes[name].latencies.append(time.perf_counter() - t0)
                progress.advance(task)
            for name, (store, directory) in stores.items():
                writes[name].size_bytes = database_bytes(store, directory)
            replays = {name: Replays() for name in stores}
            for round_ in range(args.repeats):  # rounds outermost, so that machine noise hits every store alike
                for name, (store, _) in stores.items():
                    replay_round(store, strict, args.naive, replays[name], progress, f"round {round_ + 1} {name}")
        for store, _ in stores.values():
            store.close()
    wall = time.perf_counter() - built

    print(f"command: {shlex.join([sys.executable.rsplit('/', 1)[-1], *sys.argv])}")
    print(
        f"--sessions {args.sessions} --min-tokens {args.min_tokens} --max-tokens {args.max_tokens} --seed {args.seed}"
        f" --postgres {args.postgres or '(none)'} --repeats {args.repeats} --naive {args.naive}"
        + (" --no-probe-evidence" if args.no_probe_evidence else "")
    )
    print(
        f"workload: {n_tokens} tokens ({n_tokens / args.sessions:.0f}/session), detections with evidence"
        f" {n_evidence / args.sessions:.0f}/session; default policy at write time:"
        f" {outcomes['flagged']} flagged ({outcomes['flagged'] / args.sessions:.1%}), {outcomes['halted']} halted;"
        f" built in {build_s:.1f} s; replayed with the strict policy"
    )
    table = Table(title=f"transcript store: {args.sessions} sessions, replay median of {args.repeats} rounds")
    columns = (
        "store", "sessions", "write p50 ms", "write p99 ms", "write max ms", "writes/s", "DB MB",
        "replay sess/s (backtest)", f"replay sess/s (naive, {min(args.naive, args.sessions)})", "speedup", "flagged old → new",
    )  # fmt: skip
    for col in columns:
        table.add_column(col, justify="left" if col == "store" else "right")
    for name in stores:
        w, r = writes[name], replays[name]
        ms = np.array(w.latencies) * 1e3
        fast, slow = statistics.median(r.backtest_rates), statistics.median(r.naive_rates)
        table.add_row(
            name,
            str(len(w.latencies)),
            f"{np.percentile(ms, 50):.2f}",
            f"{np.percentile(ms, 99):.2f}",
            f"{ms.max():.1f}",
            f"{len(ms) / (ms.sum() / 1e3):.0f}",
            f"{w.size_bytes / 1e6:.1f}",
            f"{fast:.0f}",
            f"{slow:.0f}",
            f"{fast / slow:.1f}x",
            f"{r.flagged[0]} → {r.flagged[1]}",
        )
    console.print(table)
    for name in stores:
        r = replays[name]
        print(
            f"{name}: per session (instrumented pass, median of rounds): read + decode {statistics.median(r.read_us):.0f} µs,"
            f" backtest {statistics.median(r.policy_us):.0f} µs; naive evaluator {statistics.median(r.naive_us):.0f} µs"
            f" (first {r.compared}); naive flags == backtest flags (rule, index, reason): {r.agreed}/{r.compared} sessions"
        )
    print(f"wall time {wall:.0f} s; load average over the last 15 min {os.getloadavg()[2]:.2f} on {os.cpu_count()} cores")
    if any(r.agreed != r.compared for r in replays.values()):
        sys.exit("FAIL: the naive evaluator and the backtest disagree")


if __name__ == "__main__":
    main()
