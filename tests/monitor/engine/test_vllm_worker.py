"""cotmon's vLLM worker glue (monitor/engine/vllm_worker.py) on stand-ins for the vLLM classes it
extends, shaped like vllm 0.33.0's: the aux layer ids it asks for (cotmon layer L is aux L + 1),
the readouts it ships after a forward against the hf engine's own, which rank publishes, and the
hook path's residual sum. The stand-in runner computes its aux outputs as vLLM documents them:
aux k is the residual stream after k decoder layers (HF's output_hidden_states[k])."""

from __future__ import annotations

import asyncio
import importlib
import pickle
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from vllm_fakes import CachedRequestState, InputBatch, SamplingParams, SchedulerOutput

from monitor.engine.hf import HFEngine
from monitor.engine.vllm_channel import ReadoutInbox
from monitor.types import ChatMessage, Readout

MESSAGES = [ChatMessage("user", "Summarise the incident report.")]
TEXT = "The outage began at 09:12 and the fix was deployed at 10:40."


class Group:
    def __init__(self, rank: int, last: bool):
        self.rank_in_group, self.is_last_rank = rank, last


class FakeGPUModelRunner:
    """The surface of vLLM's V1 GPUModelRunner that cotmon's runner uses."""

    group = Group(0, True)

    def __init__(self, vllm_config: Any, device: torch.device):
        self.vllm_config, self.device = vllm_config, device
        self.use_aux_hidden_state_outputs = False
        self.execute_model_state: Any = None
        self.requests: dict[str, CachedRequestState] = {}
        self.input_batch = InputBatch([], np.array([], dtype=np.int32))
        self.aux_layers: tuple[int, ...] = ()

    def _get_eagle3_aux_layers_from_config(self) -> tuple[int, ...] | None:
        return None

    def load_model(self) -> None:
        self.model = self.vllm_config.model
        if self.use_aux_hidden_state_outputs:  # _setup_eagle3_aux_hidden_state_outputs
            self.aux_layers = tuple(sorted(set(self._get_eagle3_aux_layers_from_config() or (2,))))

    def get_model(self) -> Any:
        return self.model

    def execute_model(self, scheduler_output: SchedulerOutput, intermediate_tensors: Any = None) -> Any:
        """Forward of the flattened batch; like vLLM, returns None and keeps the state for sampling."""
        aux: list[list[torch.Tensor]] = [[] for _ in self.aux_layers]
        for req_id, start in zip(self.input_batch.req_ids, self.input_batch.num_computed_tokens_cpu, strict=True):
            n = scheduler_output.num_scheduled_tokens[req_id]
            ids = self.requests[req_id].prompt_token_ids or []
            with torch.inference_mode():
                out = self.model(input_ids=torch.tensor([ids[: start + n]]), output_hidden_states=True, use_cache=False)
            for i, k in enumerate(self.aux_layers):
                aux[i].append(out.hidden_states[k][0, start : start + n])
        padding = [torch.full((3, self.vllm_config.d_model), 1e6) for _ in self.aux_layers]  # CUDA-graph padding rows
        rows = [torch.cat([*parts, pad]) for parts, pad in zip(aux, padding, strict=True)]
        self.execute_model_state = types.SimpleNamespace(aux_hidden_states=rows if self.use_aux_hidden_state_outputs else None)
        return None


class FakeWorker:
    def __init__(self, vllm_config: Any, device: torch.device):
        self.vllm_config, self.device = vllm_config, device


