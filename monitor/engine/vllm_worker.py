"""cotmon's vLLM worker: readouts computed on the GPU inside vLLM's own step, per token.

Loaded by vLLM in its engine-core (or worker) processes from
``worker_cls="monitor.engine.vllm_worker.CotmonWorker"``; nothing else imports it, so importing
`monitor` never imports vllm. Written against vllm 0.33.0's V1 model runner (pinned in the
`cotmon[vllm]` extra; the engine sets ``VLLM_USE_V2_MODEL_RUNNER=0``).

Two ways to capture the residual stream (``additional_config["cotmon"]["capture"]``):

- ``aux`` (default): the model's EAGLE-3 auxiliary hidden-state outputs, set for the wanted
  layers before torch.compile and CUDA-graph capture, so the taps are part of the compiled graph.
  Aux output ``k`` is the residual stream after ``k`` decoder layers, so cotmon's layer ``L`` (the
  output of block ``L``) is aux ``L + 1``.
- ``hooks``: forward hooks on the decoder layers (``hidden_states + residual``: vLLM's layers
  return both), the reference path; it needs ``enforce_eager``.

After each forward `StepReadouts` picks the rows sessions asked for and computes their readouts
on the device; the publishing rank (tensor-parallel rank 0 of the last pipeline stage: the
residual stream is the same on every TP rank) ships them to the serving process.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from typing import Any

import torch
from vllm.distributed.parallel_state import get_pp_group, get_tp_group
from vllm.v1.worker.gpu_model_runner import GPUModelRunner
from vllm.v1.worker.gpu_worker import Worker

from monitor.engine.readout import ReadoutPlan, decoder_layers
from monitor.engine.vllm_channel import ReadoutPublisher
from monitor.engine.vllm_rows import StepReadouts

CONFIG_KEY = "cotmon"
"""`vllm_config.additional_config[CONFIG_KEY]`: {"layers", "readouts" (a pickle file of the
readouts), "address" (the serving process's ipc:// socket), "capture" ("aux" | "hooks"),
"d_model", "n_layers"}. additional_config is part of vLLM's compile-cache key, so graphs
compiled with other taps are not reused."""


class CotmonModelRunner(GPUModelRunner):  # type: ignore[misc]
    """vLLM's V1 GPU model runner with cotmon's readouts after every forward."""

    def __init__(self, vllm_config: Any, device: torch.device):
        super().__init__(vllm_config, device)
        self._cotmon_config: Mapping[str, Any] = (vllm_config.additional_config or {})[CONFIG_KEY]
        self._cotmon_layers: tuple[int, ...] = tuple(sorted(int(x) for x in self._cotmon_config["layers"]))
        self._cotmon_capture: str = self._cotmon_config.get("capture", "aux")
        self._cotmon_steps: StepReadouts | None = None
        self._cotmon_hooked: dict[int, torch.Tensor] = {}
        if self._cotmon_capture == "aux" and self._cotmon_layers:
            self.use_aux_hidden_state_outputs = True  # read by load_model's _setup_eagle3_aux_hidden_state_outputs

    def _get_eagle3_aux_layers_from_config(self) -> tuple[int, ...] | None:
        if self._cotmon_capture == "aux" and self._cotmon_layers:
            return tuple(layer + 1 for layer in self._cotmon_layers)
        return super()._get_eagle3_aux_layers_from_config()  # type: ignore[no-any-return]

    def load_model(self, *args: Any, **kwargs: Any) -> None:
        super().load_model(*args, **kwargs)
        if not (get_tp_group().rank_in_group == 0 and get_pp_group().is_last_rank):
            return  # another rank publishes the same residual stream
        with open(self._cotmon_config["readouts"], "rb") as f:
            readouts = pickle.load(f)
        c = self._cotmon_config
        plan = ReadoutPlan(readouts, d_model=int(c["d_model"]), n_layers=int(c["n_layers"]), device=self.device)
        self._cotmon_steps = StepReadouts(plan, ReadoutPublisher(str(c["address"])).ship)
        if self._cotmon_capture == "hooks":
            layers = decoder_layers(self.get_model())
            for layer in self._cotmon_layers:
                layers[layer].register_forward_hook(self._cotmon_hook(layer))

    def _cotmon_hook(self, layer: int) -> Any:
        def hook(module: Any, args: Any, output: Any) -> None:
            hidden, residual = output if isinstance(output, tuple) else (output, None)
            self._cotmon_hooked[layer] = hidden if residual is None else hidden + residual

        return hook

    def execute_model(self, scheduler_output: Any, intermediate_tensors: Any = None) -> Any:
        out = super().execute_model(scheduler_output, intermediate_tensors)
        steps, state = self._cotmon_steps, self.execute_model_state
        # execute_model returns None when a forward ran and sampling follows (sample_tokens).
        if steps is not None and out is None and state is not None and self._cotmon_layers:
            if self._cotmon_capture == "aux":
                hidden = dict(zip(self._cotmon_layers, state.aux_hidden_states or (), strict=True))
            else:
                hidden, self._cotmon_hooked = self._cotmon_hooked, {}
            steps.on_step(scheduler_output, self.input_batch, self.requests, hidden)
        elif steps is not None:
            steps.forget(scheduler_output.finished_req_ids)
        return out


class CotmonWorker(Worker):  # type: ignore[misc]
    """vLLM's GPU worker with `CotmonModelRunner` (vLLM documents `_make_model_runner` as the
    method subclasses override)."""

    def _make_model_runner(self) -> CotmonModelRunner:
        return CotmonModelRunner(self.vllm_config, self.device)
