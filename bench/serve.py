"""Serving throughput and time-to-first-token through the HTTP API, monitoring on vs off.

Two cotmon servers run in this process on loopback ports, each on its own HFEngine (same model).
"on": two random linear probes (deception_probe on layer 1, harmful_probe on layer 2) and the
bundled default policy, with scores kept low so that every rule runs and none fires; "off": no
detectors, no rules. At 1, 8 and 32 concurrent clients (official `openai.AsyncOpenAI`, streaming,
temperature 0), each client sends --requests-per-client requests one after another; that batch
is a round. Rounds alternate off/on in ABBA order so that machine noise hits both modes alike.
Per cell it prints the median over rounds of tokens/s (all completion tokens, from the usage
chunk, / the batch's wall time) and the p50/p99 TTFT pooled over rounds (request sent -> first
SSE chunk carrying reasoning or content text). Per-session log lines are off in both modes.

Concurrent streams are decoded in one forward per step (continuous batching; --no-batching: one
forward per stream and token, as before). It also measures this machine's memory read bandwidth
(summing a 1 GiB tensor) and prints the batch-1 ceiling it sets: bandwidth / the bytes of weights
a decode step reads, and the share of it one client reaches. --json ends the output with one line
of JSON: {"cells": [{"concurrency", "monitoring", "tok_s", "ttft_p50_ms", "ttft_p99_ms"}, ...], ...}.

    .venv/bin/python bench/serve.py                          # the embedded real model (smollm2), CPU
    .venv/bin/python bench/serve.py --rounds 1 --tokens 16   # quick check
    .venv/bin/python bench/serve.py --json | tail -1         # the cells as JSON
    .venv/bin/python bench/serve.py --device cuda --model <hub id or path>
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from openai import AsyncOpenAI
from prometheus_client import CollectorRegistry
from rich.console import Console
from rich.table import Table

from monitor.build import build_pipeline, load_reader
from monitor.engine.hf import HFEngine
from monitor.observability import Metrics, configure_logging
from monitor.server.app import create_app
from monitor.settings import Settings
from monitor.testing import ServerThread
from monitor.types import ModelInfo
from policies import bundled_policy
from probes.linear import LinearProbe, ProbeMetadata

PROMPT = "Plan the database migration and report whether the tests passed."
CONCURRENCY = (1, 8, 32)
MODES = ("off", "on")


@dataclass
class Cell:
    """What one (concurrency, mode) pair collected over its rounds."""

    rates: list[float] = field(default_factory=list)
    ttfts: list[float] = field(default_factory=list)
    requests: int = 0
    halted: int = 0
    steps: int = 0
    """Decode forwards the cell's rounds ran, and the tokens they read (rows / steps = mean batch)."""
    rows: int = 0


def write_probes(directory: Path, info: ModelInfo) -> None:
    """Random probe artifacts named as the default policy expects (as tests/conftest.py make_probe).

    The bias is pushed far down so that scores stay near 0: every rule is evaluated on every token
    but none fires (benign traffic), and no halt cuts the monitored streams short.
    """
    for seed, (name, category, layer) in enumerate([("deception_probe", "deception", 1), ("harmful_probe", "harmful", 2)]):
        rng = np.random.default_rng(seed)
        meta = ProbeMetadata(name, category, info.model_id, info.revision, layer, info.d_model, threshold=0.5, target_fpr=0.01)
        LinearProbe(
            meta=meta,
            direction=rng.standard_normal(info.d_model).astype(np.float32),
            bias=float(rng.standard_normal()) - 100.0,
            mean=rng.standard_normal(info.d_model).astype(np.float32) * 0.1,
            scale=rng.uniform(0.5, 2.0, info.d_model).astype(np.float32),
        ).save(directory / name)


def read_bandwidth(device: str, gib: float = 1.0, repeats: int = 5) -> float:
    """Bytes per second this device reads: the best of `repeats` sums over a `gib` GiB float32 tensor."""
    x = torch.ones(int(gib * 2**30 / 4), device=device)
    best = float("inf")
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        float(x.sum())
        best = min(best, time.perf_counter() - t0)
    return x.numel() * 4 / best