@pytest.fixture
def worker_module(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """monitor.engine.vllm_worker imported over stand-in vllm modules (restored afterwards)."""
    parallel_state = types.ModuleType("vllm.distributed.parallel_state")
    parallel_state.get_tp_group = lambda: FakeGPUModelRunner.group  # type: ignore[attr-defined]
    parallel_state.get_pp_group = lambda: FakeGPUModelRunner.group  # type: ignore[attr-defined]
    runner_module = types.ModuleType("vllm.v1.worker.gpu_model_runner")
    runner_module.GPUModelRunner = FakeGPUModelRunner  # type: ignore[attr-defined]
    worker_module = types.ModuleType("vllm.v1.worker.gpu_worker")
    worker_module.Worker = FakeWorker  # type: ignore[attr-defined]
    for name in ("vllm", "vllm.distributed", "vllm.v1", "vllm.v1.worker"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "vllm.distributed.parallel_state", parallel_state)
    monkeypatch.setitem(sys.modules, "vllm.v1.worker.gpu_model_runner", runner_module)
    monkeypatch.setitem(sys.modules, "vllm.v1.worker.gpu_worker", worker_module)
    monkeypatch.delitem(sys.modules, "monitor.engine.vllm_worker", raising=False)
    yield importlib.import_module("monitor.engine.vllm_worker")
    sys.modules.pop("monitor.engine.vllm_worker", None)
    FakeGPUModelRunner.group = Group(0, True)


def readouts(d_model: int) -> list[Readout]:
    rng = np.random.default_rng(5)
    return [
        Readout("deep", 2, rng.standard_normal(d_model).astype(np.float32), 0.1),
        Readout("shallow", 0, rng.standard_normal(d_model).astype(np.float32), -0.2),
    ]


def runner_for(module: Any, tmp_path: Path, hf: HFEngine, address: str) -> Any:
    path = tmp_path / "readouts.pkl"
    path.write_bytes(pickle.dumps(readouts(hf.info.d_model)))
    config = {
        "layers": [2, 0],
        "readouts": str(path),
        "address": address,
        "capture": "aux",
        "d_model": hf.info.d_model,
        "n_layers": hf.info.n_layers,
    }
    vllm_config = types.SimpleNamespace(additional_config={"cotmon": config}, model=hf.model, d_model=hf.info.d_model)
    worker = module.CotmonWorker(vllm_config, torch.device("cpu"))
    runner = worker._make_model_runner()
    runner.load_model()
    return runner


async def test_the_runner_asks_for_aux_layers_and_ships_the_hf_engines_readouts(worker_module: Any, tmp_path: Path) -> None:
    hf = HFEngine.load("tiny")
    inbox = ReadoutInbox(f"ipc://{tmp_path / 'in.sock'}")
    runner = runner_for(worker_module, tmp_path, hf, inbox.address)
    try:
        assert runner.use_aux_hidden_state_outputs and runner.aux_layers == (1, 3)  # blocks 0 and 2
        prompt = hf.encode(hf.render_prompt(MESSAGES))
        text = hf.encode(TEXT)
        box = inbox.register("s")
        params = SamplingParams(extra_args={"cotmon": {"key": "s", "from": len(prompt)}})
        runner.requests["r-1"] = CachedRequestState("r-1", prompt + text, params, 0, [])
        total, chunk, start = len(prompt) + len(text), 16, 0
        while start < total:  # chunked prefill, as vLLM schedules a long prompt
            n = min(chunk, total - start)
            runner.input_batch = InputBatch(["r-1"], np.array([start], dtype=np.int32))
            assert runner.execute_model(SchedulerOutput([], None, {"r-1": n}, n)) is None
            runner.execute_model_state, start = None, start + n
        deadline = asyncio.get_running_loop().time() + 10
        got: dict[int, np.ndarray] = {}
        while len(got) < len(text) and asyncio.get_running_loop().time() < deadline:
            await asyncio.wait_for(box.arrived.wait(), 10)
            box.arrived.clear()
            while box.rows:
                rows = box.rows.popleft()
                got |= {rows.position + i: row for i, row in enumerate(rows.values)}
        hf.install(readouts(hf.info.d_model))
        want = [step.readouts async for step in hf.teacher_force(MESSAGES, TEXT)]
        assert sorted(got) == list(range(len(prompt), total))
        names = ("shallow", "deep")  # the plan's column order: by layer
        for i, expected in enumerate(want):
            np.testing.assert_allclose(got[len(prompt) + i], [expected[n] for n in names], rtol=1e-4, atol=1e-4)
    finally:
        runner._cotmon_steps._ship.__self__.close()
        inbox.close()


def test_only_tensor_parallel_rank_0_of_the_last_stage_publishes(worker_module: Any, tmp_path: Path) -> None:
    hf = HFEngine.load("tiny")
    FakeGPUModelRunner.group = Group(1, True)
    runner = runner_for(worker_module, tmp_path, hf, f"ipc://{tmp_path / 'unused.sock'}")
    assert runner._cotmon_steps is None
    runner.input_batch = InputBatch([], np.array([], dtype=np.int32))
    assert runner.execute_model(SchedulerOutput([], None, {}, 0)) is None  # runs, ships nothing


def test_the_hook_path_reads_hidden_plus_residual(worker_module: Any, tmp_path: Path) -> None:
    hf = HFEngine.load("tiny")
    FakeGPUModelRunner.group = Group(1, True)  # no publisher needed for the hook itself
    runner = runner_for(worker_module, tmp_path, hf, f"ipc://{tmp_path / 'unused.sock'}")
    hidden, residual = torch.randn(4, 8), torch.randn(4, 8)
    runner._cotmon_hook(2)(None, (), (hidden, residual))
    torch.testing.assert_close(runner._cotmon_hooked[2], hidden + residual)
    runner._cotmon_hook(0)(None, (), hidden)  # a layer that returns the stream alone (transformers 5)
    torch.testing.assert_close(runner._cotmon_hooked[0], hidden)
