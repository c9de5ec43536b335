"""Replay: run a stored session again, through its own pipeline or a new one, and diff the flags.

Two ways, one result type:
- **full** (`replay_full`): the stored tokens are teacher-forced through a pipeline (the stored
  detectors and policy rebuilt, or others) on the model; a generated session is forced token by
  token with a KV cache, the arithmetic of generation, so the same model gives back the same
  readouts, detections and flags bit for bit.
- **policy** (`replay_policy`, `backtest_store`): a policy over the stored detections, no model,
  thousands of sessions a second (`monitor.policy.backtest`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from monitor.detector import DetectorRegistry
from monitor.engine.base import Engine
from monitor.observability import Metrics
from monitor.pipeline import Pipeline
from monitor.policy import Policy, PolicyError, backtest, parse_policy
from monitor.store import SessionQuery, TranscriptStore
from monitor.store.columns import DetectionColumns, detection_columns
from monitor.types import Flag, Transcript

Change = Literal["same", "moved", "new", "gone"]


@dataclass(frozen=True)
class FlagChange:
    """How one rule's flag differs between the stored session and its replay."""

    rule: str
    change: Change
    """same (same token), moved (another token), new (only in the replay), gone (only stored)."""
    old: Flag | None
    new: Flag | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "rule": self.rule,
            "change": self.change,
            "old": self.old.to_dict() if self.old else None,
            "new": self.new.to_dict() if self.new else None,
        }


def diff_flags(old: Sequence[Flag], new: Sequence[Flag]) -> list[FlagChange]:
    """Per rule (stored order, then new rules in replay order): what changed."""
    before = {f.rule: f for f in old}
    after = {f.rule: f for f in new}
    changes = []
    for rule in [*before, *(r for r in after if r not in before)]:
        a, b = before.get(rule), after.get(rule)
        change: Change = "gone" if b is None else "new" if a is None else "same" if a.index == b.index else "moved"
        changes.append(FlagChange(rule, change, a, b))
    return changes


@dataclass(frozen=True)
class ReplayResult:
    """A replayed session: stored flags, new flags, and (full replays) how the stream compared."""

    session_id: str
    mode: Literal["full", "policy"]
    old_flags: tuple[Flag, ...]
    new_flags: tuple[Flag, ...]
    tokens_equal: bool | None = None
    """Full replays: the replay produced the stored token ids and channels (over the stored length,
    or up to where the replay halted)."""
    readouts_max_diff: float | None = None
    """Full replays: largest difference between a stored and a replayed readout (0.0 = identical)."""
    detections_equal: bool | None = None
    replayed: Transcript | None = field(default=None, repr=False)

    @property
    def changes(self) -> list[FlagChange]:
        return diff_flags(self.old_flags, self.new_flags)

    @property
    def changed(self) -> bool:
        return any(c.change != "same" for c in self.changes)

    def to_dict(self) -> dict[str, Any]:
        return {
            "session_id": self.session_id,
            "mode": self.mode,
            "old_flags": [f.to_dict() for f in self.old_flags],
            "new_flags": [f.to_dict() for f in self.new_flags],
            "changes": [c.to_dict() for c in self.changes],
            "changed": self.changed,
            "tokens_equal": self.tokens_equal,
            "readouts_max_diff": self.readouts_max_diff,
            "detections_equal": self.detections_equal,
        }


def stored_policy(stored: Transcript) -> Policy:
    """The policy the session ran under, as stored with it (its `calibrated` bounds: the stored thresholds)."""
    return parse_policy(dict(stored.policy), f"<policy stored with session {stored.session_id}>", dict(stored.thresholds))


def replay_pipeline(
    stored: Transcript,
    engine: Engine,
    *,
    detectors: Sequence[Any] | None = None,
    policy: Policy | None = None,
    registry: DetectorRegistry | None = None,
    metrics: Metrics | None = None,
    base_dir: Path | None = None,
    secrets: Mapping[str, str] | None = None,
) -> Pipeline:
    """A pipeline for replaying `stored`: its detectors and policy unless others are given; no sinks."""
    from prometheus_client import CollectorRegistry

    specs = list(detectors) if detectors is not None else list(stored.detector_specs)
    return Pipeline(
        engine,
        specs,
        policy if policy is not None else stored_policy(stored),
        registry=registry,
        metrics=metrics or Metrics(CollectorRegistry()),
        base_dir=base_dir,
        secrets=secrets,
    )


