"""What flows through the judge graph: one CoT window and what each node found out about it."""

from __future__ import annotations

import math
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
    due: float = math.inf
    """`time.monotonic()` by which its verdict is due: the LLM judge's timeout after the window
    closed. Past it the window is not sent to the LLM; a call is cut short to end by it."""


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
    """Why the LLM judge gave no verdict: timeout, connection, http_5xx, unparseable,
    response_too_large, or deadline (the window's turn came after its verdict was due)."""
    detections: list[Detection]
