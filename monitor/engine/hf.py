"""The `hf` engine: any transformers causal LM, in process, with fused readouts in forward hooks.

Each generated token is fed back through the model before its step is yielded, so the
readouts of a step are those of the token's own position, exactly what teacher-forcing the
same text computes. The next forward runs only when the consumer asks for the next step:
closing the stream (a halt, a disconnect) stops generation before another token is emitted.

A prompt or text is read `prefill_chunk` tokens per forward, with the lock let go between
chunks: other streams' tokens interleave with a long prefill instead of waiting for all of it,
and a stream cancelled during one stops after the chunk in flight. With the KV cache, chunks give
the readouts of a single forward (to float rounding).

Sessions that decode at the same time share each step's forward (`monitor.engine.batching`):
the weights are read once for all their tokens.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import threading
import uuid
from collections import deque
from collections.abc import AsyncGenerator, Callable, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

import torch
from transformers import DynamicCache

from monitor.engine.batching import DecodeBatch, LoopLocal, PromptCache, Seat, batchable
from monitor.engine.capture import capture, capture_many
from monitor.engine.forcing import ForceBatch, IncrementalForcer, TextBatch
from monitor.engine.models import THINK_INSTRUCTION, ThinkPrompt, load_weights
from monitor.engine.readout import CaptureDone, ReadoutHooks, ReadoutPlan, decoder_layers
from monitor.engine.sampling import Sampler
from monitor.engine.text import (
    THINK_CLOSE,
    THINK_OPEN,
    ChannelTracker,
    IncrementalDecoder,
    eos_ids,
    opens_reasoning,
)
from monitor.engine.tiny import TINY_ID
from monitor.types import AnyReadout, ChatMessage, GenerationRequest, ModelInfo, TraceStep

R = TypeVar("R")

FORCE_BATCH_TOKENS = {"cpu": 4096, "accelerator": 16384}
"""Padded tokens one forward may hold when several teacher-forced texts share it and nothing is
decoding (`monitor.engine.forcing`)."""

PREFILL_CHUNK = {"cpu": 128, "accelerator": 512}
"""Tokens per forward when reading a prompt or text, by device. Another stream waits for at most
one chunk per token it generates: on 2 CPU cores a 128-token chunk of smollm2 takes 0.5-1.5 s
(more deep into a long prompt); an accelerator reads 512 in milliseconds, and needs chunks that
large to be busy. Smaller chunks cost the long prompt some speed (on CPU, 128: ~+50%)."""


class HFEngine:
    """Generation and teacher-forcing with a transformers model; see the module docstring."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        info: ModelInfo,
        think: ThinkPrompt | None = None,
        *,
        prefill_chunk: int | None = None,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.info = info
        self.think = think
        """Set for an instruct model made to reason: see `monitor.engine.models.ThinkPrompt`."""
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        positions = getattr(config, "max_position_embeddings", None)
        self.context_length: int | None = int(positions) if positions else None
        self.device = next(model.parameters()).device
        self.prefill_chunk = prefill_chunk or PREFILL_CHUNK["cpu" if self.device.type == "cpu" else "accelerator"]
        """Tokens per forward when reading a prompt or text (see the module docstring)."""
        self.force_batch_tokens = FORCE_BATCH_TOKENS["cpu" if self.device.type == "cpu" else "accelerator"]
        """Padded tokens one forward may hold when several teacher-forced texts share it."""
        self.blocks = decoder_layers(model)
        """The decoder layers (layer L is `blocks[L]`'s output)."""
        self._plan: ReadoutPlan | None = None
        self._hooks: ReadoutHooks | None = None
        self.lock = threading.Lock()
        """Held for every forward: the hooks write into per-engine buffers, so one forward at a time."""
        self._close_ids: list[int] = tokenizer.encode("\n" + THINK_CLOSE + "\n\n", add_special_tokens=False)
        self._cache_kwarg = cache_kwarg(model)
        self.batching = True
        """Decode concurrent sessions in one forward per step (False: one forward per session and token)."""
        self._batches = LoopLocal(lambda: DecodeBatch(self._forward_rows, self.lock, self.pad_id))
        self._forces = LoopLocal(lambda: ForceBatch(self._read_alone, self._read_together, self._force_budget))
        self.prompts = PromptCache()
        """Recent prompts' KV caches: a prompt seen again is not read again."""

    @classmethod
    def load(
        cls,
        model_id: str = TINY_ID,
        *,
        device: str = "cpu",
        dtype: str = "auto",
        revision: str | None = None,
        seed: int = 0,
        models_dir: Path = Path(".cotmon") / "models",
        think: Literal["auto", "prompt", "off"] = "auto",
        prebuilt_models: Sequence[Path] = (),
    ) -> HFEngine:
        """Load `model_id` onto `device`: `tiny`, a known name (`smollm2`), a `.gguf` file (both
        dequantised once into `models_dir`, or found whole in a read-only `prebuilt_models` folder),
        a local directory or a hub id. `think`: whether the prompt asks the model to reason in a think
        block (auto: when the model is known to need it)."""
        loaded = load_weights(model_id, device, dtype, revision, seed, models_dir, prebuilt_models)
        prompt = {"auto": loaded.think, "prompt": loaded.think or ThinkPrompt(THINK_INSTRUCTION), "off": None}[think]
        return cls(loaded.model, loaded.tokenizer, loaded.info, prompt)

    # -- readouts -----------------------------------------------------------------------------

    def install(self, readouts: Sequence[AnyReadout]) -> None:
        """Compile `readouts` into fused per-layer matrices and hook them; [] removes all hooks."""
        plan = ReadoutPlan(readouts, d_model=self.info.d_model, n_layers=self.info.n_layers, device=self.device)
        with self.lock:
            if self._hooks is not None:
                self._hooks.__exit__(None, None, None)
            self._plan, self._hooks = (plan, ReadoutHooks(self.blocks, plan).__enter__()) if len(plan) else (None, None)

    @property
    def readout_names(self) -> tuple[str, ...]:
        return self._plan.names if self._plan else ()

    # -- tokens ---------------------------------------------------------------------------------

    def render_prompt(self, messages: Sequence[ChatMessage]) -> str:
        chat = [m.to_dict() for m in messages]
        if self.think is not None:  # ask for reasoning first, then open the think block ourselves
            if chat and chat[0]["role"] == "system":
                chat[0] = {"role": "system", "content": f"{chat[0]['content']}\n\n{self.think.instruction}"}
            else:
                chat.insert(0, {"role": "system", "content": self.think.instruction})
        text = str(self.tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False))
        return text + THINK_OPEN + "\n" if self.think is not None and not opens_reasoning(text) else text

    def prompt_opens_reasoning(self, messages: Sequence[ChatMessage]) -> bool:
        return opens_reasoning(self.render_prompt(messages))

    def prompt_tokens(self, messages: Sequence[ChatMessage]) -> int:
        return len(self.encode(self.render_prompt(messages)))

    def text_tokens(self, text: str) -> int:
        return len(self.encode(text))

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    async def prefill(self, input_ids: Sequence[int], cache: DynamicCache) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`_forward` of `input_ids` into `cache`, `prefill_chunk` tokens at a time: the logits of
        the last position and the readouts of every position ([seq, n] or None). The lock is free
        between chunks, and a cancelled caller stops before the next one."""
        parts = await self._chunked(input_ids, lambda ids: self._forward(ids, cache))
        return parts[-1][0], _joined([values for _, values in parts])

    async def read(self, input_ids: Sequence[int], cache: DynamicCache) -> torch.Tensor | None:
        """The readouts [seq, n] of every position of `input_ids` read into `cache`, chunked as
        `prefill`, for a text that is only read (teacher-forcing): the layers above the highest
        readout layer and the output head do not run, so `cache` is fit only for more `read`s."""
        return _joined(await self._chunked(input_ids, lambda ids: self._forward_readouts(ids, cache)))

    async def _chunked(self, input_ids: Sequence[int], forward: Callable[[list[int]], R]) -> list[R]:
        # Up to 4 chunks are read at once: splitting a short text costs more forwards than it saves waiting
        # (calibration and eval texts are short; a stream waits at most one such forward).
        chunk = len(input_ids) if len(input_ids) <= 4 * self.prefill_chunk else self.prefill_chunk
        assert input_ids, "nothing to read"
        starts = range(0, len(input_ids), chunk)
        return [await asyncio.to_thread(forward, list(input_ids[start : start + chunk])) for start in starts]

    def _forward(self, input_ids: list[int], cache: DynamicCache) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits of the last position and readouts of every position ([seq, n] or None)."""
        with self.lock, torch.inference_mode():
            out = self.run_model(torch.tensor([input_ids], device=self.device), cache)
            readouts = self._hooks.collect()[0] if self._hooks is not None else None
            return out.logits[0, -1].float(), readouts

    def _forward_readouts(self, input_ids: list[int], cache: DynamicCache) -> torch.Tensor | None:
        """Readouts of every position ([seq, n] or None), the forward stopped after the highest
        readout layer (the caller wants no logits)."""
        with self.lock, torch.inference_mode():
            self._run_readouts_only(torch.tensor([input_ids], device=self.device), cache)
            return self._hooks.collect()[0] if self._hooks is not None else None

    def run_model(self, ids: torch.Tensor, cache: DynamicCache, **kwargs: Any) -> Any:
        """The model on `ids` [batch, seq] after `cache` (extended in place); logits of the last position."""
        return self.model(input_ids=ids, use_cache=True, logits_to_keep=1, **{self._cache_kwarg: cache}, **kwargs)

    def _run_readouts_only(self, ids: torch.Tensor, cache: DynamicCache) -> None:
        """`run_model`, stopped once the readouts are computed (the caller holds the lock)."""
        if self._hooks is None:
            self.run_model(ids, cache)
            return
        self._hooks.stop = True
        try:
            with contextlib.suppress(CaptureDone):
                self.run_model(ids, cache)
        finally:
            self._hooks.stop = False

    def _forward_rows(
        self, ids: torch.Tensor, cache: DynamicCache, mask: torch.Tensor | None, positions: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One decode step for a batch (the caller holds the lock): logits [B, vocab], readouts [B, n].
        Without a mask it is `_forward`'s call exactly."""
        with torch.inference_mode():
            masked = {} if mask is None else {"attention_mask": mask, "position_ids": positions}
            out = self.run_model(ids, cache, **masked)
            readouts = self._hooks.collect()[:, -1] if self._hooks is not None else None
            return out.logits[:, -1].float(), readouts

    def decode_batch(self) -> DecodeBatch:
        """The batch of this event loop's decoding sessions."""
        return self._batches.get()

    def decode_stats(self) -> tuple[int, int]:
        """(decode forwards, tokens they read) so far over every event loop's batch."""
        batches = self._batches.all()
        return sum(b.steps for b in batches), sum(b.rows_read for b in batches)

    def force_batch(self) -> ForceBatch:
        """This event loop's teacher-forced reads (several texts per forward)."""
        return self._forces.get()

    @property
    def pad_id(self) -> int:
        return int(self.tokenizer.pad_token_id) if self.tokenizer.pad_token_id is not None else 0

    async def _read_alone(self, prompt: list[int], text: list[int]) -> torch.Tensor | None:
        """The readouts [len(text), n] of `text` after `prompt`, read the plain chunked way."""
        values = await self.read(prompt + text, DynamicCache())
        return None if values is None else values[len(prompt) :]

    def _read_together(self, prompts: list[list[int]], texts: list[list[int]]) -> list[torch.Tensor | None]:
        """Several texts after their prompts in one forward (a worker thread): each text's readouts."""
        batch = TextBatch.of(prompts, texts, self.pad_id, self.device)
        with self.lock, torch.inference_mode():
            batch.run(self._run_readouts_only)
            values = self._hooks.collect() if self._hooks is not None else None
        return list(batch.texts_of(values)) if values is not None else [None] * len(texts)

    def _force_budget(self) -> int:
        """Padded tokens a shared teacher-forcing forward may hold: `FORCE_BATCH_TOKENS`, or while
        sessions decode, what one prefill may hold (a decode step waits for at most that)."""
        if self._batches.get().decoding:
            return 4 * self.prefill_chunk
        return self.force_batch_tokens

    async def _read_prompt(self, prompt_ids: list[int]) -> tuple[DynamicCache, torch.Tensor]:
        """The prompt's KV cache and last logits: from the prompt cache, or read (and then kept)."""
        found = self.prompts.get(tuple(prompt_ids))
        if found is not None:
            return found
        cache = DynamicCache()
        logits, _ = await self.prefill(prompt_ids, cache)
        self.prompts.put(tuple(prompt_ids), cache, logits)
        return cache, logits

    def _seat(self, cache: DynamicCache, length: int) -> Seat | None:
        return self.decode_batch().join(cache, length) if self.batching and batchable(cache) else None

    async def _decode(self, seat: Seat | None, token: int, cache: DynamicCache) -> tuple[torch.Tensor, list[float] | None]:
        """Read `token` at the session's next position: its logits and readouts."""
        if seat is not None:
            logits, values = await seat.step(token)
            return logits, None if values is None else values.tolist()
        logits, rows = await asyncio.to_thread(self._forward, [token], cache)
        return logits, _row(rows, 0)

    def make_step(
        self,
        session_id: str,
        index: int,
        token_id: int,
        decoder: IncrementalDecoder,
        tracker: ChannelTracker,
        values: list[float] | None,
        final: bool,
    ) -> TraceStep:
        text = decoder.push(token_id)
        channel = tracker.push(text)
        readouts = dict(zip(self.readout_names, values, strict=True)) if values is not None else {}
        return TraceStep(session_id, index, token_id, text, channel, readouts, final)

    async def stream(self, request: GenerationRequest) -> AsyncGenerator[TraceStep, None]:
        session_id = request.session_id or uuid.uuid4().hex
        prompt_text = self.render_prompt(request.messages)
        decoder, tracker = IncrementalDecoder(self.tokenizer), ChannelTracker(opens_reasoning(prompt_text))
        sampler = Sampler(request, self.device)
        eos = frozenset() if request.ignore_eos else eos_ids(self.tokenizer, getattr(self.model, "generation_config", None))
        prompt_ids = self.encode(prompt_text)
        cache, logits = await self._read_prompt(prompt_ids)
        forced: deque[int] = deque()
        pending = self._unless_stopped_thinking(sampler(logits), eos, tracker, forced)
        budget = request.max_reasoning_tokens
        if budget is None and self.think is not None:
            budget = max(1, min(self.think.budget, request.max_tokens // 2))
        seat = self._seat(cache, len(prompt_ids))
        try:
            for index in range(request.max_tokens):
                if pending in eos:
                    return
                token = pending
                logits, values = await self._decode(seat, token, cache)
                step = self.make_step(session_id, index, token, decoder, tracker, values, final=False)
                final = index + 1 >= request.max_tokens
                if not final:
                    spent = budget is not None and tracker.channel == "reasoning" and tracker.reasoning_tokens >= budget
                    if not forced and spent:
                        forced.extend(self._close_ids)  # reasoning budget spent: close the think block
                    pending = forced.popleft() if forced else self._unless_stopped_thinking(sampler(logits), eos, tracker, forced)
                    final = pending in eos
                yield _finalised(step, final)
                if final:
                    return
        finally:
            if seat is not None:
                seat.leave()

    def _unless_stopped_thinking(self, token: int, eos: frozenset[int], tracker: ChannelTracker, forced: deque[int]) -> int:
        """`token`, unless a prompted model ends its turn inside the think block: then the block is
        closed instead (the first token of the close, the rest queued in `forced`) and it answers."""
        if self.think is None or token not in eos or tracker.channel != "reasoning":
            return token
        forced.extend(self._close_ids[1:])
        return self._close_ids[0]

    def teacher_force(
        self, messages: Sequence[ChatMessage], assistant_text: str, session_id: str = ""
    ) -> AsyncGenerator[TraceStep, None]:
        return self.force_tokens(messages, self.encode(assistant_text), session_id)

    async def force_tokens(
        self, messages: Sequence[ChatMessage], token_ids: Sequence[int], session_id: str = "", *, stepwise: bool = False
    ) -> AsyncGenerator[TraceStep, None]:
        session_id = session_id or uuid.uuid4().hex
        prompt_text = self.render_prompt(messages)
        prompt_ids, text_ids = self.encode(prompt_text), list(token_ids)
        if not text_ids:
            return
        decoder, tracker = IncrementalDecoder(self.tokenizer), ChannelTracker(opens_reasoning(prompt_text))
        last = len(text_ids) - 1
        if stepwise:  # the calls `stream` makes (sharing its decode steps), so the arithmetic is the same
            cache, _ = await self._read_prompt(prompt_ids)
            seat = self._seat(cache, len(prompt_ids))
            try:
                for index, token in enumerate(text_ids):
                    _, values = await self._decode(seat, token, cache)
                    yield self.make_step(session_id, index, token, decoder, tracker, values, index == last)
            finally:
                if seat is not None:
                    seat.leave()
            return
        read = await self.force_batch().read(prompt_ids, text_ids)
        for index, token in enumerate(text_ids):
            yield self.make_step(session_id, index, token, decoder, tracker, _row(read, index), index == last)

    def capture_many(
        self, items: Sequence[tuple[Sequence[ChatMessage], str]], layers: Sequence[int]
    ) -> list[dict[int, torch.Tensor]]:
        """`monitor.engine.capture.capture_many` on this engine (what probe training reads)."""
        return capture_many(self, items, layers)

    def forcer(self, messages: Sequence[ChatMessage], session_id: str) -> IncrementalForcer:
        """Teacher-forcing of a text that arrives in pieces (the upstream mode's reader)."""
        return IncrementalForcer(self, messages, session_id)

    def capture(self, messages: Sequence[ChatMessage], assistant_text: str, layers: Sequence[int]) -> dict[int, torch.Tensor]:
        """`monitor.engine.capture.capture` on this engine (the plain-forward reference)."""
        return capture(self, messages, assistant_text, layers)


def cache_kwarg(model: Any) -> str:
    """The name under which `model.forward` takes its KV cache: `cache` from transformers 5.24
    (which deprecates `past_key_values`), `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _joined(parts: Sequence[torch.Tensor | None]) -> torch.Tensor | None:
    """Chunks' readouts [seq, n] end to end (None without readouts)."""
    present = [p for p in parts if p is not None]
    return torch.cat(present) if present else None


def _row(values: torch.Tensor | None, position: int) -> list[float] | None:
    return None if values is None else values[position].tolist()


def _finalised(step: TraceStep, final: bool) -> TraceStep:
    if not final:
        return step
    return TraceStep(step.session_id, step.index, step.token_id, step.text, step.channel, step.readouts, True)
