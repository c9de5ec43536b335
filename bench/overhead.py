"""Decode speed with fused readouts vs without, on the hf engine.

For each model: 8 random readout columns on 2 layers (probe-like), greedy decoding of
--tokens tokens per run (rate = 1 / median time between tokens), runs alternating off/on in
ABBA order so that machine noise hits both alike. Prints the median tokens/s of each mode,
their ratio, and the host time of the readout work alone per token (fused op per layer, one
transfer, the name->value dict) as a share of a token's time. Goal: <= 5% slowdown.

    .venv/bin/python bench/overhead.py                 # tiny, smollm2 (real) and a d_model-2048 random model, CPU
    .venv/bin/python bench/overhead.py --models smollm2
    .venv/bin/python bench/overhead.py --device cuda   # same on a GPU
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import statistics
import time

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from monitor.build import load_reader
from monitor.engine.hf import HFEngine
from monitor.engine.readout import ReadoutPlan
from monitor.engine.tiny import build_model, build_tiny_tokenizer, tiny_config
from monitor.settings import Settings
from monitor.types import ChatMessage, GenerationRequest, ModelInfo, Readout

PROMPT = (ChatMessage("user", "Plan the database migration and report whether the tests passed."),)


def load_engine(model: str, device: str, dtype: torch.dtype) -> HFEngine:
    """`model` as `cotmon serve` loads it (smollm2 from the dequantised cache under .cotmon/models, where
    `make demo` and the tests leave it)."""
    return load_reader(Settings.load({}, model=model, device=device, dtype=str(dtype).removeprefix("torch.")))


def realistic_engine(d_model: int, n_layers: int, device: str, dtype: torch.dtype) -> HFEngine:
    """A random-init Qwen2 model of realistic width (vocabulary kept tiny: the readout's share is then largest)."""
    tokenizer = build_tiny_tokenizer()
    config = tiny_config(
        len(tokenizer),
        hidden_size=d_model,
        intermediate_size=int(d_model * 2.75) // 64 * 64,
        num_hidden_layers=n_layers,
        num_attention_heads=d_model // 128,
        num_key_value_heads=max(1, d_model // 512),
    )
    model = build_model(config, seed=0).to(device=device, dtype=dtype)
    return HFEngine(model, tokenizer, ModelInfo(f"random-d{d_model}", "random", d_model, n_layers))


def readouts_for(info: ModelInfo, columns: int = 8) -> list[Readout]:
    rng = np.random.default_rng(0)
    layers = [info.n_layers // 3, (2 * info.n_layers) // 3]
    return [
        Readout(f"probe{i}", layers[i % 2], rng.standard_normal(info.d_model).astype(np.float32), 0.0) for i in range(columns)
    ]


async def decode_rate(engine: HFEngine, tokens: int) -> float:
    """Decode tokens/s of one run, from the median time between consecutive steps.

    The median step time is robust to the scheduler hiccups of a shared machine, which land on
    a few tokens and would otherwise decide the whole run's mean.
    """
    request = GenerationRequest(PROMPT, max_tokens=tokens, ignore_eos=True)
    stamps = []
    async for _ in engine.stream(request):
        stamps.append(time.perf_counter())
    if len(stamps) != tokens:
        raise RuntimeError(f"decoded {len(stamps)} tokens, expected {tokens}")
    return 1.0 / statistics.median(b - a for a, b in itertools.pairwise(stamps))


async def measure(engine: HFEngine, tokens: int, repeats: int) -> tuple[float, float]:
    readouts = readouts_for(engine.info)
    engine.install([])
    await decode_rate(engine, tokens // 4)  # warm-up
    rates: dict[bool, list[float]] = {False: [], True: []}
    for rep in range(repeats):
        for with_readouts in (False, True) if rep % 2 == 0 else (True, False):  # ABBA: order effects cancel
            engine.install(readouts if with_readouts else [])
            rates[with_readouts].append(await decode_rate(engine, tokens))
    engine.install([])
    return statistics.median(rates[False]), statistics.median(rates[True])


def readout_cost_us(engine: HFEngine, iterations: int = 2000) -> float:
    """Host time per token of the readout work alone: every layer's fused op, the one transfer, the dict."""
    plan = ReadoutPlan(
        readouts_for(engine.info), d_model=engine.info.d_model, n_layers=engine.info.n_layers, device=engine.device
    )
    hidden = torch.randn(1, 1, engine.info.d_model, device=engine.device, dtype=next(engine.model.parameters()).dtype)
    start = time.perf_counter()
    for _ in range(iterations):
        values = torch.cat([plan.apply(hidden, i) for i in range(len(plan.layers))], dim=-1).cpu()
        dict(zip(plan.names, values[0, 0].tolist(), strict=True))
    return (time.perf_counter() - start) / iterations * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tokens", type=int, default=256, help="tokens decoded per run")
    parser.add_argument("--repeats", type=int, default=9, help="runs per mode (median taken)")
    parser.add_argument("--d-model", type=int, default=2048, help="width of the realistic random model")
    parser.add_argument("--layers", type=int, default=4, help="decoder blocks of the realistic random model")
    parser.add_argument(
        "--models", default="tiny,smollm2,random", help="comma-separated: tiny, smollm2 (the embedded real model), random"
    )
    args = parser.parse_args()
    dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
    load = {
        "tiny": lambda: ("tiny", load_engine("tiny", args.device, dtype)),
        "smollm2": lambda: (
            "smollm2 (real)",
            load_engine("smollm2", args.device, dtype),
        ),
        "random": lambda: (
            f"random d_model={args.d_model}",
            realistic_engine(args.d_model, args.layers, args.device, dtype),
        ),
    }
    wanted = [m.strip() for m in args.models.split(",") if m.strip()]
    if unknown := set(wanted) - set(load):
        parser.error(f"--models: unknown {', '.join(sorted(unknown))} (use tiny, smollm2, random)")
    engines = [load[m]() for m in wanted]
    table = Table(title=f"hf engine decode, {args.tokens} tokens/run, median of {args.repeats} alternating runs, {args.device}")
    columns = ("model", "d_model x layers", "readouts", "tok/s off", "tok/s on", "on/off", "slowdown", "readout µs/token")
    for col in columns:
        table.add_column(col, justify="left" if col == "model" else "right")
    for label, engine in engines:
        off, on = asyncio.run(measure(engine, args.tokens, args.repeats))
        cost = readout_cost_us(engine)
        table.add_row(
            label,
            f"{engine.info.d_model} x {engine.info.n_layers}",
            "8 cols / 2 layers",
            f"{off:.1f}",
            f"{on:.1f}",
            f"{on / off:.3f}",
            f"{(1 - on / off) * 100:+.1f}%",
            f"{cost:.0f} ({cost * 1e-6 * off * 100:.2f}% of a token)",
        )
    Console(width=120).print(table)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")


if __name__ == "__main__":
    main()
