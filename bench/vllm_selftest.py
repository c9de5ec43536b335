"""The vllm engine on a GPU: its start-up self-test, then throughput with readouts on vs off.

Needs a CUDA GPU and `pip install 'cotmon[vllm]'` (vLLM 0.33.0). Not run in CI; see the README's
"vLLM engine" section for what was measured where.

1. Self-test: the readouts (probe-like random directions on three layers, or the probes in
   --probes) are installed in the vllm engine; a short text is teacher-forced through it and
   through the hf engine on CPU (float32, same weights) and each readout column is compared
   (monitor.engine.selftest). Prints the per-readout table; exits 1 if any disagrees.
2. Overhead: --requests concurrent greedy generations of --tokens tokens each (ignore_eos), in
   three configurations, each in a fresh process (two vLLM instances do not share a GPU):
     stock     vLLM's own AsyncLLM and worker: the baseline
     cotmon-0  cotmon's vllm engine (its worker and frontend) with no readouts installed
     cotmon-N  cotmon's vllm engine with the readouts: the cost of monitoring
   Each is measured --repeats times after a warm-up; the table has the median tokens/s (all
   requests together), the median time per output token of a request, and the ratio to stock.

    python bench/vllm_selftest.py --model deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B
    python bench/vllm_selftest.py --model deepseek-ai/DeepSeek-R1-Distill-Qwen-7B --requests 32 --capture hooks
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from monitor.build import build_engine, load_reader
from monitor.engine.base import EngineError
from monitor.engine.selftest import selftest
from monitor.engine.vllm import VLLMEngine, require_vllm
from monitor.settings import Settings
from monitor.types import AnyReadout, ChatMessage, GenerationRequest, ModelInfo, Readout

PROMPT = (ChatMessage("user", "Plan the database migration step by step and say how you will verify it."),)
CONFIGS = ("stock", "cotmon-0", "cotmon-N")


def random_readouts(info: ModelInfo, columns: int) -> list[AnyReadout]:
    """`columns` probe-like directions spread over three layers (a quarter, half, three quarters deep)."""
    rng = np.random.default_rng(0)
    layers = [info.n_layers // 4, info.n_layers // 2, (3 * info.n_layers) // 4]
    scale = 1.0 / np.sqrt(info.d_model)
    return [
        Readout(f"r{i}", layers[i % 3], (rng.standard_normal(info.d_model) * scale).astype(np.float32), 0.0)
        for i in range(columns)
    ]


def probe_readouts(directory: Path, engine: VLLMEngine) -> list[AnyReadout]:
    from probes.linear import load_probe

    out: list[AnyReadout] = []
    for meta in sorted(directory.glob("*.json")):
        probe = load_probe(meta.with_suffix(""))
        probe.check_fits(engine.info, str(meta), False)
        weight, bias = probe.folded()
        out.append(Readout(meta.stem, probe.meta.layer, weight, bias))
    return out


def settings_for(args: argparse.Namespace) -> Settings:
    """`cotmon serve --engine vllm`'s settings for these options."""
    return Settings.load(
        {},
        engine="vllm",
        model=args.model,
        dtype=args.dtype,
        tensor_parallel_size=args.tp,
        gpu_memory_utilization=args.gpu_memory_utilization,
        max_model_len=args.max_model_len,
        vllm_capture=args.capture,
    )


def engine_for(args: argparse.Namespace) -> VLLMEngine:
    """The vllm engine exactly as `cotmon serve --engine vllm` builds it from these settings."""
    engine = build_engine(settings_for(args))[0]
    assert isinstance(engine, VLLMEngine)
    return engine


async def run_selftest(args: argparse.Namespace) -> int:

    engine = engine_for(args)
    readouts = probe_readouts(args.probes, engine) if args.probes else random_readouts(engine.info, args.columns)
    engine.install(readouts)
    try:
        print(f"self-test: {len(readouts)} readouts on layers {sorted({r.layer for r in readouts})}, capture={args.capture}")
        reference = load_reader(settings_for(args), device="cpu", dtype="float32")
        reference.install(readouts)
        report = await selftest(engine, reference)
        print(report.table())
        print("PASSED" if report.ok else report.message())
        return 0 if report.ok else 1
    finally:
        engine.close()


