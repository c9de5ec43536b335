"""Activation-extraction throughput: captured assistant-text tokens per second, on the hf engine.

Workload: the first --items bundled deception contrast items, each teacher-forced after its
messages with --layers captured per forward (default n_layers//3 and 2*n_layers//3), for the
tiny model, the embedded real model (smollm2) and a random-init Qwen2 of realistic width. Modes:

  one at a time   HFEngine.capture per item: one plain forward each
  batch N         probes.train.capture_all with N items per forward, as probe training extracts:
                  texts sorted by length, the prompts' common start computed once, right-padded

A pass over all items is timed --repeats times; the table shows the total captured tokens per
pass and the median tokens/s and items/s. Before timing, the batched activations of the shortest
and longest item (so padding is exercised) are checked against the one-at-a-time ones.

    .venv/bin/python bench/extract.py                  # tiny, smollm2, a d_model-2048 random model, CPU, fp32
    .venv/bin/python bench/extract.py --device cuda    # same on a GPU (bf16 unless --dtype float32)
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence
from unittest.mock import patch

import torch
from overhead import load_engine, realistic_engine  # bench/overhead.py: the script's own directory is on sys.path
from rich.console import Console
from rich.table import Table

from monitor.engine.hf import HFEngine
from monitor.engine.models import resolve_dtype
from probes import train
from probes.datasets import LabelledText, load_contrast


def extract_pass(engine: HFEngine, items: Sequence[LabelledText], layers: Sequence[int], batch: int) -> int:
    """Capture every item once; returns the number of assistant-text tokens captured."""
    if batch <= 1:
        return sum(engine.capture(item.messages, item.text, layers)[layers[0]].shape[0] for item in items)
    pairs = [(item.messages, item.text) for item in items]
    with patch.object(train, "BATCH", batch):
        return sum(acts[layers[0]].shape[0] for acts in train.capture_all(engine, pairs, layers))


def measure(
    engine: HFEngine, items: Sequence[LabelledText], layers: Sequence[int], batch: int, repeats: int
) -> tuple[int, float, float]:
    """(tokens per pass, median tokens/s, median items/s) over `repeats` timed passes after a warm-up."""
    extract_pass(engine, items[: max(batch, 2)], layers, batch)  # warm-up: allocator, kernels, thread pool
    seconds, tokens = [], 0
    for _ in range(repeats):
        start = time.perf_counter()
        tokens = extract_pass(engine, items, layers, batch)
        seconds.append(time.perf_counter() - start)
    return tokens, statistics.median(tokens / s for s in seconds), statistics.median(len(items) / s for s in seconds)


def check_batched(engine: HFEngine, items: Sequence[LabelledText], layers: Sequence[int], tol: float) -> str:
    """One line: do the batched activations of the shortest and longest item equal the one-at-a-time ones?"""
    by_length = sorted(items, key=lambda item: len(engine.encode(engine.render_prompt(item.messages) + item.text)))
    pair = [by_length[0], by_length[-1]]
    batched = engine.capture_many([(item.messages, item.text) for item in pair], layers)
    worst = 0.0
    for item, acts in zip(pair, batched, strict=True):
        single = engine.capture(item.messages, item.text, layers)
        for layer in layers:
            if single[layer].shape != acts[layer].shape:
                return f"FAIL shape {tuple(acts[layer].shape)} != {tuple(single[layer].shape)} (layer {layer})"
            worst = max(worst, float((single[layer] - acts[layer]).abs().max()))
    verdict = "ok" if worst <= tol else "FAIL"
    return f"{verdict}: max |batched - single| = {worst:.2e} (tol {tol:.0e}) over 2 items, layers {list(layers)}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto", help="auto: float32 on CPU, bfloat16 on CUDA")
    parser.add_argument("--items", type=int, default=64, help="first N bundled deception contrast items")
    parser.add_argument("--layers", type=int, nargs="+", help="layers captured per forward (default n//3 and 2n//3)")
    parser.add_argument("--batch", type=int, default=train.BATCH, help="items per forward in the batched mode (1: skip it)")
    parser.add_argument("--no-real", action="store_true", help="leave out the embedded real model (smollm2)")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per mode (median taken)")
    parser.add_argument("--d-model", type=int, default=2048, help="width of the realistic random model")
    parser.add_argument("--n-layers", type=int, default=4, help="decoder blocks of the realistic random model")
    args = parser.parse_args()
    dtype = resolve_dtype(args.dtype, torch.device(args.device))
    items = load_contrast("deception")[: args.items]
    engines = [
        ("tiny", load_engine("tiny", args.device, dtype)),
        *(
            []
            if args.no_real
            else [
                (
                    "smollm2 (real)",
                    load_engine("smollm2", args.device, dtype),
                )
            ]
        ),
        (f"random d_model={args.d_model}", realistic_engine(args.d_model, args.n_layers, args.device, dtype)),
    ]
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    title = f"activation extraction, {len(items)} items, median of {args.repeats} passes, {args.device} {dtype}"
    table = Table(title=title)
    columns = ("model", "d_model x layers", "layers captured", "mode", "tokens", "median tok/s", "median items/s")
    for col in columns:
        table.add_column(col, justify="left" if col in ("model", "mode") else "right")
    checks = []
    for label, engine in engines:
        n = engine.info.n_layers
        layers = args.layers or sorted({n // 3, (2 * n) // 3})
        modes = [(1, "one at a time")] + ([(args.batch, f"batch {args.batch}, right-padded")] if args.batch > 1 else [])
        if args.batch > 1:
            checks.append(f"batched check, {label}: {check_batched(engine, items, layers, tol)}")
        for batch, mode in modes:
            tokens, tok_s, items_s = measure(engine, items, layers, batch, args.repeats)
            shape = f"{engine.info.d_model} x {n}"
            table.add_row(label, shape, ",".join(map(str, layers)), mode, str(tokens), f"{tok_s:.0f}", f"{items_s:.1f}")
    Console(width=130).print(table)
    for line in checks:
        print(line)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")


if __name__ == "__main__":
    main()
