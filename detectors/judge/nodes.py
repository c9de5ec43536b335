"""The judge graph's nodes: triage (cheap), the LLM judge (costly), verify (quotes), detections."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace

import httpx

from detectors.judge.client import JudgeConfig, JudgeUnavailable, ask_judge
from detectors.judge.quotes import verify_quotes
from detectors.judge.state import JudgeState, Route
from detectors.judge.triage import TriageModel
from detectors.judge.verdicts import CategoryVerdict
from monitor.observability import Metrics
from monitor.types import Detection, Evidence

UNAVAILABLE = "judge_unavailable"
COT_CHARS = 12_000
"""The LLM judge reads at most this many characters of the reasoning so far (its tail)."""


@dataclass
class JudgeNodes:
    """Node functions bound to one detector's configuration."""

    name: str
    triage_model: TriageModel
    config: JudgeConfig | None
    """None: no LLM configured, triage is the detector."""
    categories: tuple[str, ...]
    escalate_at: float
    """Escalate to the LLM when a category's triage probability reaches this."""
    white_box: Mapping[str, float]
    """Detector name -> score at or above which it escalates the window on its own."""
    metrics: Metrics

    async def triage(self, state: JudgeState) -> JudgeState:
        """Score the window with the text classifier and decide whether the LLM is worth calling."""
        scores = (await asyncio.to_thread(self.triage_model.score, [state["window"].text]))[0]  # CPU work off the loop
        triage = {c: float(scores.get(c, 0.0)) for c in self.categories}
        route: Route = "triage_only"
        if self.config is not None:
            text = max(triage.values(), default=0.0) >= self.escalate_at
            probes = any(state.get("white_box", {}).get(n, 0.0) >= bound for n, bound in self.white_box.items())
            route = "escalated" if text or probes else "avoided"
        self.metrics.judge_windows.labels(route).inc()
        return {"triage": triage, "route": route}

    @staticmethod
    def route(state: JudgeState) -> str:
        return "judge" if state["route"] == "escalated" else "done"

    async def judge(self, state: JudgeState) -> JudgeState:
        """Ask the LLM about the CoT so far, within what is left of the window's time (none: not at all)."""
        assert self.config is not None
        window = state["window"]
        left = window.due - time.monotonic()
        if left <= 0:  # earlier windows used up its time: waiting on would delay the session further
            self.metrics.judge_requests.labels("deadline").inc()
            return {"verdict": None, "failure": "deadline"}
        config = replace(self.config, timeout_s=min(self.config.timeout_s, left))
        cot = window.cot[-COT_CHARS:]
        started = time.perf_counter()
        try:
            async with httpx.AsyncClient() as client:
                verdict = await ask_judge(client, config, cot)
        except JudgeUnavailable as exc:
            self.metrics.judge_requests.labels(exc.reason).inc()
            return {"verdict": None, "failure": exc.reason}
        finally:
            self.metrics.judge_latency.observe(time.perf_counter() - started)
        self.metrics.judge_requests.labels("ok").inc()
        return {"verdict": verdict, "failure": None}

    async def verify(self, state: JudgeState) -> JudgeState:
        """Keep only quotes verbatim in the CoT; turn the verdict (or the failure) into detections."""
        w = state["window"]
        verdict = state.get("verdict")
        if verdict is None:
            reason = state.get("failure") or "no verdict"
            unavailable = Detection(
                self.name,
                UNAVAILABLE,
                1.0,
                w.start,
                w.end,
                (Evidence("judge unavailable", f"LLM judge failed: {reason}", kind="unavailable"),),
            )
            return {"detections": [unavailable, *self._triage_detections(state, "judge unavailable: triage only")]}
        kept, dropped = verify_quotes(verdict.verdicts, w.cot)
        self.metrics.judge_dropped_quotes.inc(verdict.dropped_quotes + dropped)
        found = {v.category: v for v in kept if v.category in self.categories}
        return {
            "detections": [
                Detection(self.name, c, v.score, w.start, w.end, (Evidence(f"judge: {c}", _detail(v), v.quotes, "judge"),))
                for c, v in found.items()
            ]
        }

    async def triage_detections(self, state: JudgeState) -> JudgeState:
        why = "triage only" if state["route"] == "triage_only" else "triage: the LLM was not needed"
        return {"detections": self._triage_detections(state, why)}

    def _triage_detections(self, state: JudgeState, why: str) -> list[Detection]:
        w = state["window"]
        backend = self.triage_model.backend
        return [
            Detection(
                self.name, c, p, w.start, w.end, (Evidence(f"triage: {c}", f"{why} ({backend} text classifier)", kind="triage"),)
            )
            for c, p in state["triage"].items()
        ]


def _detail(verdict: CategoryVerdict) -> str:
    """The judge's rationale, and when it made up quotes, that its score was discounted for them."""
    if not verdict.unverified_quotes:
        return verdict.rationale
    return f"{verdict.rationale} [{verdict.unverified_quotes} quote(s) not found in the CoT: score scaled by the share found]"
