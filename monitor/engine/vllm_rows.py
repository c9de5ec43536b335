"""The vLLM worker's side of per-token readouts, in plain Python and torch (no vllm import).

Each engine step vLLM runs one forward over a flattened batch: the scheduled tokens of every
running request, request after request in the runner's batch order (`input_batch.req_ids`),
`num_scheduled_tokens[req_id]` rows each, the first at position `num_computed_tokens` of its
request. A decode step has one row per request; a prefill (or a chunk of one, with chunked
prefill) has many. Row `r` of a request holds the residual stream after the token at its
position, so a generated token's readouts come from the step that feeds it back (the step that
samples the next token), as the hf engine computes them.

`plan_rows` picks, per request that asked for readouts, the rows at or after the position it
asked from (its generated tokens, or the teacher-forced text after the chat prompt); `readout_rows`
computes the installed readouts on exactly those rows, on the GPU; `encode_batch` and
`decode_batch` are what crosses from the worker to the serving process: per slice the session
key, the first position and a float32 block of values.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from monitor.engine.readout import ReadoutError, ReadoutPlan

EXTRA_ARGS_KEY = "cotmon"
"""`SamplingParams.extra_args[EXTRA_ARGS_KEY] = {"key": session key, "from": first position}`."""
WIRE_VERSION = 1


@dataclass(frozen=True)
class Wanted:
    """A request that asked for readouts (from its sampling params' extra_args)."""

    key: str
    """The session key the frontend registered."""
    start: int
    """First token position to ship: the prompt's length for a generation, the chat prompt's for
    a teacher-forced text."""


@dataclass(frozen=True)
class RowSlice:
    """Consecutive rows of one request in a step's flattened batch."""

    key: str
    row: int
    """Index of the first row in the flattened batch."""
    count: int
    position: int
    """Token position of the first row."""


def wanted_of(extra_args: Mapping[str, object] | None) -> Wanted | None:
    """The request's readout ask from `SamplingParams.extra_args`, or None (it asked nothing)."""
    ask = (extra_args or {}).get(EXTRA_ARGS_KEY)
    if not isinstance(ask, Mapping):
        return None
    key, start = ask.get("key"), ask.get("from")
    if not isinstance(key, str) or not isinstance(start, int) or isinstance(start, bool) or start < 0:
        raise ValueError(f"extra_args[{EXTRA_ARGS_KEY!r}] must be {{'key': str, 'from': int >= 0}}, got {dict(ask)!r}")
    return Wanted(key, start)


def plan_rows(
    req_ids: Sequence[str],
    num_scheduled: Mapping[str, int],
    num_computed: Sequence[int],
    wanted: Mapping[str, Wanted],
) -> list[RowSlice]:
    """The rows to ship this step, in batch order.

    Args:
        req_ids: the requests of the flattened batch, in row order (`input_batch.req_ids`).
        num_scheduled: rows per request this step (`scheduler_output.num_scheduled_tokens`).
        num_computed: per request (same order), the position of its first row
            (`input_batch.num_computed_tokens_cpu`).
        wanted: request id -> its ask; requests not in it are skipped.
    """
    if len(num_computed) < len(req_ids):
        raise ValueError(f"{len(req_ids)} requests but {len(num_computed)} computed-token counts")
    slices, row = [], 0
    for req_id, first in zip(req_ids, num_computed, strict=False):
        count = int(num_scheduled.get(req_id, 0))
        ask = wanted.get(req_id)
        if ask is not None and count > 0:
            skip = max(0, ask.start - int(first))
            if skip < count:
                slices.append(RowSlice(ask.key, row + skip, count - skip, int(first) + skip))
        row += count
    return slices


def row_index(slices: Iterable[RowSlice]) -> list[int]:
    """The flattened-batch rows of `slices`, concatenated in order."""
    return [r for s in slices for r in range(s.row, s.row + s.count)]


def readout_rows(plan: ReadoutPlan, hidden: Mapping[int, torch.Tensor], rows: torch.Tensor) -> torch.Tensor:
    """The plan's readouts on the chosen rows: [len(rows), n] fp32, columns in `plan.names` order.

    Args:
        hidden: cotmon layer (output of decoder block L) -> residual stream of the step [tokens, d_model].
        rows: int64 row indices on the hidden states' device.
    """
    parts = []
    for i, layer in enumerate(plan.layers):
        if layer.layer not in hidden:
            raise ReadoutError(f"layer {layer.layer} was not captured (captured: {sorted(hidden)})")
        parts.append(plan.apply(hidden[layer.layer].index_select(0, rows), i))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)


