"""`cotmon demo`: the whole monitoring loop on the built-in tiny model, on a CPU, in a minute.

This module holds only the command and its options, so `cotmon --help` stays fast; the work
(model, training, pipeline) is in `probes.showcase`, imported when the command runs.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click


@click.command()
@click.option("--model", default=None, help="Hub id or local path of a causal LM; default: the built-in tiny model.")
@click.option("--device", default=None, help="auto, cpu, cuda, ...")
@click.option("--dtype", default=None, help="auto, float32, bfloat16, float16.")
@click.option("--seed", type=int, default=None, help="Seed of the tiny model, the data split and sampling.")
@click.option("--layers", default=None, help="Comma-separated layers to try for the probes; default: a few middle layers.")
@click.option("--contrast-limit", type=int, default=300, show_default=True, help="Contrast texts per label and probe.")
@click.option("--out", "data_dir", type=click.Path(path_type=Path), default=None, help="Output directory [.cotmon].")
@click.option("--exit", "exit_when_done", is_flag=True, help="Return when done, without the what-to-try-next notes.")
def demo(
    model: str | None,
    device: str | None,
    dtype: str | None,
    seed: int | None,
    layers: str | None,
    contrast_limit: int,
    data_dir: Path | None,
    exit_when_done: bool,
) -> None:
    """Train probes and monitor bundled example transcripts end to end on a CPU.

    The default model is tiny and random: the demo tests the plumbing (readouts, policy,
    flags, metrics, transcripts), not real deception detection. The AUROCs it prints are
    measured honestly, whatever they are. Pass --model deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B
    (or any causal LM) to run the same loop on a real model.
    """
    from rich.console import Console

    from monitor.detector import DetectorError
    from monitor.engine.base import EngineError
    from monitor.observability import logging_to
    from monitor.policy import PolicyError
    from monitor.settings import Settings, SettingsError
    from probes.datasets import DatasetError
    from probes.showcase import run

    try:
        settings = Settings.load(model=model, device=device, dtype=dtype, seed=seed, data_dir=data_dir)
    except SettingsError as exc:
        raise click.ClickException(str(exc)) from None
    console = Console(highlight=False, width=None if sys.stdout.isatty() else 150)
    out = settings.data_dir / "demo"
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "cotmon.log"
    with logging_to(log_path, json=settings.log_format == "json", level=settings.log_level):
        try:
            run(settings, console, out, layers, contrast_limit)
        except (EngineError, DetectorError, PolicyError, DatasetError) as exc:
            raise click.ClickException(str(exc)) from None
    console.print(f"\nStructured logs (one JSON line per session): {log_path}")
    if not exit_when_done:
        console.print(
            "\nNext:\n"
            f"  - serve with these probes:     cotmon serve --probes {out / 'probes'}   (then point an OpenAI client at /v1)\n"
            "  - browse the transcripts:      the same server's /ui/ (flagged sessions, shaded tokens, replay)\n"
            "  - list the flagged ones:       cotmon transcripts list --flagged\n"
            "  - replay one, exactly:         cotmon replay deceptive-09   (or: --policy policies/strict.yaml)\n"
            "  - backtest a policy:           cotmon replay --all --policy policies/strict.yaml\n"
            "  - a real model (needs the hub): cotmon demo --model deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B\n"
            "  - run the tests:                make test"
        )
