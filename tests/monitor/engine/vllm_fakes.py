"""Stand-ins shaped like vllm 0.33.0's objects, and a tiny vLLM built on them.

The field names follow vLLM's: `SchedulerOutput` (vllm/v1/core/sched/output.py),
`InputBatch` and `CachedRequestState` (vllm/v1/worker/gpu_input_batch.py), `SamplingParams`,
`RequestOutput`/`CompletionOutput` (vllm/outputs.py). `TinyVLLM` plays AsyncLLM plus cotmon's
worker in process: each step it schedules the running requests the way vLLM's scheduler does
(chunked prefills of at most `chunk` tokens beside one-token decodes, in one flattened batch, in
the order it keeps), runs the real tiny model, hands the residual stream of the scheduled rows
to the real `StepReadouts` through `on_step`, which ships through the real `ReadoutPublisher`
over ZMQ, and streams the greedy tokens as DELTA outputs.
"""

from __future__ import annotations

import asyncio
import pickle
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from monitor.engine.hf import HFEngine
from monitor.engine.readout import ActivationCapture, ReadoutPlan, decoder_layers
from monitor.engine.vllm_channel import ReadoutPublisher
from monitor.engine.vllm_rows import StepReadouts


@dataclass
class SamplingParams:
    max_tokens: int | None = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    ignore_eos: bool = False
    extra_args: dict[str, Any] | None = None
    output_kind: Any = None
    thinking_token_budget: int | None = None


@dataclass
class SchedulerOutput:
    scheduled_new_reqs: list[Any]
    scheduled_cached_reqs: Any
    num_scheduled_tokens: dict[str, int]
    total_num_scheduled_tokens: int
    scheduled_spec_decode_tokens: dict[str, list[int]] = field(default_factory=dict)
    scheduled_encoder_inputs: dict[str, list[int]] = field(default_factory=dict)
    finished_req_ids: set[str] = field(default_factory=set)
    free_encoder_mm_hashes: list[str] = field(default_factory=list)


@dataclass
class CachedRequestState:
    req_id: str
    prompt_token_ids: list[int] | None
    sampling_params: SamplingParams | None
    num_computed_tokens: int
    output_token_ids: list[int]


@dataclass
class InputBatch:
    req_ids: list[str]
    num_computed_tokens_cpu: np.ndarray

    @property
    def num_reqs(self) -> int:
        return len(self.req_ids)


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None


@dataclass
class RequestOutput:
    request_id: str
    outputs: list[CompletionOutput]
    finished: bool


@dataclass
class _Running:
    state: CachedRequestState
    params: SamplingParams
    outputs: asyncio.Queue[RequestOutput]

    @property
    def ids(self) -> list[int]:
        return [*(self.state.prompt_token_ids or []), *self.state.output_token_ids]


class TinyVLLM:
    """AsyncLLM's surface (generate, abort, shutdown) over the tiny model; see the module docstring."""

    def __init__(self, hf: HFEngine, worker_config: dict[str, Any], *, chunk: int = 8, eos: frozenset[int] = frozenset()):
        with open(worker_config["readouts"], "rb") as f:
            readouts = pickle.load(f)
        plan = ReadoutPlan(readouts, d_model=hf.info.d_model, n_layers=hf.info.n_layers)
        self.hf = hf
        self.layers = [int(x) for x in worker_config["layers"]]
        self.publisher = ReadoutPublisher(worker_config["address"])
        self.steps = StepReadouts(plan, self.publisher.ship)
        self.chunk, self.eos = chunk, eos
        self.running: dict[str, _Running] = {}
        self.aborted: list[str] = []
        self.generated: dict[str, int] = {}
        """Tokens sampled per request id."""
        self.batches: list[dict[str, int]] = []
        """Rows per request of every step, in batch order."""
        self._finished: set[str] = set()
        self._loop_task: asyncio.Task[None] | None = None

    async def generate(
        self, prompt: dict[str, Any], sampling_params: SamplingParams, request_id: str
    ) -> AsyncGenerator[RequestOutput]:
        state = CachedRequestState(request_id, list(prompt["prompt_token_ids"]), sampling_params, 0, [])
        running = _Running(state, sampling_params, asyncio.Queue())
        self.running[request_id] = running
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.create_task(self._engine_loop())
        while True:
            out = await running.outputs.get()
            yield out
            if out.finished:
                return

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)
        if self.running.pop(request_id, None) is not None:
            self._finished.add(request_id)

    def shutdown(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
        self.publisher.close()

    async def _engine_loop(self) -> None:
        while self.running:
            self._step()
            await asyncio.sleep(0.001)

    def _step(self) -> None:
        # vLLM's V1 runner keeps requests in arrival order and appends new ones; newest first here,
        # so that rows do not follow arrival order by accident.
        batch = list(reversed(self.running.values()))
        scheduled = {}
        for r in batch:
            left = len(r.ids) - r.state.num_computed_tokens
            scheduled[r.state.req_id] = min(self.chunk, left)
        self.batches.append(scheduled)
        hidden_rows: dict[int, list[torch.Tensor]] = {layer: [] for layer in self.layers}
        logits = {}
        for r in batch:
            start, n = r.state.num_computed_tokens, scheduled[r.state.req_id]
            ids = r.ids[: start + n]
            with torch.inference_mode(), ActivationCapture(decoder_layers(self.hf.model), self.layers) as capture:
                out = self.hf.model(input_ids=torch.tensor([ids]), use_cache=False)
            for layer in self.layers:
                hidden_rows[layer].append(capture.activations[layer][0, start : start + n])
            logits[r.state.req_id] = out.logits[0, -1]
        hidden = {layer: torch.cat(rows) for layer, rows in hidden_rows.items()}
        input_batch = InputBatch([r.state.req_id for r in batch], np.array([r.state.num_computed_tokens for r in batch]))
        output = SchedulerOutput(
            scheduled_new_reqs=[],
            scheduled_cached_reqs=None,
            num_scheduled_tokens=scheduled,
            total_num_scheduled_tokens=sum(scheduled.values()),
            finished_req_ids=self._finished,
        )
        self.steps.on_step(output, input_batch, {r.state.req_id: r.state for r in batch}, hidden)
        self._finished = set()
        for r in batch:  # sample where the whole sequence has been computed
            r.state.num_computed_tokens += scheduled[r.state.req_id]
            if r.state.num_computed_tokens < len(r.ids):
                continue
            token = int(torch.argmax(logits[r.state.req_id]))
            r.state.output_token_ids.append(token)
            self.generated[r.state.req_id] = len(r.state.output_token_ids)
            stop = token in self.eos and not r.params.ignore_eos
            done = stop or len(r.state.output_token_ids) >= (r.params.max_tokens or 16)
            reason = ("stop" if stop else "length") if done else None
            r.outputs.put_nowait(RequestOutput(r.state.req_id, [CompletionOutput(0, "", [token], reason)], done))
            if done:
                self.running.pop(r.state.req_id, None)
                self._finished.add(r.state.req_id)
