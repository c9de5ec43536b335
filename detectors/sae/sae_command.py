"""`cotmon sae inspect PATH`: what an SAE file is, and a sanity encode on random input."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click


@click.group()
def sae() -> None:
    """Inspect sparse autoencoders (SAELens, Gemma Scope 1/2, sparsify, Goodfire, Llama Scope R1-Distill)."""


@sae.command("inspect")
@click.argument("path", type=click.Path(exists=True, path_type=Path))
@click.option("--format", "fmt", default="auto", show_default=True, help="Force a format (saelens, gemma_scope, ...).")
@click.option("--layer", type=int, default=None, help="Layer it reads, when its files do not say.")
@click.option("--k", type=int, default=None, help="TopK's k, when its files do not say (Goodfire R1: 64 logic, 128 math).")
@click.option("--input-scale", type=float, default=None, help="Dataset input scale (SAELens norm_scaling_factor).")
@click.option("--tokens", type=int, default=16, show_default=True, help="Random tokens in the sanity encode.")
@click.option("--seed", type=int, default=0, show_default=True)
def inspect(path: Path, fmt: str, layer: int | None, k: int | None, input_scale: float | None, tokens: int, seed: int) -> None:
    """Print an SAE's format, architecture, d_in, d_sae, hook/layer and input handling, then encode
    random residual vectors (norm sqrt(d_in), the scale SAELens normalises to) and report how many
    features fire, their largest activation, and that every value is finite.

    \b
    Example:
      cotmon sae inspect saes/llama-scope-r1/L19R --input-scale 3.8187
    """
    import torch
    from rich.console import Console
    from rich.table import Table

    from detectors.sae.formats import Overrides, load_sae
    from detectors.sae.model import SAEError

    console = Console()
    try:
        t0 = time.perf_counter()
        model = load_sae(path, fmt, Overrides(layer=layer, k=k, input_scale=input_scale))
        loaded = time.perf_counter() - t0
    except SAEError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    info = model.info
    table = Table(title=f"SAE {path}", show_header=False)
    rows = [
        ("format", info.format),
        ("architecture", model.arch + (f" (k={model.k})" if model.k else "")),
        ("d_in", str(model.d_in)),
        ("d_sae", str(model.d_sae)),
        ("layer", f"{info.layer} (output of decoder block {info.layer}; blocks.{info.layer}.hook_resid_post)"),
        ("hook in file", info.hook or "-"),
        ("trained on", info.model_name or "-"),
        ("neuronpedia", info.neuronpedia or "-"),
        ("b_dec subtracted", "yes" if model.apply_b_dec else "no"),
        ("input scaling", f"norm={model.input_norm}, scale={model.input_scale:g}"),
        ("watched features", "exact readout columns" if model.sliceable() else "full encode on device (not sliceable)"),
        ("loaded in", f"{loaded:.2f} s"),
    ]
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, model.d_in, generator=gen)
    x = x / x.norm(dim=-1, keepdim=True) * model.d_in**0.5
    with torch.inference_mode():
        t0 = time.perf_counter()
        acts = model.encode(x)
        took = time.perf_counter() - t0
    active = (acts > 0).sum(dim=-1).float()
    rows += [
        ("sanity encode", f"{tokens} random tokens in {took * 1000:.1f} ms"),
        ("active per token (L0)", f"mean {active.mean():.1f}, min {active.min():.0f}, max {active.max():.0f}"),
        ("largest activation", f"{acts.max():.4g}"),
        ("all finite", "yes" if bool(torch.isfinite(acts).all()) else "NO"),
    ]
    for key, value in rows:
        table.add_row(key, value)
    console.print(table)
    if not bool(torch.isfinite(acts).all()):
        sys.exit(1)