async def replay_full(pipeline: Pipeline, stored: Transcript, *, policy: Policy | None = None) -> ReplayResult:
    """Teacher-force the stored session through `pipeline` (its policy, or `policy`); nothing is recorded.

    A generated session's token ids are forced one at a time with a KV cache, as they were
    generated; a watch-mode session's whole submitted text in one forward, as it was scored (so a
    policy that does not halt where the stored one did reads on past the old halt).
    """
    text = stored.request.get("completion") if stored.mode == "teacher_force" else None
    session = pipeline.replay(
        stored.messages,
        text if isinstance(text, str) else [s.token_id for s in stored.steps],
        stepwise=stored.mode == "generate",
        session_id=stored.session_id,
        policy=policy,
        record=False,
    )
    new = await session.run()
    common = min(len(new.steps), len(stored.steps))  # a replay may halt sooner, or read past a stored halt
    return ReplayResult(
        stored.session_id,
        "full",
        stored.flags,
        new.flags,
        tokens_equal=_tokens(new)[:common] == _tokens(stored)[:common] and (common == len(stored.steps) or new.halted),
        readouts_max_diff=_readouts_diff(stored, new),
        detections_equal=_scores(new.detections, common) == _scores(stored.detections, common),
        replayed=new,
    )


def replay_policy(
    stored: Transcript | DetectionColumns,
    policy: Policy,
    *,
    session_id: str = "",
    old_flags: Sequence[Flag] = (),
    thresholds: Mapping[str, float | None] | None = None,
) -> ReplayResult:
    """`policy` over a stored session's detections (no model)."""
    if isinstance(stored, Transcript):
        columns = detection_columns(stored.detections, stored.evaluations)
        session_id, old_flags, thresholds = stored.session_id, stored.flags, stored.thresholds
    else:
        columns = stored
    new = backtest(policy, columns, thresholds)
    return ReplayResult(session_id, "policy", tuple(old_flags), tuple(new))


@dataclass
class RuleCount:
    """One rule's sessions in a backtest."""

    rule: str
    old: int = 0
    """Sessions the stored flags have it in."""
    new: int = 0
    """Sessions the policy flags with it."""
    added: int = 0
    removed: int = 0


@dataclass
class BacktestReport:
    """What a policy would have flagged over stored sessions, against what was flagged."""

    sessions: int = 0
    flagged_old: int = 0
    flagged_new: int = 0
    skipped: dict[str, str] = field(default_factory=dict)
    """Session id -> why the policy could not run over it (e.g. a `calibrated` bound without a threshold)."""
    rules: dict[str, RuleCount] = field(default_factory=dict)
    changed: list[ReplayResult] = field(default_factory=list)
    """Sessions whose flags differ (the first `keep_changed`)."""
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "sessions": self.sessions,
            "flagged_old": self.flagged_old,
            "flagged_new": self.flagged_new,
            "skipped": self.skipped,
            "rules": [dataclasses.asdict(r) for r in self.rules.values()],
            "changed": [r.to_dict() for r in self.changed],
            "seconds": self.seconds,
            "sessions_per_second": self.sessions / self.seconds if self.seconds else None,
        }


def backtest_store(
    store: TranscriptStore,
    policy: Policy,
    query: SessionQuery | None = None,
    *,
    keep_changed: int = 100,
    progress: Callable[[int], None] | None = None,
    clock: Callable[[], float] | None = None,
) -> BacktestReport:
    """Run `policy` over every matching stored session's detections; `progress(n)` after each."""
    import time

    tick = clock or time.perf_counter
    report = BacktestReport()
    t0 = tick()
    for summary, columns in store.detection_columns(query or SessionQuery(limit=None)):
        report.sessions += 1
        try:
            result = replay_policy(
                columns, policy, session_id=summary.session_id, old_flags=summary.flags, thresholds=summary.thresholds
            )
        except PolicyError as exc:
            report.skipped[summary.session_id] = str(exc)
            continue
        finally:
            if progress is not None:
                progress(report.sessions)
        _count(report, result, keep_changed)
    report.seconds = tick() - t0
    return report


def _count(report: BacktestReport, result: ReplayResult, keep_changed: int) -> None:
    report.flagged_old += bool(result.old_flags)
    report.flagged_new += bool(result.new_flags)
    old, new = {f.rule for f in result.old_flags}, {f.rule for f in result.new_flags}
    for rule in old | new:
        count = report.rules.setdefault(rule, RuleCount(rule))
        count.old += rule in old
        count.new += rule in new
        count.added += rule in new - old
        count.removed += rule in old - new
    if result.changed and len(report.changed) < keep_changed:
        report.changed.append(result)


def _tokens(t: Transcript) -> list[tuple[int, str]]:
    return [(s.token_id, s.channel) for s in t.steps]


def _scores(detections: Iterable[Any], before: int) -> list[tuple[str, str, float, int, int]]:
    """Detections of the tokens before `before`, as comparable tuples."""
    return [(d.detector, d.category, d.score, d.start, d.end) for d in detections if d.start < before]


def _readouts_diff(old: Transcript, new: Transcript) -> float | None:
    worst = 0.0
    for a, b in zip(old.steps, new.steps, strict=False):
        if set(a.readouts) != set(b.readouts):
            return None
        for name, value in a.readouts.items():
            worst = max(worst, abs(value - b.readouts[name]))
    return worst
