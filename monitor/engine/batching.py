"""Continuous batching for the hf engine: every decoding session's next token in one forward.

At batch 1 a decode step reads all the weights for one token, so on a memory-bound machine N
streams one after another share one stream's speed. A `DecodeBatch` keeps the KV caches of the
sessions that are decoding in one left-padded batch cache and runs one forward per step for every
session that has handed in its next token. Sessions join (after their own prefill) and leave
between steps; a session that has not handed in a token when a step starts (its consumer is busy,
e.g. waiting for the judge) sits that step out: its row gets a masked pad token, so its cache and
positions do not move and the others do not wait. Rows are mapped back to sessions by seat, as
the vllm worker does for its flattened batch (`monitor.engine.vllm_rows`).

Exactness: each row attends only to its own tokens (the attention mask) at its own positions
(position ids), so logits and readouts equal a session run alone to float rounding (~1e-6 in
float32); a lone session with no padding runs the very call the engine makes unbatched, so it is
bit for bit what it always was (replays of such sessions stay exact).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import torch
from transformers import DynamicCache

STRAGGLER_WAIT = 0.002
"""Seconds a step waits for seats that have not handed in their token yet (their consumer is
still busy with the last step); after that they sit the step out. Measured with 32 clients on the
real model, steps read 31.0 rows on average (`bench/serve.py`'s rows/step): sit-outs are rare."""

Forward = Callable[..., tuple[torch.Tensor, torch.Tensor | None]]
"""(input_ids [B, 1], cache, attention_mask or None, position_ids or None) -> (logits [B, vocab], readouts [B, n] or None)."""


@dataclass(eq=False)
class Seat:
    """One session's place in the batch; `step` feeds it a token, `leave` frees the place."""

    batch: DecodeBatch
    cache: DynamicCache | None
    """The session's own cache until the batch takes it in."""
    length: int
    """Tokens in the session's cache (its next position)."""
    token: int | None = None
    result: asyncio.Future[tuple[torch.Tensor, torch.Tensor | None]] | None = None
    row: int = -1
    left: bool = field(default=False)

    async def step(self, token: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Read `token` at this session's next position: its logits [vocab] and readouts [n] (or None)."""
        if self.left:
            raise RuntimeError("this seat has left the batch")
        self.result = asyncio.get_running_loop().create_future()
        self.token = token
        self.batch._handed_in()
        try:
            return await self.result
        except asyncio.CancelledError:
            self.token = None  # not read yet, or read for nothing: the session is going away
            raise

    def leave(self) -> None:
        if not self.left:
            self.left = True
            self.token = None
            self.batch._handed_in()


class DecodeBatch:
    """The decoding sessions of one engine (see the module docstring).

    Args:
        forward: runs one batched forward under the engine's lock (in a worker thread).
        lock: the engine's lock; the batch cache is rebuilt under it too.
        pad_id: the token id a row that sits a step out reads (masked: it affects nothing).
    """

    def __init__(self, forward: Forward, lock: threading.Lock, pad_id: int):
        self._forward, self._lock, self._pad_id = forward, lock, pad_id
        self._seats: list[Seat] = []  # in row order; seats not yet in the cache have row -1
        self._cache: DynamicCache | None = None
        self._mask: torch.Tensor | None = None  # [rows, cache length]: 1 where a row has a real token
        self._wake: asyncio.Event | None = None
        self._runner: asyncio.Task[None] | None = None
        self.steps = 0
        """Forwards run so far (the tests count them)."""
        self.rows_read = 0
        """Tokens read so far over all rows: rows_read / steps is the mean batch size."""

    @property
    def decoding(self) -> bool:
        """Whether any session holds a seat."""
        return any(not s.left for s in self._seats)

    def join(self, cache: DynamicCache, length: int) -> Seat:
        """A seat for a session whose prompt is in `cache` (`length` tokens, batch 1)."""
        seat = Seat(self, cache, length)
        self._seats.append(seat)
        if self._runner is None or self._runner.done():
            self._wake = asyncio.Event()
            self._runner = asyncio.get_running_loop().create_task(self._run())
        return seat

    def _handed_in(self) -> None:
        if self._wake is not None:
            self._wake.set()

    async def _run(self) -> None:
        try:
            await self._serve()
        except BaseException as exc:  # never leave a seat waiting for a step that will not come
            for s in self._seats:
                if s.result is not None and not s.result.done():
                    s.result.set_exception(exc if isinstance(exc, Exception) else RuntimeError("decode batch stopped"))
            raise

    async def _serve(self) -> None:
        assert self._wake is not None
        while True:
            self._seats = [s for s in self._seats if not s.left or s.row >= 0]
            if not any(not s.left for s in self._seats):
                if any(s.row >= 0 for s in self._seats):
                    await asyncio.to_thread(self._rebuild)  # drop the rows of seats that left
                    continue  # a session may have joined meanwhile
                return  # nothing in between: a later join starts a new runner
            if not any(s.token is not None for s in self._seats):
                self._wake.clear()
                await self._wake.wait()
                continue
            # Consumers that are about to hand in a token get a moment, so that they share this step.
            deadline = asyncio.get_running_loop().time() + STRAGGLER_WAIT
            while any(not s.left and s.token is None for s in self._seats):
                remaining = deadline - asyncio.get_running_loop().time()
                if remaining <= 0:
                    break
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), remaining)
            active = [s for s in self._seats if s.token is not None and not s.left]
            if not active:
                continue
            tokens = {id(s): s.token for s in active}
            for s in active:
                s.token = None
            try:
                outputs = await asyncio.to_thread(self._step, active, tokens)
            except BaseException as exc:
                for s in active:
                    if s.result is not None and not s.result.done():
                        s.result.set_exception(exc if isinstance(exc, Exception) else RuntimeError(str(exc)))
                if isinstance(exc, asyncio.CancelledError):
                    raise
                continue
            for s, out in zip(active, outputs, strict=True):
                if s.result is not None and not s.result.done():
                    s.result.set_result(out)

    # -- in the worker thread, under the engine lock ---------------------------------------------

    def _rebuild(self) -> None:
        """Take new seats into the batch cache and drop the rows of seats that left."""
        with self._lock:
            self._rebuild_locked()

    def _rebuild_locked(self) -> None:
        keep = [s for s in self._seats if s.row >= 0 and not s.left]
        new = [s for s in self._seats if s.row < 0 and not s.left]
        gone = [s for s in self._seats if s.row >= 0 and s.left]
        if not new and not gone:
            return
        layers: list[list[tuple[torch.Tensor, torch.Tensor]]] = []  # per part (kept rows, each new seat), per layer
        masks: list[torch.Tensor] = []
        if keep and self._cache is not None and self._mask is not None:
            rows = torch.tensor([s.row for s in keep])
            layers.append([(k[rows], v[rows]) for k, v in _tensors(self._cache)])
            masks.append(self._mask[rows])
        for s in new:
            assert s.cache is not None
            layers.append(_tensors(s.cache))
            masks.append(torch.ones(1, s.length, dtype=torch.long))
            s.cache = None
        for s in gone:
            s.row = -1
        if not masks:
            self._cache, self._mask = None, None
            return
        width = max(m.shape[1] for m in masks)
        mask = torch.cat([torch.nn.functional.pad(m, (width - m.shape[1], 0)) for m in masks])
        columns = []
        for i in range(len(layers[0])):
            keys = [_left_pad(part[i][0], width) for part in layers]
            values = [_left_pad(part[i][1], width) for part in layers]
            columns.append((torch.cat(keys), torch.cat(values)))
        # Columns no row uses any more (the longest sessions left) go.
        start = int((mask.sum(0) > 0).nonzero()[0]) if bool(mask.any()) else 0
        self._mask = mask[:, start:]
        self._cache = DynamicCache(ddp_cache_data=[(k[:, :, start:], v[:, :, start:]) for k, v in columns])
        for row, s in enumerate(keep + new):
            s.row = row

    def _step(self, active: list[Seat], tokens: dict[int, int | None]) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        with self._lock:
            self._rebuild_locked()
            seats = [s for s in self._seats if s.row >= 0]
            seats.sort(key=lambda s: s.row)
            assert self._cache is not None and self._mask is not None
            device = _tensors(self._cache)[0][0].device
            reading = torch.tensor([id(s) in tokens for s in seats], dtype=torch.long)
            ids = torch.tensor([[self._pad_id if tokens.get(id(s)) is None else tokens[id(s)]] for s in seats], device=device)
            lone = len(seats) == 1 and bool(self._mask.all())
            if lone:  # the engine's unbatched call: bit for bit what a session alone always got
                logits, values = self._forward(ids, self._cache, None, None)
                self._mask = torch.cat([self._mask, torch.ones(1, 1, dtype=torch.long)], dim=1)
            else:
                self._mask = torch.cat([self._mask, reading[:, None]], dim=1)
                positions = torch.tensor([[s.length] for s in seats], device=device)
                logits, values = self._forward(ids, self._cache, self._mask.to(device), positions)
            self.steps += 1
            self.rows_read += len(active)
            for s in active:
                s.length += 1
            return [(logits[s.row], None if values is None else values[s.row]) for s in active]


