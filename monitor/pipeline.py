"""One monitored stream: engine -> detectors -> policy -> sinks. Pure async, no HTTP.

A `Pipeline` is built once per process (it installs the detectors' readouts into the engine);
each generation or teacher-forced text is a `Session` (`monitor.session`), iterated step by step.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor
from pathlib import Path
from typing import Any

from monitor.detector import (
    Detector,
    DetectorContext,
    DetectorRegistry,
    default_registry,
    thresholds_of,
)
from monitor.engine.base import Engine
from monitor.observability import Metrics, default_metrics, get_logger
from monitor.policy import Policy, parse_policy
from monitor.recorder import shared_sink_threads
from monitor.session import Session
from monitor.sinks import Sink
from monitor.types import (
    ChatMessage,
    Detection,
    DetectorSpec,
    GenerationRequest,
)


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
        sink_threads: Executor | None = None,
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
        self.sink_threads = sink_threads or shared_sink_threads()
        """Where sessions wait for their journal and sinks (off the event loop)."""
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
