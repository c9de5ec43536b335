"""One stream through the pipeline: engine steps -> detectors -> policy, recorded as it goes.

A `Session` is made by `Pipeline` (`generate`, `teacher_force`, `replay`) and iterated step by step;
its `SessionRecorder` journals it and hands it to the sinks. A flag whose rule says `halt` ends the
session right after the step that raised it: the engine is closed before it computes another token.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from collections.abc import AsyncGenerator, Mapping, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry

from monitor.detector import Deferred, Detector, Explainer
from monitor.observability import Metrics
from monitor.policy import Policy, PolicyEvaluator
from monitor.recorder import SessionRecorder
from monitor.types import ChatMessage, Detection, Flag, Mode, Outcome, TraceStep, Transcript

if TYPE_CHECKING:
    from monitor.pipeline import Pipeline


@dataclass(frozen=True)
class StepEvent:
    """What the pipeline saw at one token: the step, its detections, and rules that just fired."""

    step: TraceStep
    detections: tuple[Detection, ...]
    flags: tuple[Flag, ...]


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
        self._recorder = SessionRecorder(self, self.sinks, self.metrics, pipeline.log, pipeline.sink_threads)

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
                    flags = await self._evaluate(evaluator, found, step.index, arrived, detectors)
                    self._recorder.record()
                    yield StepEvent(step, tuple(found), tuple(flags))
                    if any("halt" in f.actions for f in flags):
                        outcome = "halted"
                        break
            if outcome == "completed":
                await self._settle(evaluator, deferred, detectors, p.clock())
            else:
                await self._evaluate(evaluator, self._take_late(), self._last_index(), p.clock(), detectors)
        except GeneratorExit:
            outcome = "aborted"
            raise
        except BaseException as exc:  # cancellation included: the transcript is written regardless
            outcome = "aborted" if isinstance(exc, asyncio.CancelledError | KeyboardInterrupt) else "error"
            error = f"{type(exc).__name__}: {exc}"
            raise
        finally:
            metrics.sessions_active.dec()
            await self._finish(outcome, error)

    def _last_index(self) -> int:
        return self.steps[-1].index if self.steps else 0

    async def _settle(
        self, evaluator: PolicyEvaluator, deferred: Sequence[Deferred], detectors: Sequence[Detector], arrived: float
    ) -> list[Flag]:
        """Wait for detectors with work in flight, then evaluate what they handed in."""
        for d in deferred:
            await d.settle()
        late = self._take_late()
        return await self._evaluate(evaluator, late, self._last_index(), arrived, detectors) if late else []

    async def _evaluate(
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

        def counted() -> None:
            for flag in flags:
                metrics.flags.labels(flag.category, flag.severity, flag.rule).inc()
                if "halt" in flag.actions:
                    metrics.halts.labels(flag.rule).inc()
                metrics.flag_latency.observe(self.pipeline.clock() - arrived)

        await self._recorder.checkpoint(counted)  # counted only once the flagged session is durable
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

    def snapshot(self, outcome: Outcome, error: str | None = None) -> Transcript:
        """The session so far as a transcript, with this outcome."""
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

    async def _finish(self, outcome: Outcome, error: str | None) -> None:
        self.transcript = self.snapshot(outcome, error)
        await self._recorder.finish(self.transcript)
