"""The `vllm` engine: generation by vLLM's AsyncLLM, readouts computed inside vLLM's worker.

vLLM generates (continuous batching, paged KV cache, CUDA graphs); cotmon's worker
(`monitor.engine.vllm_worker`, loaded by vLLM as its `worker_cls`) computes the installed
readouts on the GPU in each step and ships only those numbers back over a ZMQ side channel
(`vllm_channel`). This module pairs them with the tokens vLLM streams (`vllm_steps`), so a
stream of `TraceStep`s comes out exactly as from the hf engine: a token's readouts are those of
its own position. Closing a stream (a halt, a disconnect) aborts the vLLM request.

vllm is an optional extra (`pip install 'cotmon[vllm]'`, pinned to the version the worker was
written against); this module imports it only when an engine is loaded. The engine starts on
the first `install` (the captured layers must be known before vLLM compiles the model), and its
readouts are fixed from then on: changing probes means restarting.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import pickle
import tempfile
import uuid
from collections.abc import AsyncGenerator, Callable, Sequence
from pathlib import Path
from typing import Any, Literal

from monitor.engine.base import EngineError
from monitor.engine.readout import ReadoutPlan
from monitor.engine.text import IncrementalDecoder, eos_ids, opens_reasoning
from monitor.engine.vllm_channel import ReadoutInbox
from monitor.engine.vllm_rows import EXTRA_ARGS_KEY
from monitor.engine.vllm_steps import ReadyStep, StepAssembler, TokenChannels
from monitor.types import AnyReadout, ChatMessage, GenerationRequest, ModelInfo, Readout, TraceStep

VLLM_VERSION = "0.33.0"
INSTALL_HINT = f"the vllm engine needs vLLM {VLLM_VERSION} and a CUDA GPU: pip install 'cotmon[vllm]'"
WORKER_CLS = "monitor.engine.vllm_worker.CotmonWorker"
Capture = Literal["aux", "hooks"]

LLMFactory = Callable[[dict[str, Any]], Any]
"""Starts vLLM with cotmon's worker config (additional_config["cotmon"]); returns an AsyncLLM."""
ParamsFactory = Callable[..., Any]
"""SamplingParams(**kwargs) (vLLM's, or a test's stand-in)."""


def require_vllm() -> None:
    """EngineError saying how to install the extra when vllm is not importable."""
    if importlib.util.find_spec("vllm") is None:
        raise EngineError(INSTALL_HINT)


def readout_names(readouts: Sequence[AnyReadout], d_model: int, n_layers: int) -> tuple[str, ...]:
    """The column order the worker's plan computes (validated like the hf engine's)."""
    return ReadoutPlan(readouts, d_model=d_model, n_layers=n_layers, device="cpu").names


