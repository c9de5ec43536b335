"""Turning token ids into text deltas and channels, shared by every engine."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from monitor.types import Channel

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"


def opens_reasoning(prompt_text: str) -> bool:
    """True when the rendered prompt leaves a `<think>` block open (R1 chat templates do)."""
    return prompt_text.rfind(THINK_OPEN) > prompt_text.rfind(THINK_CLOSE)


def eos_ids(tokenizer: Any, *configs: Any) -> frozenset[int]:
    """Token ids that end generation: `eos_token_id` (an id or a list) of each config (a model's
    generation config, its config) and of the tokenizer; None configs are skipped."""
    ids: set[int] = set()
    for source in (*configs, tokenizer):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list):
            ids.update(v for v in value if isinstance(v, int))
    return frozenset(ids)


def partial_tag_length(text: str, tags: Sequence[str] = (THINK_OPEN, THINK_CLOSE)) -> int:
    """Length of the longest tail of `text` that is a proper prefix of one of `tags`.

    Text that may still become a tag is held back until the next piece shows whether it does.
    """
    longest = max((len(t) for t in tags), default=0)
    for n in range(min(len(text), longest - 1), 0, -1):
        tail = text[-n:]
        if any(t.startswith(tail) and t != tail for t in tags):
            return n
    return 0


def compose_assistant_text(reasoning: str, answer: str, prompt_opens_reasoning: bool) -> str:
    """The generated text of an R1-style model: reasoning, `</think>`, then the answer."""
    body = f"{reasoning}\n{THINK_CLOSE}\n\n{answer}"
    return body if prompt_opens_reasoning else f"{THINK_OPEN}\n{body}"


class ChannelTracker:
    """Labels each token `reasoning` or `answer` from the decoded text.

    Reasoning runs up to and including the token that completes `</think>`. A stream that
    starts outside a think block enters one only if `<think>` comes before any other text.
    """

    def __init__(self, in_reasoning: bool):
        self.channel: Channel = "reasoning" if in_reasoning else "answer"
        self._tail = ""
        self._answer_started = False
        self.reasoning_tokens = 0

    def push(self, delta: str) -> Channel:
        text = self._tail + delta
        self._tail = text[-(len(THINK_CLOSE) - 1) :]
        if self.channel == "reasoning":
            self.reasoning_tokens += 1
            if THINK_CLOSE in text:
                self.channel = "answer"
            return "reasoning"
        if not self._answer_started and THINK_OPEN in text:
            self.channel = "reasoning"
            self.reasoning_tokens += 1
            return "reasoning"
        if text.strip() and not THINK_OPEN.startswith(text.strip()):
            self._answer_started = True
        return "answer"


class IncrementalDecoder:
    """Decodes one token at a time into text deltas, holding back incomplete characters.

    Decoding a window that starts a few tokens back keeps tokenizers that merge or strip
    spaces at word boundaries (SentencePiece, byte-level BPE) exact.
    """

    def __init__(self, tokenizer: Any):
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._prefix = 0
        self._read = 0

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        decode = self._tokenizer.decode
        before = decode(self._ids[self._prefix : self._read], skip_special_tokens=False)
        after = decode(self._ids[self._prefix :], skip_special_tokens=False)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self._ids)
            return str(after[len(before) :])
        return ""
