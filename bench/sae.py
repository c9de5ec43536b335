"""Per-token cost of watching a few SAE features vs a full SAE encode, on one device.

A random-weight SAE (seeded; W_enc ~ N(0, 1/d_model), thresholds or biases set so that about 1%
of features fire on a random hidden state) of --d-model x --d-sae in float32. For a decode step
(hidden [1, 1, d_model]) and a prefill-like call (hidden [1, --tokens, d_model]) it times, after
a warm-up, the median of --repeats calls of each mode:

  64 watched (fused readout)          ReadoutPlan(watched_readouts(sae, idx)).apply: what the
                                      engine's forward hook runs (TopK: a full encode + gather)
  full encode                         sae.encode(h): all d_sae activations
  full encode + top-8 (explanations)  ReadoutPlan(watched_readouts(sae, [], top=8)).apply

The table gives ms per call, µs per token and the ratio to the watched mode. Before timing, the
watched values are checked against sae.encode(h)[..., idx].

    .venv/bin/python bench/sae.py                   # d_model 4096 x d_sae 65536, CPU (W_enc 1 GiB)
    .venv/bin/python bench/sae.py --device cuda     # same on a GPU
    .venv/bin/python bench/sae.py --arch topk       # TopK (k=64): watched features need the full encode
    .venv/bin/python bench/sae.py --threads 1       # on a busy machine: a descheduled thread stalls every op
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from collections.abc import Callable
from typing import cast

import torch
from rich.console import Console
from rich.table import Table

from detectors.sae.model import SAE, Arch, SAEInfo
from detectors.sae.readouts import watched_readouts
from monitor.engine.readout import ReadoutPlan

ACTIVE_Z = 2.326  # P(N(0, 1) > 2.326) = 1%: pre-activations of a random hidden state are ~N(0, 1)
TOPK = 64


def random_sae(d_model: int, d_sae: int, arch: Arch, seed: int) -> SAE:
    """A host float32 SAE with random weights; W_enc is filled in place (1 GiB at the defaults, no copy)."""
    g = torch.Generator().manual_seed(seed)
    W_enc = torch.empty(d_model, d_sae).normal_(0.0, d_model**-0.5, generator=g)  # columns of norm ~1
    b_dec = torch.randn(d_model, generator=g) * 0.1
    b_enc = torch.randn(d_sae, generator=g) * 0.05
    threshold = None
    if arch == "jumprelu":
        threshold = ACTIVE_Z + 0.1 * torch.randn(d_sae, generator=g)
    elif arch == "relu":
        b_enc -= ACTIVE_Z  # a plain ReLU SAE is sparse through negative encoder biases
    info = SAEInfo(source=f"random seed {seed}", format="random", layer=0)
    return SAE(info, arch, W_enc, b_enc, b_dec, apply_b_dec=True, threshold=threshold, k=TOPK if arch == "topk" else None)


def on_device(sae: SAE, device: torch.device) -> SAE:
    """The same SAE with its tensors on `device` (no copy on the host)."""

    def move(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.to(device)

    return dataclasses.replace(
        sae, W_enc=sae.W_enc.to(device), b_enc=sae.b_enc.to(device), b_dec=sae.b_dec.to(device), threshold=move(sae.threshold)
    )


def median_ms(fn: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor, repeats: int, warmup: int = 3) -> float:
    """Median wall time of fn(hidden) in ms; on CUDA each call is bracketed by synchronize."""

    def sync() -> None:
        if hidden.is_cuda:
            torch.cuda.synchronize(hidden.device)

    for _ in range(warmup):
        fn(hidden)
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn(hidden)
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def check_watched(plan: ReadoutPlan, sae: SAE, idx: list[int], hidden: torch.Tensor) -> str:
    """One line: do the watched readouts equal the full encode's columns? Raises if not."""
    got = plan.apply(hidden, 0)
    want = sae.encode(hidden)[..., idx]
    diff, scale = float((got - want).abs().max()), float(want.abs().max())
    fired = int((want > 0).sum())
    assert diff <= 1e-3 * max(scale, 1.0), f"watched readouts differ from the encode: max |diff| {diff:.2e}"
    return f"watched check ok: max |readout - encode[..., idx]| = {diff:.2e} (max |value| {scale:.2f}, {fired} nonzero)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--arch", default="jumprelu", choices=("jumprelu", "relu", "topk"), help="topk uses k=64")
    parser.add_argument("--d-model", type=int, default=4096, help="residual-stream width (SAE input)")
    parser.add_argument("--d-sae", type=int, default=65536, help="SAE features")
    parser.add_argument("--watched", type=int, default=64, help="watched feature indices (random, seeded)")
    parser.add_argument("--tokens", type=int, default=64, help="tokens of the prefill-like call")
    parser.add_argument("--repeats", type=int, default=50, help="timed calls per mode at batch 1 (median taken)")
    parser.add_argument("--prefill-repeats", type=int, default=10, help="timed calls per mode at --tokens tokens")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=0, help="torch CPU threads (0: torch's default; fewer than free cores avoids stalls)"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"note: --device {args.device} asked for but CUDA is not available (torch {torch.__version__}); skipped")
        return

    sae = random_sae(args.d_model, args.d_sae, cast(Arch, args.arch), args.seed)
    dev_sae = on_device(sae, device)
    g = torch.Generator().manual_seed(args.seed + 1)
    idx = sorted(torch.randperm(args.d_sae, generator=g)[: args.watched].tolist())
    how = "fused readout" if sae.sliceable() else "full encode + gather"  # TopK: not one linear column each
    watched = ReadoutPlan(watched_readouts(sae, "sae", idx), d_model=args.d_model, n_layers=1, device=device)
    top8 = ReadoutPlan(watched_readouts(sae, "sae", [], top=8), d_model=args.d_model, n_layers=1, device=device)
    watched_label = f"{len(idx)} watched ({how})"
    modes: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        watched_label: lambda h: watched.apply(h, 0),
        "full encode": dev_sae.encode,
        "full encode + top-8 (explanations)": lambda h: top8.apply(h, 0),
    }
    decode = torch.randn(1, 1, args.d_model, generator=g).to(device)
    prefill = torch.randn(1, args.tokens, args.d_model, generator=g).to(device)

    with torch.inference_mode():
        active = float((dev_sae.encode(prefill) > 0).float().mean())
        mib = sae.W_enc.numel() * sae.W_enc.element_size() / 2**20
        print(f"W_enc {mib:.0f} MiB fp32; {active:.2%} of features active on random hidden states; watched {len(idx)}")
        print(check_watched(watched, dev_sae, idx, prefill))
        table = Table(
            title=f"SAE {args.arch} {args.d_model} x {args.d_sae} fp32 on {device}: median of {args.repeats} calls"
            f" at 1 token, {args.prefill_repeats} at {args.tokens}, after 3 warm-up calls"
        )
        for col in ("mode", "tokens/call", "median ms/call", "µs/token", "ratio to watched"):
            table.add_column(col, justify="left" if col == "mode" else "right")
        for hidden, repeats in ((decode, args.repeats), (prefill, args.prefill_repeats)):
            tokens = hidden.shape[1]
            times = {label: median_ms(fn, hidden, repeats) for label, fn in modes.items()}
            for label, ms in times.items():
                table.add_row(label, str(tokens), f"{ms:.3f}", f"{ms * 1e3 / tokens:.1f}", f"{ms / times[watched_label]:.1f}x")
            table.add_section()
    Console(width=110).print(table)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")


if __name__ == "__main__":
    main()
