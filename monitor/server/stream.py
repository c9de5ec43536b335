"""Splitting a step stream into the API's `reasoning` and `content` deltas, tags removed."""

from __future__ import annotations

from collections.abc import Iterable

from monitor.engine.text import THINK_CLOSE, THINK_OPEN, partial_tag_length
from monitor.types import Channel, TraceStep


class DeltaSplitter:
    """Turns (text, channel) per token into (reasoning delta, content delta) with the think tags cut.

    Reasoning text that might be the start of a tag is held back until the next token shows
    whether it is one, so a tag split over several tokens never leaks to the client.
    """

    def __init__(self) -> None:
        self._pending = ""

    def push(self, text: str, channel: Channel) -> tuple[str, str]:
        if channel == "answer":
            reasoning, self._pending = self._pending, ""
            return reasoning, text
        buffered = (self._pending + text).replace(THINK_OPEN, "").replace(THINK_CLOSE, "")
        hold = partial_tag_length(buffered)
        self._pending = buffered[len(buffered) - hold :] if hold else ""
        return buffered[: len(buffered) - hold], ""

    def flush(self) -> str:
        """Reasoning text still held back at the end of the stream."""
        rest, self._pending = self._pending, ""
        return rest


def split_steps(steps: Iterable[TraceStep]) -> tuple[str, str]:
    """The whole (reasoning, content) of a finished stream, tags removed."""
    splitter = DeltaSplitter()
    reasoning, content = [], []
    for step in steps:
        r, c = splitter.push(step.text, step.channel)
        reasoning.append(r)
        content.append(c)
    reasoning.append(splitter.flush())
    return "".join(reasoning), "".join(content)