def encode_batch(slices: Sequence[RowSlice], values: np.ndarray) -> list[bytes]:
    """Two frames: a JSON header (per slice: key, position, rows) and the float32 values [rows, n]."""
    values = np.ascontiguousarray(values, dtype=np.float32)
    rows = sum(s.count for s in slices)
    if values.ndim != 2 or values.shape[0] != rows:
        raise ValueError(f"values have shape {values.shape}, the slices have {rows} rows")
    header = {"v": WIRE_VERSION, "n": int(values.shape[1]), "slices": [[s.key, s.position, s.count] for s in slices]}
    return [json.dumps(header).encode(), values.tobytes()]


@dataclass(frozen=True)
class ShippedRows:
    """Readouts of consecutive positions of one session, as the frontend receives them."""

    key: str
    position: int
    values: np.ndarray
    """[rows, n] float32."""


def decode_batch(frames: Sequence[bytes]) -> list[ShippedRows]:
    """The inverse of `encode_batch`; ValueError on anything else."""
    if len(frames) != 2:
        raise ValueError(f"a readout batch has 2 frames, got {len(frames)}")
    header = json.loads(frames[0])
    if header.get("v") != WIRE_VERSION:
        raise ValueError(f"readout batch version {header.get('v')!r}, this cotmon reads {WIRE_VERSION}")
    n = int(header["n"])
    values = np.frombuffer(frames[1], dtype=np.float32)
    rows = sum(int(count) for _, _, count in header["slices"])
    if values.size != rows * n:
        raise ValueError(f"readout batch holds {values.size} values, its header says {rows} x {n}")
    values = values.reshape(rows, n)
    out, row = [], 0
    for key, position, count in header["slices"]:
        out.append(ShippedRows(str(key), int(position), values[row : row + int(count)]))
        row += int(count)
    return out


Ship = Callable[[Sequence[RowSlice], torch.Tensor], None]


class StepReadouts:
    """What the publishing worker does after each forward: find the rows sessions asked for,
    compute the readouts on them on the device, and hand them to `ship` (the publisher).

    Kept apart from vLLM's classes so that it runs, and is tested, without vllm.
    """

    def __init__(self, plan: ReadoutPlan, ship: Ship):
        self.plan = plan
        self._ship = ship
        self._wanted: dict[str, Wanted | None] = {}

    def forget(self, finished: Iterable[str]) -> None:
        """Drop what is known of finished requests (`scheduler_output.finished_req_ids`)."""
        for req_id in finished:
            self._wanted.pop(req_id, None)

    def after_forward(
        self,
        req_ids: Sequence[str],
        num_scheduled: Mapping[str, int],
        num_computed: Sequence[int],
        extra_args_of: Callable[[str], Mapping[str, object] | None],
        hidden: Mapping[int, torch.Tensor],
    ) -> list[RowSlice]:
        """Ship this step's readouts; returns the slices shipped.

        Args:
            extra_args_of: request id -> its `SamplingParams.extra_args` (read once per request).
            hidden: cotmon layer -> the step's residual stream [tokens (maybe padded), d_model].
        """
        wanted: dict[str, Wanted] = {}
        for req_id in req_ids:
            if req_id not in self._wanted:
                self._wanted[req_id] = wanted_of(extra_args_of(req_id))
            if (ask := self._wanted[req_id]) is not None:
                wanted[req_id] = ask
        slices = plan_rows(req_ids, num_scheduled, num_computed, wanted)
        if slices:
            device = next(iter(hidden.values())).device
            rows = torch.as_tensor(row_index(slices), dtype=torch.long).to(device, non_blocking=True)
            self._ship(slices, readout_rows(self.plan, hidden, rows))
        return slices

    def on_step(
        self, scheduler_output: Any, input_batch: Any, requests: Mapping[str, Any], hidden: Mapping[int, torch.Tensor]
    ) -> list[RowSlice]:
        """`after_forward` from vLLM's own objects, as the V1 model runner holds them after a forward.

        Args:
            scheduler_output: `SchedulerOutput` (num_scheduled_tokens, finished_req_ids).
            input_batch: the runner's `InputBatch` (req_ids, num_reqs, num_computed_tokens_cpu).
            requests: the runner's `requests` (req_id -> CachedRequestState with sampling_params).
        """
        self.forget(scheduler_output.finished_req_ids)
        n = int(input_batch.num_reqs)

        def extra_args_of(req_id: str) -> Mapping[str, object] | None:
            params = getattr(requests.get(req_id), "sampling_params", None)
            return getattr(params, "extra_args", None)

        return self.after_forward(
            list(input_batch.req_ids[:n]),
            scheduler_output.num_scheduled_tokens,
            [int(c) for c in input_batch.num_computed_tokens_cpu[:n]],
            extra_args_of,
            hidden,
        )
