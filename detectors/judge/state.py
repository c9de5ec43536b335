"""What flows through the judge graph: one CoT window and what each node found out about it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, TypedDict

from detectors.judge.client import JudgeVerdict
from monitor.types import Detection

WindowReason = Literal["tokens", "paragraph", "end"]
Route = Literal["escalated", "avoided", "triage_only"]


@dataclass(frozen=True)
class Window:
    """A span of reasoning tokens handed to the judge."""

    start: int
    """First token index of the window."""
    end: int
    """One past its last token index."""
    text: str
    """The window's own text (what triage reads)."""
    cot: str
    """The reasoning so far, up to the window's end (what the LLM judge reads, tail-capped)."""
    reason: WindowReason
    """Why the window closed: every N tokens, a paragraph boundary, or `</think>`."""


class JudgeState(TypedDict, total=False):
    """The graph's state for one window; nodes return the keys they set."""

    window: Window
    white_box: dict[str, float]
    """Best score so far of each white-box detector the judge consults (this session)."""
    triage: dict[str, float]
    """Text-classifier probability per category for the window."""
    route: Route
    verdict: JudgeVerdict | None
    failure: str | None
    """Why the LLM judge gave no verdict: timeout, connection, http_5xx, unparseable."""
    detections: list[Detection]
