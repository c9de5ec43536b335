"""Decode speed with fused readouts vs without, on the hf engine.

For each model: 8 random readout columns on 2 layers (probe-like), greedy decoding of
--tokens tokens, runs alternating off/on so that machine noise hits both alike; prints the
median tokens/s of each and their ratio. Goal: readouts cost <= 5% of decode speed.

    .venv/bin/python bench/overhead.py                 # tiny + a d_model-2048 random model, CPU
    .venv/bin/python bench/overhead.py --device cuda   # same on a GPU
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from monitor.engine.hf import HFEngine
from monitor.engine.tiny import build_model, build_tiny_tokenizer, tiny_config
from monitor.types import ChatMessage, GenerationRequest, ModelInfo, Readout

PROMPT = (ChatMessage("user", "Plan the database migration and report whether the tests passed."),)


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
    request = GenerationRequest(PROMPT, max_tokens=tokens, ignore_eos=True)
    start = time.perf_counter()
    count = 0
    async for _ in engine.stream(request):
        count += 1
    if count != tokens:
        raise RuntimeError(f"decoded {count} tokens, expected {tokens}")
    return count / (time.perf_counter() - start)


async def measure(engine: HFEngine, tokens: int, repeats: int) -> tuple[float, float]:
    readouts = readouts_for(engine.info)
    engine.install([])
    await decode_rate(engine, tokens // 4)  # warm-up
    off, on = [], []
    for _ in range(repeats):
        engine.install([])
        off.append(await decode_rate(engine, tokens))
        engine.install(readouts)
        on.append(await decode_rate(engine, tokens))
    engine.install([])
    return statistics.median(off), statistics.median(on)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tokens", type=int, default=256, help="tokens decoded per run")
    parser.add_argument("--repeats", type=int, default=9, help="runs per mode (median taken)")
    parser.add_argument("--d-model", type=int, default=2048, help="width of the realistic random model")
    parser.add_argument("--layers", type=int, default=4, help="decoder blocks of the realistic random model")
    args = parser.parse_args()
    dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
    tiny = HFEngine.load("tiny", device=args.device, dtype="float32" if args.device == "cpu" else "bfloat16")
    engines = [
        ("tiny", tiny),
        (f"random d_model={args.d_model}", realistic_engine(args.d_model, args.layers, args.device, dtype)),
    ]
    table = Table(title=f"hf engine decode, {args.tokens} tokens/run, median of {args.repeats} alternating runs, {args.device}")
    for col in ("model", "d_model x layers", "readouts", "tok/s off", "tok/s on", "on/off", "slowdown"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for label, engine in engines:
        off, on = asyncio.run(measure(engine, args.tokens, args.repeats))
        table.add_row(
            label,
            f"{engine.info.d_model} x {engine.info.n_layers}",
            "8 cols / 2 layers",
            f"{off:.1f}",
            f"{on:.1f}",
            f"{on / off:.3f}",
            f"{(1 - on / off) * 100:+.1f}%",
        )
    Console(width=120).print(table)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")


if __name__ == "__main__":
    main()