async def measure(args: argparse.Namespace, config: str) -> dict[str, Any]:
    """One configuration in this process: warm-up, then --repeats timed rounds."""
    if config == "stock":
        from vllm import SamplingParams
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.inputs import tokens_input
        from vllm.sampling_params import RequestOutputKind
        from vllm.v1.engine.async_llm import AsyncLLM

        llm = AsyncLLM.from_engine_args(
            AsyncEngineArgs(
                model=args.model,
                dtype=args.dtype,
                tensor_parallel_size=args.tp,
                gpu_memory_utilization=args.gpu_memory_utilization,
                max_model_len=args.max_model_len,
                enable_prefix_caching=False,
                enforce_eager=args.capture == "hooks",
            )
        )
        tokenizer = llm.get_tokenizer()
        text = tokenizer.apply_chat_template([m.to_dict() for m in PROMPT], add_generation_prompt=True, tokenize=False)
        prompt = tokenizer.encode(text, add_special_tokens=False)

        async def one() -> list[float]:
            params = SamplingParams(max_tokens=args.tokens, temperature=0.0, ignore_eos=True, output_kind=RequestOutputKind.DELTA)
            times = []
            async for out in llm.generate(tokens_input(list(prompt)), params, uuid.uuid4().hex):
                times += [time.perf_counter()] * len(out.outputs[0].token_ids)
            return times

        close = llm.shutdown
    else:
        engine = engine_for(args)
        engine.install(random_readouts(engine.info, args.columns) if config == "cotmon-N" else [])

        async def one() -> list[float]:
            request = GenerationRequest(PROMPT, max_tokens=args.tokens, ignore_eos=True)
            return [time.perf_counter() async for _ in engine.stream(request)]

        close = engine.close
    try:
        await asyncio.gather(*(one() for _ in range(min(4, args.requests))))  # warm-up: graphs, caches
        rates, tpots = [], []
        for _ in range(args.repeats):
            started = time.perf_counter()
            runs = await asyncio.gather(*(one() for _ in range(args.requests)))
            elapsed = time.perf_counter() - started
            rates.append(sum(len(r) for r in runs) / elapsed)
            tpots += [statistics.median(np.diff(r)) for r in runs if len(r) > 2]
        return {"config": config, "tokens_per_s": statistics.median(rates), "tpot_ms": 1000 * statistics.median(tpots)}
    finally:
        close()


def table(results: list[dict[str, Any]]) -> str:
    base = next((r["tokens_per_s"] for r in results if r["config"] == "stock"), None)
    lines = [f"{'config':<10} {'tokens/s':>10} {'TPOT ms':>9} {'vs stock':>9}"]
    for r in results:
        ratio = f"{r['tokens_per_s'] / base:.3f}" if base else "-"
        lines.append(f"{r['config']:<10} {r['tokens_per_s']:>10.1f} {r['tpot_ms']:>9.2f} {ratio:>9}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="Hub id or local path of the model vLLM serves.")
    parser.add_argument("--probes", type=Path, default=None, help="Probe artifacts to self-test [random directions].")
    parser.add_argument("--columns", type=int, default=24, help="Random readout columns (over three layers) [24].")
    parser.add_argument("--capture", choices=("aux", "hooks"), default="aux", help="How the worker reads the residual stream.")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--tp", type=int, default=1, help="Tensor-parallel size.")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--requests", type=int, default=16, help="Concurrent generations per round [16].")
    parser.add_argument("--tokens", type=int, default=256, help="Tokens per generation [256].")
    parser.add_argument("--repeats", type=int, default=3, help="Timed rounds per configuration [3].")
    parser.add_argument("--skip-selftest", action="store_true")
    parser.add_argument("--only", choices=CONFIGS, help=argparse.SUPPRESS)  # a child process measuring one config
    args = parser.parse_args()
    try:
        require_vllm()
        if args.only:
            print(json.dumps(asyncio.run(measure(args, args.only))))
            return 0
        if not args.skip_selftest and asyncio.run(run_selftest(args)) != 0:
            return 1
    except EngineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    results = []
    for config in CONFIGS:  # a fresh process each: the GPU holds one vLLM at a time
        print(f"measuring {config} ...", flush=True)
        child = subprocess.run([sys.executable, *sys.argv, "--only", config], capture_output=True, text=True, check=False)
        if child.returncode != 0:
            print(child.stderr[-3000:], file=sys.stderr)
            return 1
        results.append(json.loads(child.stdout.strip().splitlines()[-1]))
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
