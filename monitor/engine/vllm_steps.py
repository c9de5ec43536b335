"""The serving process's side of the vLLM engine, in plain Python: pairing the tokens vLLM streams
with the readouts its worker ships, and labelling channels by token id.

Tokens and readouts travel separately (tokens through vLLM's output path, readouts through
cotmon's side channel) and arrive in either order. A generated token's readouts come from the
step that feeds it back, which also samples the next token: so token `k` is ready when its
readouts are in and the next token (or the end of the request) says whether `k` is the last.
The last token vLLM outputs is never fed back; cotmon asks vLLM for one token more than the
request's `max_tokens`, so every token it emits has been fed, and drops an end-of-sequence token
as the hf engine does.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from monitor.types import Channel


@dataclass(frozen=True)
class ReadyStep:
    """A token with everything its TraceStep needs."""

    index: int
    token_id: int
    values: tuple[float, ...] | None
    """Readout values in the installed order; None when vLLM never fed the token back (a request
    cut short by the model's length limit)."""
    final: bool


@dataclass
class StepAssembler:
    """Orders tokens and readouts into steps; see the module docstring.

    Args:
        first_position: position of token 0 (the prompt's length in tokens).
        max_steps: steps to emit at most (the request's max_tokens).
        n_values: readout columns per token; 0 when nothing is installed.
        eos: token ids that end generation (dropped, like the hf engine; empty with ignore_eos).
        forced: the tokens are a teacher-forced text, all given at once and all fed through the
            model (in the prompt): every one gets readouts.
    """

    first_position: int
    max_steps: int
    n_values: int
    eos: frozenset[int] = frozenset()
    forced: bool = False
    tokens: list[int] = field(default_factory=list)
    finished: bool = False
    _values: dict[int, tuple[float, ...]] = field(default_factory=dict)
    _emitted: int = 0
    _end: int | None = None
    """Index of the first end-of-sequence token, once one has come."""

    def add_tokens(self, token_ids: Iterable[int]) -> None:
        for token in token_ids:
            if self._end is None and token in self.eos:
                self._end = len(self.tokens)
            self.tokens.append(int(token))

    def add_readouts(self, position: int, values: np.ndarray) -> None:
        """Rows of consecutive positions from `position`; a repeated position (vLLM recomputes a
        preempted request) keeps its first values."""
        for offset, row in enumerate(np.asarray(values, dtype=np.float64)):
            index = position + offset - self.first_position
            if index >= 0:
                self._values.setdefault(index, tuple(float(v) for v in row))

    def finish(self) -> None:
        """vLLM finished the request: whatever is left becomes ready."""
        self.finished = True

    @property
    def kept(self) -> int:
        """Tokens that become steps: up to max_steps, up to the first end-of-sequence token."""
        count = min(len(self.tokens), self.max_steps)
        return count if self._end is None else min(count, self._end)

    @property
    def done(self) -> bool:
        """Every step has been emitted (or there will be none)."""
        kept = self.kept
        ended = self.finished or kept < len(self.tokens) or kept >= self.max_steps
        return ended and self._emitted >= kept

    def overdue(self) -> list[int]:
        """Tokens held back for readouts vLLM has already computed (a later token exists, or a
        forced text's request finished) but which have not arrived."""
        late = self.forced and self.finished
        return [
            i
            for i in range(self._emitted, self.kept)
            if self._needs_values(i) and i not in self._values and (late or i + 1 < len(self.tokens))
        ]

    def pop_ready(self) -> list[ReadyStep]:
        """The steps that can be emitted now, in order."""
        ready: list[ReadyStep] = []
        kept = self.kept
        while self._emitted < kept:
            i = self._emitted
            last_known = i + 1 >= len(self.tokens)
            final = i + 1 >= kept and (not last_known or self.finished or i + 1 >= self.max_steps)
            if not final and last_known:
                break  # whether it is the last step is not known yet
            if self._needs_values(i) and i not in self._values:
                break
            values = self._values.pop(i, None) if self.n_values else ()
            ready.append(ReadyStep(i, self.tokens[i], values, final))
            self._emitted += 1
        return ready

    def _needs_values(self, index: int) -> bool:
        # A token followed by another was fed back, and one vLLM is still generating after will
        # be: its readouts are coming. Only the last token of a finished request never was.
        return self.n_values > 0 and (self.forced or index + 1 < len(self.tokens) or not self.finished)


class TokenChannels:
    """Labels tokens `reasoning` or `answer` by id, as vLLM's reasoning parsers split them.

    Reasoning runs up to and including the end token (`</think>`). A stream that starts outside a
    think block enters one when the start token comes first. Without an end token id (a model
    with no think tokens) every token is `answer` unless the prompt opened reasoning.
    """

    def __init__(self, start_id: int | None, end_id: int | None, in_reasoning: bool):
        self.start_id, self.end_id = start_id, end_id
        self.channel: Channel = "reasoning" if in_reasoning else "answer"
        self._first = True
        self.reasoning_tokens = 0

    def push(self, token_id: int) -> Channel:
        first, self._first = self._first, False
        if self.channel == "answer" and first and token_id == self.start_id:
            self.channel = "reasoning"
        if self.channel == "reasoning":
            self.reasoning_tokens += 1
            if token_id == self.end_id:
                self.channel = "answer"
            return "reasoning"
        return "answer"


def channels_of(token_ids: Sequence[int], start_id: int | None, end_id: int | None, in_reasoning: bool) -> list[Channel]:
    """TokenChannels over a whole sequence."""
    tracker = TokenChannels(start_id, end_id, in_reasoning)
    return [tracker.push(t) for t in token_ids]
