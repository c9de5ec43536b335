"""`cotmon probes ...`: train linear probes for a model (the command only; the work is in probes.train)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from monitor.options import setting_option, setting_options


@click.group()
def probes() -> None:
    """Train and inspect linear probes."""


@probes.command("train")
@setting_option("model")
@click.option(
    "--dataset",
    required=True,
    help="`deception` or `harmful` (bundled contrast sets, plus the examples' train split), or a JSONL/JSON/CSV path.",
)
@click.option("--text-field", default="text", show_default=True, help="Field with the assistant text (dotted for nesting).")
@click.option("--label-field", default="label", show_default=True, help="Field with the label.")
@click.option("--positive", default=None, help="Label value that is positive (default: 1/true).")
@click.option(
    "--control",
    "control_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Benign texts to calibrate the thresholds on instead of the model's own text for the bundled benign prompts "
    "(every row is benign; half set the thresholds, half measure them; --text-field names its text).",
)
@click.option("--layers", default=None, help="Comma-separated layers to try, e.g. 8,12,16 [a few middle layers].")
@click.option("--name", default=None, help="Probe (detector) name [deception_probe / harmful_probe / the file's stem].")
@click.option("--category", default=None, help="Category it detects [deception / harmful_planning / the name].")
@click.option("--target-fpr", type=float, default=0.01, show_default=True, help="False-positive rate the threshold is set at.")
@click.option("--limit", type=int, default=None, help="Use at most this many rows per label (bundled) or in all (files).")
@click.option(
    "--calibration-limit",
    type=int,
    default=None,
    help="Calibrate on this many of the 600 bundled benign prompts' sessions (quicker, coarser thresholds) [all].",
)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Directory for the artifact.")
@click.option(
    "--cache",
    "cache_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Cache folder: extracted activations (resumable) and generated benign text [.cotmon].",
)
@setting_options("device", "dtype", "seed")
def train(**o: object) -> None:
    """Train a probe: extract activations, fit per layer, pick the best, calibrate, save.

    Example: cotmon probes train --model tiny --dataset deception --out probes-out

    Activations of every text are cached on disk as they are extracted, so an interrupted run
    resumes and a re-run is fast. The layer is chosen by validation AUROC (texts held out by
    group). Thresholds are then calibrated per statistic a policy can use (last token, mean and
    EMA over windows) on the model's own reasoning for bundled benign prompts (generated once and
    cached; bundled for smollm2), so that --target-fpr of benign sessions would be flagged; the
    table shows each threshold's false-positive rate on benign sessions held apart from setting it
    and its recall on held-out positive texts.
    """
    from probes.train_run import run_training

    try:
        run_training(o)
    except (ValueError, RuntimeError, FileNotFoundError) as exc:
        raise click.ClickException(str(exc)) from None
    sys.stdout.flush()
