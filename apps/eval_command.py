"""`cotmon eval`: measure detectors on a labelled dataset file, through the live pipeline.

This module holds only the command and its options, so `cotmon --help` stays fast; the work
is in `apps.evaluate`, imported when the command runs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from monitor.options import setting_options

if TYPE_CHECKING:
    from rich.console import Console

    from apps.evaluate import Report

SPEC_HELP = (
    "A detector to evaluate (repeatable): a probe artifact path (NAME or NAME.json, next to NAME.safetensors; "
    'the detector is named NAME), an inline JSON object {"kind": ..., "name": ..., "args": {...}}, '
    "or a registered detector kind (named after it, no args)."
)


def _aggregate(ctx: click.Context, param: click.Parameter, value: str) -> str:
    from apps.evaluate import check_aggregate

    try:
        return check_aggregate(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


@click.command("eval")
@click.option("--detector", "detectors", multiple=True, required=True, metavar="SPEC", help=SPEC_HELP)
@click.option(
    "--dataset",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="Labelled JSONL, JSON or CSV file, read in place.",
)
@click.option("--text-field", default="text", show_default=True, help="Field holding the CoT to score (dotted for nested).")
@click.option("--label-field", default="label", show_default=True, help="Field holding the label (dotted for nested).")
@click.option("--positive", default=None, metavar="VALUE", help="Label value that counts as positive [1/true vs 0/false].")
@click.option(
    "--messages-field", default="messages", show_default=True, help="Field with the chat before the CoT, if a row has one."
)
@click.option(
    "--category",
    default=None,
    help="Score only detections of this category (a judge scores several; `judge_unavailable` never counts).",
)
@click.option(
    "--aggregate",
    default="mean",
    show_default=True,
    callback=_aggregate,
    metavar="mean|max|STAT@N",
    help="How an item's per-token scores over its reasoning become one item score: their mean or max, or the "
    "peak of a policy statistic (mean@16: the highest mean over 16 consecutive tokens; also ema@N, last). "
    "The confusion matrix uses the threshold calibrated for that statistic, so mean@16 counts what a rule "
    "{stat: mean, window: 16, min_scores: 16, gte: calibrated} would flag; items shorter than N are unscored.",
)
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Evaluate only the first N rows.")
@setting_options("model", "device", "dtype")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None, help="Output directory [.cotmon/eval].")
@click.option("--json", "as_json", is_flag=True, help="Print only the JSON report on stdout (progress goes to stderr).")
def eval_command(
    detectors: tuple[str, ...],
    dataset: Path,
    text_field: str,
    label_field: str,
    positive: str | None,
    messages_field: str,
    category: str | None,
    aggregate: str,
    limit: int | None,
    model: str | None,
    device: str | None,
    dtype: str | None,
    out: Path | None,
    as_json: bool,
) -> None:
    """Evaluate detectors on a labelled dataset: AUROC, recall at 1% and 5% FPR, a ROC plot.

    Every row's text is teacher-forced as the model's chain of thought (after the row's chat,
    if it has one) through the same pipeline as live monitoring; a detector's scores over the
    reasoning tokens become one score per row (--aggregate). Rows are positive when their
    label equals --positive (or is 1/true without it). The confusion matrix is taken at each
    detector's threshold calibrated for that item score, where it has one (so --aggregate mean@8
    counts what a policy rule on mean@8 would flag). Writes report.json and roc.png to --out.

    \b
    Example (the default pack `make demo` and `cotmon serve` use):
      cotmon eval --detector .cotmon/probes/smollm2@gguf-b179c9523d0e6a0f/deception_probe \\
        --dataset data/faking.jsonl --text-field text --label-field label \\
        --positive potential_faking --aggregate mean@8 --limit 200
    """
    from rich.console import Console
    from rich.progress import Progress

    from apps.evaluate import DatasetRef, EvaluationError, evaluate, parse_detector_spec, plot_roc
    from monitor.build import load_reader
    from monitor.detector import DetectorError, default_registry
    from monitor.engine.base import EngineError
    from monitor.observability import logging_to
    from monitor.settings import Settings, SettingsError
    from probes.datasets import DatasetError, load_labelled_file

    width = None if sys.stdout.isatty() else 150
    console = Console(highlight=False, width=width, stderr=as_json)
    ref = DatasetRef(str(dataset), text_field, label_field, positive, messages_field or None, limit)
    try:
        settings = Settings.load(model=model, device=device, dtype=dtype)
        items = load_labelled_file(
            dataset,
            text_field=text_field,
            label_field=label_field,
            positive=positive,
            messages_field=ref.messages_field,
            limit=limit,
        )
        registry = default_registry()
        specs = [parse_detector_spec(value, registry.kinds()) for value in detectors]
    except (SettingsError, DatasetError, EvaluationError) as exc:
        raise click.ClickException(str(exc)) from None
    out_dir = out or settings.data_dir / "eval"
    out_dir.mkdir(parents=True, exist_ok=True)
    console.print(f"cotmon eval: {len(items)} items from {dataset}; loading model {settings.model!r}")
    try:
        engine = load_reader(settings)
    except EngineError as exc:
        raise click.ClickException(str(exc)) from None
    except (OSError, ValueError, RuntimeError, AssertionError) as exc:  # torch without CUDA asserts
        raise click.ClickException(f"cannot load model {settings.model!r} on {settings.device}: {exc}") from None
    try:
        with (
            logging_to(out_dir / "eval.log", level=settings.log_level),
            Progress(console=console, transient=True, disable=not console.is_terminal) as bar,
        ):
            task = bar.add_task("scoring items", total=len(items))
            report = evaluate(
                engine,
                specs,
                items,
                ref,
                aggregate=aggregate,
                registry=registry,
                progress=lambda n: bar.advance(task, n),
                category=category,
            )
    except (DetectorError, EngineError) as exc:
        raise click.ClickException(str(exc)) from None
    report_path = out_dir / "report.json"
    report_path.write_text(json.dumps(report.to_dict(), indent=2) + "\n", encoding="utf-8")
    plot_path = plot_roc(report, out_dir / "roc.png")
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        _print_table(console, report)
    console.print(f"Report: {report_path}\nROC curves: {plot_path}\nSession logs: {out_dir / 'eval.log'}")


def _describe(aggregate: str) -> str:
    if aggregate in ("mean", "max"):
        return f"{aggregate} over the reasoning tokens"
    return f"peak of {aggregate} over the reasoning tokens (full windows), thresholds calibrated for {aggregate}"


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _print_table(console: Console, report: Report) -> None:
    from rich.table import Table

    table = Table(
        title=f"{report.dataset.path}: {report.n_items} items, model {report.model_id} ({report.model_revision}), "
        f"item score = {_describe(report.aggregate)}",
        title_justify="left",
    )
    for column in ("detector", "pos / neg", "AUROC", "recall@1%FPR", "recall@5%FPR", "threshold", "TP / FP / TN / FN"):
        table.add_column(column, justify="left" if column == "detector" else "right")
    for r in report.detectors:
        c = r.confusion
        table.add_row(
            r.name + (f" ({r.n_unscored} unscored)" if r.n_unscored else ""),
            f"{r.n_positive} / {r.n_negative}",
            _fmt(r.auroc),
            _fmt(r.recall_at_fpr.get(0.01)),
            _fmt(r.recall_at_fpr.get(0.05)),
            _fmt(c.threshold) if c else "-",
            f"{c.tp} / {c.fp} / {c.tn} / {c.fn}" if c else "-",
        )
    console.print(table)
    if any(r.confusion is None and r.auroc is not None for r in report.detectors):
        console.print(
            f"threshold '-': no threshold calibrated for the item score {report.aggregate!r}; "
            "--aggregate with a statistic the policy uses (e.g. mean@16) counts what it would flag"
        )