class VLLMEngine:
    """An Engine on vLLM; see the module docstring. Build one with `VLLMEngine.load`.

    Args:
        start: starts vLLM given cotmon's worker config.
        sampling_params: builds vLLM SamplingParams.
        tokenizer: the model's tokenizer (chat template, decoding).
        info: model id, revision, width and depth.
        think_ids: (start, end) token ids of the reasoning block, from vLLM's reasoning parser.
        eos: end-of-sequence token ids.
        capture: `aux` (in-graph taps) or `hooks` (eager forward hooks, the reference path).
        readout_timeout_s: how long a token may wait for readouts vLLM has already computed.
    """

    def __init__(
        self,
        start: LLMFactory,
        sampling_params: ParamsFactory,
        tokenizer: Any,
        info: ModelInfo,
        *,
        think_ids: tuple[int | None, int | None] = (None, None),
        eos: frozenset[int] = frozenset(),
        capture: Capture = "aux",
        readout_timeout_s: float = 30.0,
        context_length: int | None = None,
    ):
        self._start = start
        self._params = sampling_params
        self.tokenizer = tokenizer
        self.info = info
        self.context_length = context_length
        """max_model_len, or the model's own when unset (vLLM refuses longer sequences itself too)."""
        self.think_ids = think_ids
        self.eos = eos
        self.capture = capture
        self.readout_timeout_s = readout_timeout_s
        self._dir = Path(tempfile.mkdtemp(prefix="cotmon-vllm-"))
        self._inbox = ReadoutInbox(f"ipc://{self._dir / 'readouts.sock'}")
        self._llm: Any = None
        self._installed: tuple[AnyReadout, ...] | None = None
        self.readout_names: tuple[str, ...] = ()

    @classmethod
    def load(
        cls,
        model_id: str,
        *,
        revision: str | None = None,
        dtype: str = "auto",
        seed: int = 0,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.85,
        max_model_len: int | None = None,
        capture: Capture = "aux",
        reasoning_parser: str = "deepseek_r1",
    ) -> VLLMEngine:
        """The engine for `model_id` (hub id or local path); vLLM itself starts on `install`."""
        require_vllm()
        from transformers import AutoConfig, AutoTokenizer
        from vllm import SamplingParams

        try:
            config = AutoConfig.from_pretrained(model_id, revision=revision)
            tokenizer = AutoTokenizer.from_pretrained(model_id, revision=revision)
        except (OSError, ValueError) as exc:
            raise EngineError(f"cannot load model {model_id!r}: {exc}") from exc
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        rev = revision or getattr(config, "_commit_hash", None) or ("local" if Path(model_id).exists() else "unknown")
        width, depth = int(text.hidden_size), int(text.num_hidden_layers)
        info = ModelInfo(model_id=model_id, revision=str(rev), d_model=width, n_layers=depth)

        def start(worker_config: dict[str, Any]) -> Any:
            os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"  # the worker extends the V1 model runner
            from vllm.engine.arg_utils import AsyncEngineArgs
            from vllm.v1.engine.async_llm import AsyncLLM

            args = AsyncEngineArgs(
                model=model_id,
                revision=revision,
                dtype=dtype,
                seed=seed,
                tensor_parallel_size=tensor_parallel_size,
                gpu_memory_utilization=gpu_memory_utilization,
                max_model_len=max_model_len,
                enforce_eager=capture == "hooks",
                enable_prefix_caching=False,  # a cached prompt token skips the forward, and its readouts
                worker_cls=WORKER_CLS,
                additional_config={"cotmon": worker_config},
                reasoning_parser=reasoning_parser,
            )
            return AsyncLLM.from_engine_args(args)

        return cls(
            start,
            SamplingParams,
            tokenizer,
            info,
            think_ids=_think_ids(reasoning_parser, tokenizer),
            eos=eos_ids(tokenizer, config),
            capture=capture,
            context_length=max_model_len or getattr(text, "max_position_embeddings", None),
        )

    # -- readouts -----------------------------------------------------------------------------

    def install(self, readouts: Sequence[AnyReadout]) -> None:
        """Start vLLM with these readouts (the first call); later calls may only repeat them."""
        names = readout_names(readouts, self.info.d_model, self.info.n_layers)
        if self._llm is not None:
            if _signature(readouts) != _signature(self._installed or ()):
                raise EngineError("the vllm engine's readouts are fixed when it starts: restart cotmon to change them")
            return
        path = self._dir / "readouts.pkl"
        with path.open("wb") as f:
            _pickler(f).dump(list(readouts))
        worker_config = {
            "layers": sorted({r.layer for r in readouts}),
            "readouts": str(path),
            "address": self._inbox.address,
            "capture": self.capture,
            "d_model": self.info.d_model,
            "n_layers": self.info.n_layers,
        }
        self._llm = self._start(worker_config)
        self._installed, self.readout_names = tuple(readouts), names

    @property
    def installed(self) -> tuple[AnyReadout, ...]:
        """The readouts vLLM was started with (none before `install`)."""
        return self._installed or ()

    def close(self) -> None:
        if self._llm is not None and hasattr(self._llm, "shutdown"):
            self._llm.shutdown()
        self._inbox.close()

    # -- tokens ---------------------------------------------------------------------------------

    def render_prompt(self, messages: Sequence[ChatMessage]) -> str:
        return str(
            self.tokenizer.apply_chat_template([m.to_dict() for m in messages], add_generation_prompt=True, tokenize=False)
        )

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def prompt_opens_reasoning(self, messages: Sequence[ChatMessage]) -> bool:
        return opens_reasoning(self.render_prompt(messages))

    def prompt_tokens(self, messages: Sequence[ChatMessage]) -> int:
        return len(self.encode(self.render_prompt(messages)))

    def text_tokens(self, text: str) -> int:
        return len(self.encode(text))

    def stream(self, request: GenerationRequest) -> AsyncGenerator[TraceStep, None]:
        prompt_text = self.render_prompt(request.messages)
        params = {
            # One token more than asked: vLLM feeds a token back only to sample the next, and the
            # readouts of a token come from that forward.
            "max_tokens": request.max_tokens + 1,
            "temperature": request.temperature,
            "top_p": request.top_p,
            "seed": request.seed,
            "ignore_eos": request.ignore_eos,
        }
        if request.max_reasoning_tokens is not None:
            params["thinking_token_budget"] = request.max_reasoning_tokens
        return self._run(
            prompt_text,
            None,
            params,
            session_id=request.session_id or uuid.uuid4().hex,
            max_steps=request.max_tokens,
            eos=frozenset() if request.ignore_eos else self.eos,
        )

    def teacher_force(
        self, messages: Sequence[ChatMessage], assistant_text: str, session_id: str = ""
    ) -> AsyncGenerator[TraceStep, None]:
        return self.force_tokens(messages, self.encode(assistant_text), session_id)

    def force_tokens(
        self, messages: Sequence[ChatMessage], token_ids: Sequence[int], session_id: str = "", *, stepwise: bool = False
    ) -> AsyncGenerator[TraceStep, None]:
        """The text's tokens go in as part of the prompt (one prefill; vLLM samples one token,
        which is dropped). `stepwise` is not available: replays of generated sessions agree with
        the live readouts within the kernels' tolerance, not bit for bit."""
        return self._run(
            self.render_prompt(messages),
            list(token_ids),
            {"max_tokens": 1, "temperature": 0.0},
            session_id=session_id or uuid.uuid4().hex,
            max_steps=len(token_ids),
            eos=frozenset(),
        )

    async def _run(
        self,
        prompt_text: str,
        forced: list[int] | None,
        params: dict[str, Any],
        *,
        session_id: str,
        max_steps: int,
        eos: frozenset[int],
    ) -> AsyncGenerator[TraceStep, None]:
        if self._llm is None:
            raise EngineError("the vllm engine has not started: install its readouts first")
        if max_steps <= 0:
            return
        llm = self._llm
        prompt_ids = self.encode(prompt_text)
        key = uuid.uuid4().hex
        request_id = f"cotmon-{session_id}-{key[:8]}"
        n_values = len(self.readout_names)
        assembler = StepAssembler(len(prompt_ids), max_steps, n_values, eos=eos, forced=forced is not None)
        if forced is not None:
            assembler.add_tokens(forced)
        box = self._inbox.register(key)
        extra_args = {EXTRA_ARGS_KEY: {"key": key, "from": len(prompt_ids)}} if n_values else None
        sampling = self._params(**params, extra_args=extra_args, output_kind=_delta_kind())
        prompt = _tokens_prompt(prompt_ids + (forced or []))

        vllm_finished = False

        async def pump() -> None:
            nonlocal vllm_finished
            try:
                async for out in llm.generate(prompt, sampling, request_id):
                    if forced is None:
                        assembler.add_tokens(out.outputs[0].token_ids)
                    vllm_finished = vllm_finished or bool(out.finished)
                    box.arrived.set()
            finally:
                assembler.finish()
                box.arrived.set()

        task = asyncio.create_task(pump())
        decoder = IncrementalDecoder(self.tokenizer)
        channels = TokenChannels(*self.think_ids, opens_reasoning(prompt_text))
        try:
            while True:
                box.arrived.clear()
                while box.rows:
                    rows = box.rows.popleft()
                    assembler.add_readouts(rows.position, rows.values)
                for ready in assembler.pop_ready():
                    yield self._step(session_id, ready, decoder, channels)
                if assembler.done:
                    return
                if task.done() and task.exception() is not None:
                    raise EngineError(f"vLLM failed: {task.exception()}")
                overdue = assembler.overdue()
                try:
                    await asyncio.wait_for(box.arrived.wait(), self.readout_timeout_s if overdue else None)
                except TimeoutError:
                    raise EngineError(
                        f"readouts of tokens {overdue[:5]} did not come from the vLLM worker within "
                        f"{self.readout_timeout_s:g} s (is cotmon's worker_cls loaded?)"
                    ) from None
        finally:
            self._inbox.unregister(key)
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            if not vllm_finished:  # a halt, a disconnect, or enough tokens: stop generating
                await llm.abort(request_id)

    def _step(self, session_id: str, ready: ReadyStep, decoder: IncrementalDecoder, channels: TokenChannels) -> TraceStep:
        text = decoder.push(ready.token_id)
        channel = channels.push(ready.token_id)
        readouts = dict(zip(self.readout_names, ready.values, strict=True)) if ready.values else {}
        return TraceStep(session_id, ready.index, ready.token_id, text, channel, readouts, ready.final)


