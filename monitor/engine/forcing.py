"""Teacher-forcing for the hf engine: texts read several per forward, and texts that arrive in pieces.

Watch mode, `cotmon eval`, replays and probe training all read a known text after its prompt. One
such read is one forward over prompt + text. Several read at the same time share forwards:

- `TextBatch` lays several prompt + text sequences out for one forward. Their common start (the
  system prompt, a shared instruction) is read once and its KV cache repeated over the batch; the
  rest of each sequence is right-padded. Attention is causal, so no real token attends to padding
  and each row's activations are its own (equal to reading it alone, to float rounding).
- `ForceBatch` gathers the reads that arrive while a forward runs and does them in the next one
  (several texts per forward, up to a token budget). A read with nothing to share the forward with
  is the engine's plain chunked read, bit for bit what it was; so is one too long for the budget.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from transformers import DynamicCache

from monitor.engine.text import ChannelTracker, IncrementalDecoder, opens_reasoning, partial_tag_length
from monitor.types import ChatMessage, TraceStep

if TYPE_CHECKING:
    from monitor.engine.hf import HFEngine


def common_prefix(sequences: Sequence[Sequence[int]]) -> int:
    """Length of the longest prefix all `sequences` share."""
    shortest = min(len(s) for s in sequences)
    for i in range(shortest):
        if any(s[i] != sequences[0][i] for s in sequences[1:]):
            return i
    return shortest


@dataclass(frozen=True)
class TextBatch:
    """Prompt + text sequences laid out for one batched forward (see the module docstring)."""

    prefix: list[int]
    """The prompts' common start, read once with batch 1."""
    rows: torch.Tensor
    """[batch, width]: the rest of each sequence, right-padded."""
    starts: list[int]
    """Column of `rows` where each text begins."""
    lengths: list[int]
    """Tokens in each text."""

    @classmethod
    def of(cls, prompts: Sequence[Sequence[int]], texts: Sequence[Sequence[int]], pad: int, device: torch.device) -> TextBatch:
        # Every row keeps at least one prompt token: a row that starts with its text would have no
        # position to attend to but the repeated prefix, which is fine, but an empty row cannot be.
        shared = min(common_prefix(prompts), min(len(p) for p in prompts) - 1)
        rests = [list(p[shared:]) + list(t) for p, t in zip(prompts, texts, strict=True)]
        width = max(len(r) for r in rests)
        rows = torch.tensor([r + [pad] * (width - len(r)) for r in rests], device=device)
        return cls(list(prompts[0][:shared]), rows, [len(p) - shared for p in prompts], [len(t) for t in texts])

    @property
    def padded_tokens(self) -> int:
        return int(self.rows.numel())

    def run(self, forward: Callable[[torch.Tensor, DynamicCache], object]) -> None:
        """`forward(input_ids, cache)` on the prefix (batch 1), then on the rows after it. Whatever
        the caller's hooks keep of the second call is the batch's."""
        cache = DynamicCache()
        if self.prefix:
            forward(torch.tensor([self.prefix], device=self.rows.device), cache)
            cache.batch_repeat_interleave(self.rows.shape[0])
        forward(self.rows, cache)

    def texts_of(self, values: torch.Tensor) -> list[torch.Tensor]:
        """Each text's part of a [batch, width, ...] result of the second forward."""
        return [values[row, start : start + n] for row, (start, n) in enumerate(zip(self.starts, self.lengths, strict=True))]


MAX_PADDING = 0.25
"""Largest share of a shared forward's tokens that may be padding."""


@dataclass(eq=False)
class _Read:
    prompt: list[int]
    text: list[int]
    result: asyncio.Future[torch.Tensor | None]

    @property
    def tokens(self) -> int:
        return len(self.prompt) + len(self.text)