def weights_read_per_step(engine: HFEngine) -> int:
    """Bytes of weights one decode step reads: every parameter but the input embedding table, of
    which it reads one row (a tied output head is read whole, once)."""
    model = engine.model
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    tied = head is not None and head.weight.data_ptr() == embedding.data_ptr()
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    return total if tied else total - embedding.numel() * embedding.element_size()


def start_server(stack: ExitStack, args: argparse.Namespace, monitored: bool, tmp: Path) -> tuple[str, HFEngine]:
    """A server for one mode on its own engine and metrics registry; its base URL and engine."""
    probes = tmp / "probes"
    # the default data dir holds the model cache (.cotmon/models, as `make demo` and the tests leave it)
    settings = Settings.load({}, model=args.model, device=args.device, max_concurrent=64, probes=probes if monitored else "none")
    engine = load_reader(settings)
    engine.batching = args.batching
    if monitored:
        write_probes(probes, engine.info)
    # probes, if any, with the bundled default policy; else no rules
    pipeline = build_pipeline(settings, bundled_policy("default"), metrics=Metrics(CollectorRegistry()), engine=engine)
    app = create_app(settings.model_copy(update={"data_dir": tmp / ("on" if monitored else "off")}), pipeline, model_name="bench")
    return stack.enter_context(ServerThread(app)).base_url, engine