T = TypeVar("T")


class LoopLocal(Generic[T]):
    """One `T` per running event loop (batches hold futures and tasks of their own loop)."""

    def __init__(self, make: Callable[[], T]):
        self._make = make
        self._items: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, T] = weakref.WeakKeyDictionary()

    def get(self) -> T:
        loop = asyncio.get_running_loop()
        item = self._items.get(loop)
        if item is None:
            item = self._items[loop] = self._make()
        return item

    def all(self) -> list[T]:
        """The `T` of every loop still alive."""
        return list(self._items.values())


def _tensors(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each layer's (keys, values), [batch, heads, seq, dim]."""
    layers: Any = cache.layers
    return [(layer.keys, layer.values) for layer in layers]


def _left_pad(t: torch.Tensor, width: int) -> torch.Tensor:
    """[batch, heads, seq, dim] padded with zeros on the left of seq to `width`."""
    return torch.nn.functional.pad(t, (0, 0, width - t.shape[2], 0))


def batchable(cache: Any) -> bool:
    """Whether a model's KV cache can be merged into a left-padded batch: plain full-attention layers
    (a sliding-window or recurrent layer keeps state that padding would corrupt)."""
    return all(type(layer).__name__ == "DynamicLayer" for layer in getattr(cache, "layers", ()))


class PromptCache:
    """The KV caches of recent prompts, so that a prompt seen again (agents resend theirs, clients
    retry, a benchmark repeats one) is not read again: an exact match by token ids gives a copy of
    the cache and the last position's logits, bit for bit what reading the prompt computes.

    Args:
        entries: prompts kept (least recently used out first).
        max_tokens: longer prompts are not kept (their caches are large and rarely repeat).
    """

    def __init__(self, entries: int = 8, max_tokens: int = 4096):
        self.entries, self.max_tokens = entries, max_tokens
        self._kept: dict[tuple[int, ...], tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]] = {}
        self._lock = threading.Lock()
        self.hits = 0

    def get(self, prompt: tuple[int, ...]) -> tuple[DynamicCache, torch.Tensor] | None:
        with self._lock:
            found = self._kept.pop(prompt, None)
            if found is None:
                return None
            self._kept[prompt] = found  # most recently used last
            self.hits += 1
        layers, logits = found
        return DynamicCache(ddp_cache_data=[(k.clone(), v.clone()) for k, v in layers]), logits.clone()

    def put(self, prompt: tuple[int, ...], cache: DynamicCache, logits: torch.Tensor) -> None:
        if not 0 < len(prompt) <= self.max_tokens or not batchable(cache):
            return
        copy = [(k.clone(), v.clone()) for k, v in _tensors(cache)]
        with self._lock:
            self._kept[prompt] = (copy, logits.clone())
            while len(self._kept) > self.entries:
                del self._kept[next(iter(self._kept))]