@dataclass(eq=False)
class ForceBatch:
    """The teacher-forced reads of one engine on one event loop (see the module docstring).

    Args:
        alone: reads one prompt and text the engine's usual way: the text's readouts
            [len(text), n], or None without readouts.
        together: reads a `TextBatch` in one forward (called in a worker thread): each text's
            readouts [len(text), n], or Nones.
        budget: padded tokens one shared forward may hold (a longer read goes alone, chunked).
    """

    alone: Callable[[list[int], list[int]], Awaitable[torch.Tensor | None]]
    together: Callable[[list[list[int]], list[list[int]]], list[torch.Tensor | None]]
    budget: Callable[[], int]
    forwards: int = 0
    """Shared forwards run so far (the tests count them)."""
    texts_read: int = 0
    """Texts read in shared forwards so far."""
    _queue: list[_Read] = field(default_factory=list)
    _runner: asyncio.Task[None] | None = None

    async def read(self, prompt: list[int], text: list[int]) -> torch.Tensor | None:
        """Readouts [len(text), n] of `text` read after `prompt` (None without readouts)."""
        if len(prompt) + len(text) > self.budget():  # too long to share a forward: chunked, as always
            return await self.alone(prompt, text)
        read = _Read(prompt, text, asyncio.get_running_loop().create_future())
        self._queue.append(read)
        if self._runner is None or self._runner.done():
            self._runner = asyncio.get_running_loop().create_task(self._run())
        return await read.result

    async def _run(self) -> None:
        while True:
            self._queue = [r for r in self._queue if not r.result.done()]  # cancelled callers went away
            if not self._queue:
                return
            group = self._take()
            try:
                if len(group) == 1:
                    outputs = [await self.alone(group[0].prompt, group[0].text)]
                else:
                    outputs = await asyncio.to_thread(self.together, [r.prompt for r in group], [r.text for r in group])
                    self.forwards += 1
                    self.texts_read += len(group)
            except Exception as exc:  # each caller gets the failure; the next group still runs
                for r in group:
                    if not r.result.done():
                        r.result.set_exception(exc)
                continue
            for r, out in zip(group, outputs, strict=True):
                if not r.result.done():
                    r.result.set_result(out)

    def _take(self) -> list[_Read]:
        """The oldest read and the waiting reads closest to it in length, as many as fit the budget
        with at most `MAX_PADDING` of the forward spent on padding (padding is computed like text)."""
        budget, group = self.budget(), [self._queue.pop(0)]
        for read in sorted(self._queue, key=lambda r: abs(r.tokens - group[0].tokens)):
            longest = max(r.tokens for r in [*group, read])
            padded = longest * (len(group) + 1)
            if padded <= budget and sum(r.tokens for r in [*group, read]) >= (1 - MAX_PADDING) * padded:
                group.append(read)
                self._queue.remove(read)
        return group


class IncrementalForcer:
    """Teacher-forces an assistant text that arrives piece by piece, with a KV cache.

    Only text not yet covered by forwarded tokens is tokenised, and its last token is held
    back (and any tail that may be the start of an added token such as `</think>`), since the
    next piece may change how it tokenises; `finish()` forwards the rest. The
    steps equal those of `teacher_force` on the whole text whenever the pieces tokenise as the
    whole does (always for the tiny model's character-level tokens; for BPE, up to a token
    boundary chosen differently now and then). The text itself is always exact.
    """

    def __init__(self, engine: HFEngine, messages: Sequence[ChatMessage], session_id: str):
        self._engine = engine
        self._session_id = session_id
        prompt_text = engine.render_prompt(messages)
        self._prompt_ids: list[int] | None = engine.encode(prompt_text)
        self._cache = DynamicCache()
        self._text = ""
        self._covered = 0  # characters of _text already forwarded
        self._decoder = IncrementalDecoder(engine.tokenizer)
        self._tracker = ChannelTracker(opens_reasoning(prompt_text))
        self._index = 0
        self._tags = tuple(engine.tokenizer.get_added_vocab())  # `</think>` and friends: one token each

    async def feed(self, text: str) -> list[TraceStep]:
        """Append `text`; return the steps of the tokens that are now settled."""
        self._text += text
        return await self._advance(final=False)

    async def finish(self) -> list[TraceStep]:
        """Forward what is left; the last step returned is final."""
        return await self._advance(final=True)

    async def _advance(self, final: bool) -> list[TraceStep]:
        engine = self._engine
        if self._prompt_ids is not None:
            await engine.read(self._prompt_ids, self._cache)
            self._prompt_ids = None
        end = len(self._text) if final else len(self._text) - partial_tag_length(self._text, self._tags)
        encoded = engine.tokenizer(self._text[self._covered : end], add_special_tokens=False, return_offsets_mapping=True)
        take = len(encoded["input_ids"]) - (0 if final else 1)
        if take <= 0:
            return []
        new = list(encoded["input_ids"][:take])
        self._covered += int(encoded["offset_mapping"][take - 1][1])
        values = await engine.read(new, self._cache)
        steps = []
        for i, token in enumerate(new):
            last = final and i == take - 1
            row = None if values is None else values[i].tolist()
            steps.append(engine.make_step(self._session_id, self._index, token, self._decoder, self._tracker, row, last))
            self._index += 1
        return steps