def _signature(readouts: Sequence[AnyReadout]) -> tuple[tuple[Any, ...], ...]:
    """What identifies installed readouts (a device readout by its names and layer)."""
    return tuple(
        (r.name, r.layer, r.weight.tobytes(), r.bias, r.threshold) if isinstance(r, Readout) else (r.names, r.layer)
        for r in readouts
    )


def _pickler(f: Any) -> Any:
    """cloudpickle (ships with vLLM) for readouts whose device functions are closures; else pickle."""
    try:
        import cloudpickle

        return cloudpickle.CloudPickler(f)
    except ImportError:
        return pickle.Pickler(f)


def _delta_kind() -> Any:
    with contextlib.suppress(ImportError):
        from vllm.sampling_params import RequestOutputKind

        return RequestOutputKind.DELTA
    return "delta"


def _tokens_prompt(ids: list[int]) -> Any:
    with contextlib.suppress(ImportError):
        from vllm.inputs import tokens_input

        return tokens_input(ids)
    return {"prompt_token_ids": ids}


def _think_ids(parser_name: str, tokenizer: Any) -> tuple[int | None, int | None]:
    """The reasoning block's start and end token ids from vLLM's reasoning parser (None, None
    for a model without them)."""
    from vllm.reasoning import ReasoningParserManager

    try:
        parser = ReasoningParserManager.get_reasoning_parser(parser_name)(tokenizer)
    except Exception:  # a tokenizer without think tokens: the parser refuses it
        return None, None
    return getattr(parser, "start_token_id", None), getattr(parser, "end_token_id", None)