async def one_request(client: AsyncOpenAI, tokens: int) -> tuple[float | None, int, bool]:
    """(TTFT in s or None if no text came, completion tokens, halted by the policy) of one stream."""
    sent = time.perf_counter()
    ttft, completion, halted = None, 0, False
    stream = await client.chat.completions.create(
        model="bench",
        messages=[{"role": "user", "content": PROMPT}],
        max_tokens=tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    async for chunk in stream:
        for choice in chunk.choices:
            if ttft is None and (choice.delta.content or getattr(choice.delta, "reasoning", None)):
                ttft = time.perf_counter() - sent
            halted |= choice.finish_reason == "content_filter"
        if chunk.usage is not None:
            completion = chunk.usage.completion_tokens
    return ttft, completion, halted


async def run_round(client: AsyncOpenAI, cell: Cell, concurrency: int, per_client: int, tokens: int) -> None:
    """`concurrency` clients, each sending `per_client` requests in turn; adds the round to `cell`."""

    async def one_client() -> list[tuple[float | None, int, bool]]:
        return [await one_request(client, tokens) for _ in range(per_client)]

    start = time.perf_counter()
    results = [r for batch in await asyncio.gather(*(one_client() for _ in range(concurrency))) for r in batch]
    wall = time.perf_counter() - start
    cell.rates.append(sum(n for _, n, _ in results) / wall)
    cell.ttfts.extend(t for t, _, _ in results if t is not None)
    cell.requests += len(results)
    cell.halted += sum(h for _, _, h in results)


async def measure(urls: dict[str, str], engines: dict[str, HFEngine], args: argparse.Namespace) -> dict[tuple[int, str], Cell]:
    cells = {(c, mode): Cell() for c in args.concurrency for mode in MODES}
    async with (
        AsyncOpenAI(base_url=f"{urls['off']}/v1", api_key="unused", max_retries=0, timeout=600) as off,
        AsyncOpenAI(base_url=f"{urls['on']}/v1", api_key="unused", max_retries=0, timeout=600) as on,
    ):
        clients = {"off": off, "on": on}
        for client in clients.values():
            await one_request(client, args.tokens)  # warm-up
        for concurrency in args.concurrency:
            for r in range(args.rounds):
                for mode in MODES if r % 2 == 0 else MODES[::-1]:  # ABBA: order effects cancel
                    cell = cells[concurrency, mode]
                    steps, rows = engines[mode].decode_stats()
                    await run_round(clients[mode], cell, concurrency, args.requests_per_client, args.tokens)
                    after = engines[mode].decode_stats()
                    cell.steps, cell.rows = cell.steps + after[0] - steps, cell.rows + after[1] - rows
    return cells


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", help="smollm2 (the real model), a .gguf file, a hub id or path, or tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tokens", type=int, default=64, help="max_tokens per request")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per (concurrency, mode) cell")
    parser.add_argument("--requests-per-client", type=int, default=2, help="sequential requests per client per round")
    parser.add_argument(
        "--no-batching", dest="batching", action="store_false", help="one forward per stream and token (no continuous batching)"
    )
    parser.add_argument(
        "--concurrency",
        type=lambda v: tuple(int(c) for c in v.split(",")),
        default=CONCURRENCY,
        help="comma-separated client counts, 1 first (default 1,8,32)",
    )
    parser.add_argument("--json", action="store_true", help="end with one line of JSON holding every cell")
    args = parser.parse_args()
    if args.concurrency[0] != 1:
        parser.error("--concurrency starts with 1 (the other counts are compared with it)")
    configure_logging(json=False, level="warning")  # no per-session log lines in either mode
    began = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        servers = {mode: start_server(stack, args, mode == "on", Path(tmp)) for mode in MODES}
        cells = asyncio.run(measure({m: url for m, (url, _) in servers.items()}, {m: e for m, (_, e) in servers.items()}, args))
        weight_bytes = weights_read_per_step(servers["off"][1])
    bandwidth = read_bandwidth(args.device)
    table = Table(
        title=f"cotmon serving, {args.model} on {args.device}, max_tokens {args.tokens}, "
        f"{args.requests_per_client} requests/client/round, {args.rounds} alternating rounds, "
        f"batching {'on' if args.batching else 'off'}"
    )
    columns = ("concurrency", "monitoring", "requests", "tok/s total", "p50 TTFT ms", "p99 TTFT ms", "on/off tok/s", "rows/step")
    for col in columns:
        table.add_column(col, justify="right")
    rows = []
    for concurrency in args.concurrency:
        for mode in MODES:
            cell = cells[concurrency, mode]
            rate = statistics.median(cell.rates)
            p50, p99 = np.percentile(cell.ttfts, [50, 99]) * 1000 if cell.ttfts else (float("nan"),) * 2
            ratio = f"{rate / statistics.median(cells[concurrency, 'off'].rates):.3f}" if mode == "on" else ""
            batch = cell.rows / cell.steps if cell.steps else float("nan")
            figures = (f"{rate:.1f}", f"{p50:.1f}", f"{p99:.1f}", ratio, f"{batch:.1f}")
            table.add_row(str(concurrency), mode, str(cell.requests), *figures)
            row = {"concurrency": concurrency, "monitoring": mode, "requests": cell.requests, "tok_s": round(rate, 2)}
            row |= {"ttft_p50_ms": round(float(p50), 1), "ttft_p99_ms": round(float(p99), 1), "rows_per_step": round(batch, 2)}
            rows.append(row)
        if concurrency != args.concurrency[-1]:
            table.add_section()
    Console(width=140).print(table)
    ceiling = bandwidth / weight_bytes
    one = statistics.median(cells[1, "off"].rates)
    print(
        f"batch-1 ceiling: {bandwidth / 1e9:.1f} GB/s read / {weight_bytes / 1e6:.0f} MB of weights per step = "
        f"{ceiling:.1f} tok/s; 1 client reaches {one:.1f} tok/s ({one / ceiling:.0%}); batching reads the weights "
        "once for every stream in a step, so many clients can pass it"
    )
    single = statistics.median(cells[1, "on"].rates)
    for concurrency in args.concurrency[1:]:
        gain = statistics.median(cells[concurrency, "on"].rates) / single
        print(f"{concurrency} clients / 1 client, monitoring on: {gain:.2f}x")
    halted = sum(cell.halted for cell in cells.values())
    if halted:
        print(f"note: the policy halted {halted} monitored streams early (their tokens still count)")
    took = time.perf_counter() - began
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, took {took:.0f} s")
    if args.json:
        summary = {"model": args.model, "device": args.device, "tokens": args.tokens, "batching": args.batching}
        summary |= {"bandwidth_gb_s": round(bandwidth / 1e9, 2), "weight_bytes": weight_bytes, "ceiling_tok_s": round(ceiling, 2)}
        print(json.dumps({"cells": rows, **summary, "seconds": round(took)}))


if __name__ == "__main__":
    main()
