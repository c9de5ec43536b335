"""Kind `cot_judge`: an LLM judge over the chain of thought, gated by cheap triage, never blocking.

Spec args (all optional):
    url, model        an OpenAI-compatible endpoint (base URL ending in /v1) and model; without a
                      url the detector is triage only (a text classifier, CPU)
    categories        list of names, or {name: definition} for user-defined ones [deception, harmful_planning]
    every             close a window every N reasoning tokens [64]
    paragraphs        also close one at a paragraph boundary (after at least `min_tokens`) [true]
    min_tokens        [16]
    escalate_at       call the LLM when a category's triage probability reaches this [0.25]
    white_box         {detector name: score}: call the LLM when that detector of the same session
                      has reached the score, whatever triage says
    timeout_s, max_retries, max_tokens   of each LLM call [20, 2, 512]
    max_response_bytes  read at most this much of one judge response [262144 = 256 KiB]; a longer
                      one fails the call as response_too_large. Of an answer, at most 8 quotes of
                      500 characters per verdict and a rationale of 1000 are kept (AnswerBounds)
    encoder           triage encoder: auto (bundled all-MiniLM-L6-v2), a local path or hub id, or tfidf

The key comes from the pipeline's context secrets (COTMON_JUDGE_API_KEY), never from the spec,
which is stored with every transcript. Windows close every N tokens, at paragraph boundaries and
at `</think>`; each runs through the graph (detectors.judge.graph) in a task of its own, in order,
and hands its detections to the pipeline through `emit`. A failed LLM call yields a
`judge_unavailable` detection (score 1) plus the triage scores, so a policy chooses fail-open
(ignore it) or fail-closed (a rule on category judge_unavailable with hold/halt).

Each window's verdict is due `timeout_s` after the window closed: a window whose turn comes later
(earlier ones held the judge) is not sent to the LLM but marked `judge_unavailable` (reason
deadline), and a call is cut short at the due time. However many windows queue behind a hung or
slow judge, the session (and a held answer) waits at most about `timeout_s` after its last token.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from detectors.judge.client import DEFAULT_BOUNDS, AnswerBounds, JudgeConfig
from detectors.judge.graph import build_graph
from detectors.judge.nodes import UNAVAILABLE, JudgeNodes
from detectors.judge.prompts import DEFAULT_CATEGORIES
from detectors.judge.state import Window, WindowReason
from detectors.judge.triage import TriageError, TriageModel, load_triage
from monitor.detector import DetectorContext, DetectorError
from monitor.observability import get_logger
from monitor.types import AnyReadout, Detection, DetectorSpec, Evidence, TraceStep

THINK_END = "</think>"


class JudgeDetector:
    """One stream's judge: cuts the reasoning into windows and runs each through the graph."""

    known_args = (
        "url", "model", "categories", "every", "paragraphs", "min_tokens", "escalate_at", "white_box",
        "timeout_s", "max_retries", "max_tokens", "max_response_bytes", "encoder",
    )  # fmt: skip

    def __init__(self, spec: DetectorSpec, context: DetectorContext, nodes: JudgeNodes, args: Mapping[str, Any]):
        self.spec = spec
        self._context = context
        self._graph = build_graph(nodes)
        self._white_box = tuple(nodes.white_box)
        self._every = int(args.get("every", 64))
        self._paragraphs = bool(args.get("paragraphs", True))
        self._min_tokens = int(args.get("min_tokens", 16))
        self._cot: list[str] = []
        self._window: list[str] = []
        self._start: int | None = None
        self._last: asyncio.Task[None] | None = None
        self._closed = False
        self._timeout_s = nodes.config.timeout_s if nodes.config is not None else math.inf

    @classmethod
    def prepare(cls, spec: DetectorSpec, context: DetectorContext) -> Callable[[DetectorContext], JudgeDetector]:
        """Check the spec and load the triage model once; each stream gets its own graph, on its own metrics."""
        args = dict(spec.args)
        where = f"detector {spec.name!r}"
        categories = _categories(args.get("categories"), where)
        for key, low in (("every", 1), ("min_tokens", 1), ("max_retries", 0), ("max_tokens", 1), ("max_response_bytes", 1024)):
            if key in args and (not isinstance(args[key], int) or isinstance(args[key], bool) or args[key] < low):
                raise DetectorError(f"{where}: args.{key} must be an integer >= {low}")
        escalate_at = float(args.get("escalate_at", 0.25))
        white_box = args.get("white_box") or {}
        if not isinstance(white_box, Mapping) or not all(isinstance(v, int | float) for v in white_box.values()):
            raise DetectorError(f"{where}: args.white_box must map detector names to scores")
        config = None
        if args.get("url"):
            if not args.get("model"):
                raise DetectorError(f"{where}: args.model is needed with args.url")
            config = JudgeConfig(
                url=str(args["url"]).rstrip("/"),
                model=str(args["model"]),
                api_key=context.secrets.get("judge_api_key"),
                timeout_s=float(args.get("timeout_s", 20.0)),
                max_retries=int(args.get("max_retries", 2)),
                max_tokens=int(args.get("max_tokens", 512)),
                categories=categories,
                bounds=AnswerBounds(response_bytes=int(args.get("max_response_bytes", DEFAULT_BOUNDS.response_bytes))),
            )
        nodes = JudgeNodes(
            name=spec.name,
            triage_model=_triage(args.get("encoder", "auto"), where),
            config=config,
            categories=tuple(categories),
            escalate_at=escalate_at,
            white_box={str(k): float(v) for k, v in white_box.items()},
            metrics=context.metrics,
        )
        return lambda stream: cls(spec, stream, dataclasses.replace(nodes, metrics=stream.metrics), args)

    def readouts(self) -> Sequence[AnyReadout]:
        return ()

    def calibrated_threshold(self) -> float | None:
        return None

    async def observe(self, step: TraceStep) -> Sequence[Detection]:
        """Never waits for the judge: a closed window is scheduled and judged in the background."""
        if self._closed:
            return ()
        if step.channel == "reasoning":
            if self._start is None:
                self._start = step.index
            tail = self._window[-1][-1:] if self._window else ""
            self._window.append(step.text)
            reason: WindowReason | None = None
            if THINK_END in step.text:
                reason = "end"
            elif len(self._window) >= self._every:
                reason = "tokens"
            elif self._paragraphs and len(self._window) >= self._min_tokens and "\n\n" in tail + step.text:
                reason = "paragraph"
            if reason is not None:
                self._close(step.index + 1, reason)
        if step.channel == "answer" or step.final:
            self._close(step.index, "end")
            self._closed = True
        return ()

    def _close(self, end: int, reason: WindowReason) -> None:
        text = "".join(self._window).replace(THINK_END, "")
        start, self._start, self._window = self._start, None, []
        self._cot.append(text)
        if start is None or not text.strip():
            return
        scores = self._context.scores
        window = Window(start, end, text, "".join(self._cot), reason, due=time.monotonic() + self._timeout_s)
        white_box = {n: scores[n] for n in self._white_box if n in scores}
        previous = self._last
        self._last = asyncio.get_running_loop().create_task(self._judge(window, white_box, previous))

    async def _judge(self, window: Window, white_box: dict[str, float], previous: asyncio.Task[None] | None) -> None:
        if previous is not None:
            await previous  # windows are judged in order; a failure is already a detection
        try:
            state = await self._graph.ainvoke({"window": window, "white_box": white_box})
            found: list[Detection] = list(state.get("detections", []))
        except Exception as exc:  # the judge must never break the stream
            get_logger("cotmon.judge").error("judge_failed", detector=self.spec.name, error=f"{type(exc).__name__}: {exc}")
            evidence = (Evidence("judge unavailable", f"judge failed: {type(exc).__name__}", kind="unavailable"),)
            found = [Detection(self.spec.name, UNAVAILABLE, 1.0, window.start, window.end, evidence)]
        if found and self._context.emit is not None:
            self._context.emit(found)

    async def settle(self) -> None:
        if self._last is not None:
            await self._last


def _triage(encoder: Any, where: str) -> TriageModel:
    if encoder is not None and not isinstance(encoder, str):
        raise DetectorError(f"{where}: args.encoder must be auto, tfidf, a local path or a hub id")
    try:
        return load_triage(encoder)
    except TriageError as exc:
        raise DetectorError(f"{where}: {exc}") from exc


def _categories(raw: Any, where: str) -> dict[str, str]:
    if raw is None:
        return dict(DEFAULT_CATEGORIES)
    if isinstance(raw, list) and all(isinstance(c, str) for c in raw):
        unknown = [c for c in raw if c not in DEFAULT_CATEGORIES]
        if unknown:
            raise DetectorError(f"{where}: categories {unknown} need a definition: give args.categories as {{name: definition}}")
        return {c: DEFAULT_CATEGORIES[c] for c in raw}
    if isinstance(raw, Mapping) and raw and all(isinstance(k, str) and isinstance(v, str) and v for k, v in raw.items()):
        return dict(raw)
    raise DetectorError(f"{where}: args.categories must be a list of known categories or a mapping name -> definition")
