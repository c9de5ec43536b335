"""One monitored stream: engine -> detectors -> policy -> sinks. Pure async, no HTTP.

A `Pipeline` is built once per process (it installs the detectors' readouts into the engine);
each generation or teacher-forced text is a `Session`, iterated step by step. A flag whose rule
says `halt` ends the session right after the step that raised it: the engine is closed before
it computes another token.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
import uuid
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from monitor.detector import (
    Deferred,
    Detector,
    DetectorContext,
    DetectorRegistry,
    Explainer,
    default_registry,
    thresholds_of,
)
from monitor.engine.base import Engine
from monitor.observability import Metrics, default_metrics, get_logger
from monitor.policy import Policy, PolicyEvaluator, parse_policy
from monitor.sinks import DurableSink, JournalingSink, SessionJournal, Sink
from monitor.types import (
    Channel,
    ChatMessage,
    Detection,
    DetectorSpec,
    Flag,
    GenerationRequest,
    Mode,
    Outcome,
    TraceStep,
    Transcript,
    max_scores,
)


@dataclass(frozen=True)
class StepEvent:
    """What the pipeline saw at one token: the step, its detections, and rules that just fired."""

    step: TraceStep
    detections: tuple[Detection, ...]
    flags: tuple[Flag, ...]


class Pipeline:
    """Detectors and policy bound to an engine; makes one `Session` per stream."""

    def __init__(
        self,
        engine: Engine,
        detector_specs: Sequence[DetectorSpec],
        policy: Policy,
        *,
        registry: DetectorRegistry | None = None,
        metrics: Metrics | None = None,
        sinks: Sequence[Sink] = (),
        base_dir: Path | None = None,
        secrets: Mapping[str, str] | None = None,
        clock: Callable[[], float] = time.perf_counter,
        wall_clock: Callable[[], float] = time.time,
    ):
        self.engine = engine
        self.specs = tuple(detector_specs)
        self.registry = registry or default_registry()
        self.metrics = metrics or default_metrics()
        self.sinks = tuple(sinks)
        self.context = DetectorContext(
            model=engine.info, base_dir=base_dir or Path.cwd(), metrics=self.metrics, secrets=dict(secrets or {})
        )
        self.clock, self.wall_clock = clock, wall_clock
        self.log = get_logger("cotmon.pipeline")
        self._builders = self.registry.prepare_all(self.specs, self.context)  # each artifact loaded once, here
        prototypes = [build(self.context) for build in self._builders]
        self.thresholds = thresholds_of(prototypes)
        # Re-validate against the detectors that exist: unknown names and `calibrated` bounds on
        # uncalibrated detectors fail here, naming the policy file, rule and field.
        self.policy = parse_policy(policy.to_dict(), policy.source, self.thresholds) if policy.rules else policy
        engine.install([r for d in prototypes for r in d.readouts()])
        self.metrics.declare(
            flags=[(r.category, r.severity, r.name) for r in self.policy.rules],
            halts=[r.name for r in self.policy.rules if "halt" in r.actions],
            detectors=[s.name for s in self.specs],
        )

    def detectors(
        self, emit: Callable[[Sequence[Detection]], None], scores: Mapping[str, float], metrics: Metrics | None = None
    ) -> list[Detector]:
        """Fresh detector instances for one stream (`scores`: that stream's best score per detector)."""
        context = dataclasses.replace(self.context, emit=emit, scores=scores, metrics=metrics or self.metrics)
        return [build(context) for build in self._builders]

    def generate(self, request: GenerationRequest) -> Session:
        """A session that generates for `request`."""
        session_id = request.session_id or uuid.uuid4().hex
        request = dataclasses.replace(request, session_id=session_id)
        return Session(self, session_id, tuple(request.messages), self.engine.stream(request), request=_request_params(request))

    def teacher_force(
        self, messages: Sequence[ChatMessage], assistant_text: str, session_id: str = "", *, label: str | None = None
    ) -> Session:
        """A session that scores `assistant_text` as if the model had written it (`label`: the caller's name for it)."""
        session_id = session_id or uuid.uuid4().hex
        source = self.engine.teacher_force(messages, assistant_text, session_id)
        # The whole text is kept: a halt cuts the steps short, and a replay forces the same text again.
        request = {"completion": assistant_text} | ({"label": label} if label else {})
        return Session(self, session_id, tuple(messages), source, mode="teacher_force", request=request)

    def replay(
        self,
        messages: Sequence[ChatMessage],
        tokens: Sequence[int] | str,
        *,
        stepwise: bool = False,
        session_id: str = "",
        policy: Policy | None = None,
        record: bool = True,
    ) -> Session:
        """A session that teacher-forces a stored session again: its token ids (`stepwise`: one at
        a time, as they were generated) or the text a watch-mode session was given.

        `policy` replaces the pipeline's for this session (validated against its detectors);
        `record=False` keeps the session out of the sinks and the process's metrics, so replaying
        in a serving process raises no alerts.
        """
        session_id = session_id or uuid.uuid4().hex
        if isinstance(tokens, str):
            source = self.engine.teacher_force(messages, tokens, session_id)
        else:
            source = self.engine.force_tokens(messages, tokens, session_id, stepwise=stepwise)
        if policy is not None and policy.rules:
            policy = parse_policy(policy.to_dict(), policy.source, self.thresholds)
        return Session(self, session_id, tuple(messages), source, mode="replay", policy=policy, record=record)


def _request_params(request: GenerationRequest) -> dict[str, Any]:
    params = {
        "max_tokens": request.max_tokens,
        "temperature": request.temperature,
        "top_p": request.top_p,
        "seed": request.seed,
        "max_reasoning_tokens": request.max_reasoning_tokens,
        "ignore_eos": request.ignore_eos,
    }
    return {k: v for k, v in params.items() if v is not None}


class Session:
    """One stream through the pipeline: `events()` step by step, or `await run()` for all of it.

    Close `events()` (``contextlib.aclosing``) when leaving it early: that is what stops the
    engine and records the session as aborted.
    """

    def __init__(
        self,
        pipeline: Pipeline,
        session_id: str,
        messages: tuple[ChatMessage, ...],
        source: AsyncGenerator[TraceStep, None],
        *,
        mode: Mode = "generate",
        request: Mapping[str, Any] | None = None,
        policy: Policy | None = None,
        record: bool = True,
    ):
        self.pipeline = pipeline
        self.session_id = session_id
        self.messages = messages
        self.mode = mode
        self.request = dict(request or {})
        self.policy = policy or pipeline.policy
        self.metrics = pipeline.metrics if record else Metrics(CollectorRegistry())
        self.sinks = pipeline.sinks if record else ()
        self._source = source
        self.steps: list[TraceStep] = []
        self.detections: list[Detection] = []
        self.flags: list[Flag] = []
        self.evaluations: list[tuple[int, int]] = []
        self.transcript: Transcript | None = None
        self._late: list[Detection] = []
        self._late_lock = threading.Lock()
        self._best: dict[str, float] = {}
        self._started = 0.0
        self._spool = next((sink for sink in self.sinks if isinstance(sink, JournalingSink)), None)
        self._journal: SessionJournal | None = None
        # Whether retention keeps this session even unflagged: asked once (a hash), not every token.
        self._kept_unflagged = self._spool is not None and self._spool.keeps_unflagged(self.session_id)
        self._journaled = (0, 0, 0, 0)  # steps, detections, evaluations, flags already in the journal

    def _emit(self, detections: Sequence[Detection]) -> None:
        with self._late_lock:
            self._late.extend(detections)

    def _take_late(self) -> list[Detection]:
        with self._late_lock:
            late, self._late = self._late, []
        return late

    async def run(self) -> Transcript:
        """Consume the whole stream and return its transcript."""
        async with aclosing(self.events()) as events:
            async for _ in events:
                pass
        assert self.transcript is not None
        return self.transcript

    async def events(self) -> AsyncGenerator[StepEvent, None]:
        p = self.pipeline
        metrics = self.metrics
        detectors = p.detectors(self._emit, self._best, metrics)
        deferred = [d for d in detectors if isinstance(d, Deferred)]
        timers = {d.spec.name: metrics.detector_seconds.labels(d.spec.name) for d in detectors}
        evaluator = PolicyEvaluator(self.policy, p.thresholds)
        self._started = p.wall_clock()
        outcome: Outcome = "completed"
        error: str | None = None
        holding = any("hold" in rule.actions for rule in self.policy.rules) and bool(deferred)
        metrics.sessions_active.inc()
        try:
            async with aclosing(self._source) as source:
                async for step in source:
                    arrived = p.clock()
                    if holding and step.channel == "answer":
                        # Hold: the answer is released only once the judge has read the reasoning.
                        holding = False
                        if any("halt" in f.actions for f in await self._settle(evaluator, deferred, detectors, arrived)):
                            outcome = "halted"
                            break
                    self.steps.append(step)
                    metrics.tokens.labels(step.channel).inc()
                    found: list[Detection] = self._take_late()
                    for detector in detectors:
                        t0 = p.clock()
                        found.extend(await detector.observe(step))
                        timers[detector.spec.name].observe(p.clock() - t0)
                    flags = self._evaluate(evaluator, found, step.index, arrived, detectors)
                    self._record()
                    yield StepEvent(step, tuple(found), tuple(flags))
                    if any("halt" in f.actions for f in flags):
                        outcome = "halted"
                        break
            if outcome == "completed":
                await self._settle(evaluator, deferred, detectors, p.clock())
            else:
                self._evaluate(evaluator, self._take_late(), self.steps[-1].index if self.steps else 0, p.clock(), detectors)
        except GeneratorExit:
            outcome = "aborted"
            raise
        except BaseException as exc:  # cancellation included: the transcript is written regardless
            outcome = "aborted" if isinstance(exc, asyncio.CancelledError | KeyboardInterrupt) else "error"
            error = f"{type(exc).__name__}: {exc}"
            raise
        finally:
            metrics.sessions_active.dec()
            self._finish(outcome, error)

    async def _settle(
        self, evaluator: PolicyEvaluator, deferred: Sequence[Deferred], detectors: Sequence[Detector], arrived: float
    ) -> list[Flag]:
        """Wait for detectors with work in flight, then evaluate what they handed in."""
        for d in deferred:
            await d.settle()
        late = self._take_late()
        return self._evaluate(evaluator, late, self.steps[-1].index if self.steps else 0, arrived, detectors) if late else []

    def _evaluate(
        self, evaluator: PolicyEvaluator, found: list[Detection], index: int, arrived: float, detectors: Sequence[Detector]
    ) -> list[Flag]:
        metrics = self.metrics
        for det in found:
            metrics.detector_score.labels(det.detector, det.category).observe(det.score)
            self._best[det.detector] = max(det.score, self._best.get(det.detector, 0.0))
        flags = evaluator.observe(found, index)
        for flag in flags:
            self._explain(flag, found, detectors)
        self.detections.extend(found)
        self.evaluations.append((index, len(self.detections)))
        if not flags:
            return flags
        self.flags.extend(flags)
        self._checkpoint()
        for flag in flags:  # counted only once the flagged session is durable
            metrics.flags.labels(flag.category, flag.severity, flag.rule).inc()
            if "halt" in flag.actions:
                metrics.halts.labels(flag.rule).inc()
            metrics.flag_latency.observe(self.pipeline.clock() - arrived)
        return flags

    def _explain(self, flag: Flag, found: list[Detection], detectors: Sequence[Detector]) -> None:
        """Attach explainers' evidence for the flagged span to the detections that raised the flag.

        The span is the rule's look-back ending at the flagged token; the evidence goes onto this
        token's detections from the detectors the rule reads (in place in `found`).
        """
        explainers = [d for d in detectors if isinstance(d, Explainer)]
        rule = next((r for r in self.policy.rules if r.name == flag.rule), None)
        if not explainers or rule is None:
            return
        start, end = max(0, flag.index - rule.lookback() + 1), flag.index + 1
        evidence = tuple(e for d in explainers for e in d.explain(flag, start, end))
        if not evidence:
            return
        readers = rule.detectors()
        for i, det in enumerate(found):
            if det.detector in readers:
                found[i] = dataclasses.replace(det, evidence=det.evidence + evidence)

    def _transcript(self, outcome: Outcome, error: str | None = None) -> Transcript:
        p = self.pipeline
        return Transcript(
            session_id=self.session_id,
            model=p.engine.info,
            messages=self.messages,
            steps=tuple(self.steps),
            detections=tuple(self.detections),
            flags=tuple(self.flags),
            outcome=outcome,
            detector_specs=p.specs,
            policy=self.policy.to_dict(),
            started_at=self._started,
            ended_at=p.wall_clock(),
            error=error,
            mode=self.mode,
            request=self.request,
            thresholds=dict(p.thresholds),
            evaluations=tuple(self.evaluations),
        )

    def _record(self, *, sync: bool = False) -> None:
        """Append what the session added to its journal (opened once the spool keeps the session)."""
        if self._spool is None:
            return
        try:
            if self._journal is None:
                if not (self.flags or self._kept_unflagged):
                    return
                self._journal = self._spool.journal(self._transcript("running"))
            else:
                n_steps, n_dets, n_evals, n_flags = self._journaled
                self._journal.extend(
                    self.steps[n_steps:], self.detections[n_dets:], self.evaluations[n_evals:], self.flags[n_flags:]
                )
            self._journaled = (len(self.steps), len(self.detections), len(self.evaluations), len(self.flags))
            if sync:
                self._journal.sync()
        except Exception as exc:  # a full disk must not take the stream down; it is counted and logged
            self.metrics.store_errors.inc()
            self.pipeline.log.error("journal_failed", session_id=self.session_id, error=f"{type(exc).__name__}: {exc}")

    def _checkpoint(self) -> None:
        """Commit the flagged session so far: its journal synced to disk, then every durable sink."""
        self._record(sync=True)
        durable = [sink for sink in self.sinks if isinstance(sink, DurableSink)]
        if durable:
            transcript = self._transcript("running")
            for sink in durable:
                self._deliver(sink, sink.checkpoint, transcript)

    def _deliver(self, sink: Sink, write: Callable[[Transcript], None], transcript: Transcript) -> None:
        try:
            write(transcript)
        except Exception as exc:  # a failing sink must not take the others (or the stream) down
            self.metrics.store_errors.inc()
            self.pipeline.log.error("sink_failed", session_id=self.session_id, sink=type(sink).__name__, error=str(exc))

    def _finish(self, outcome: Outcome, error: str | None) -> None:
        transcript = self._transcript(outcome, error)
        self.transcript = transcript
        self._record()
        if self._journal is not None:
            try:
                self._journal.end(outcome, transcript.ended_at, error, sync=transcript.flagged)
            except Exception as exc:
                self.metrics.store_errors.inc()
                self.pipeline.log.error("journal_failed", session_id=self.session_id, error=f"{type(exc).__name__}: {exc}")
        self.metrics.sessions.labels(outcome).inc()
        for sink in self.sinks:
            self._deliver(sink, sink.write, transcript)
        self.pipeline.log.info("session", **session_summary(transcript))


def mean_scores(t: Transcript, channel: Channel = "reasoning") -> dict[str, float]:
    """Mean score per detector over the tokens of one channel (a transcript-level score)."""
    in_channel = {s.index for s in t.steps if s.channel == channel}
    sums: dict[str, list[float]] = {}
    for det in t.detections:
        if det.start in in_channel:
            sums.setdefault(det.detector, []).append(det.score)
    return {name: sum(v) / len(v) for name, v in sums.items()}


def session_summary(t: Transcript) -> dict[str, Any]:
    """The fields of the canonical per-session log line."""
    return {
        "session_id": t.session_id,
        "model": t.model.model_id,
        "outcome": t.outcome,
        "mode": t.mode,
        "tokens": len(t.steps),
        "reasoning_tokens": sum(1 for s in t.steps if s.channel == "reasoning"),
        "flags": [f.rule for f in t.flags],
        "halted_by": next((f.rule for f in t.flags if "halt" in f.actions), None),
        "max_scores": {k: round(v, 4) for k, v in max_scores(t.detections).items()},
        "duration_s": round(t.ended_at - t.started_at, 4),
        "error": t.error,
    }
