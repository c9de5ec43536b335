"""The work behind `cotmon probes train`, the demo's training step and `serve --probes auto`."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from monitor.build import load_reader
from monitor.engine.hf import HFEngine
from monitor.settings import Settings
from probes.calibrate import STATISTICS, calibrate_on_policy, rate_interval
from probes.datasets import LabelledText, examples_as_training, load_contrast, load_examples, load_labelled_file, load_texts
from probes.linear import LinearProbe
from probes.onpolicy import BenignSet, benign_set, control_set
from probes.train import TrainedProbe, train_probe

# bundled set -> (probe name, category, contrast file stem, positive example label)
BUNDLED = {
    "deception": ("deception_probe", "deception", "deception", "deceptive"),
    "harmful": ("harmful_probe", "harmful_planning", "harmful", "harmful_planning"),
}


def default_layers(n_layers: int) -> list[int]:
    """Three layers from the middle to three quarters of the depth (all of them for small models)."""
    if n_layers <= 6:
        return list(range(n_layers))
    return sorted({round(n_layers * f) for f in (0.5, 0.6, 0.75)})


def print_layer_table(console: Console, probe: LinearProbe) -> None:
    """Training's per-layer results, as the artifact records them."""
    name = probe.meta.name
    table = Table(title=f"{name}: per-layer AUROC (validation texts held out from training)", title_justify="left")
    for col in ("layer", "C", "train AUROC", "val AUROC"):
        table.add_column(col, justify="right")
    for r in probe.meta.layers:
        mark = " <- chosen" if int(r["layer"]) == probe.meta.layer else ""
        table.add_row(str(int(r["layer"])), f"{r['c']:g}", f"{r['train_auroc']:.3f}", f"{r['val_auroc']:.3f}{mark}")
    console.print(table)


def print_calibration_table(console: Console, probe: LinearProbe) -> None:
    """Per statistic: threshold, target FPR, FPR measured on held-apart benign sessions, recall."""
    record = probe.meta.calibration
    if not record:
        fpr = probe.meta.metrics.get("calibration_token_fpr", math.nan)
        console.print(f"  threshold {probe.meta.threshold:.4f} at {probe.meta.target_fpr:.0%} target FPR per token ({fpr:.2%})")
        return
    table = Table(
        title=f"{probe.meta.name}: thresholds per statistic; a session is flagged when the statistic reaches the threshold "
        f"at any token (calibrated on: {record['texts']})",
        title_justify="left",
    )
    check = record.get("check", {})
    columns = ["statistic", "threshold", "target FPR", "calibrated on", "FPR held apart (95% CI)", "recall held-out positives"]
    if check:
        columns.append(f"at a {check['target_fpr']:.0%} target: FPR held apart")
    for col in columns:
        table.add_column(col, justify="left" if col == "statistic" else "right")
    for key, s in record["statistics"].items():
        n = int(s["heldapart_n"])
        row = [
            key,
            f"{s['threshold']:.4f}",
            f"{record['target_fpr']:.1%}",
            f"{int(s['calibration_n'])} sessions",
            _held_apart(s["heldapart_fpr"], n),
            f"{s['recall']:.1%} of {int(s['recall_n'])}" if s["recall_n"] else "-",
        ]
        if check:
            row.append(_held_apart(check["statistics"][key]["heldapart_fpr"], n))
        table.add_row(*row)
    console.print(table)


def _held_apart(rate: float, n: int) -> str:
    if not n:
        return "-"
    low, high = rate_interval(rate, n)
    return f"{rate:.1%} of {n} ({low:.1%}-{high:.1%})"


@contextmanager
def progress_bar(console: Console) -> Iterator[Callable[[str, int], Callable[[int], None]]]:
    """Progress bars on `console`; yields `start(description, total)`, which returns an advance callback."""
    with Progress(console=console, transient=True) as bar:

        def start(description: str, total: int) -> Callable[[int], None]:
            task = bar.add_task(description, total=total)
            return lambda n: bar.advance(task, n)

        yield start


def train_bundled(
    console: Console,
    engine: HFEngine,
    kind: str,
    *,
    layers: Sequence[int],
    seed: int = 0,
    limit: int | None = 300,
    cache_dir: Path | None = None,
    negatives: Sequence[LabelledText] = (),
) -> TrainedProbe:
    """Train the bundled `deception` or `harmful` probe (its thresholds not yet calibrated on policy);
    `negatives` (the model's own benign text) join its training data as label 0."""
    name, category, contrast, positive = BUNDLED[kind]
    items = load_contrast(contrast, limit) + examples_as_training(load_examples(), positive) + list(negatives)  # type: ignore[arg-type]
    with progress_bar(console) as bar:
        return train_probe(
            engine,
            items,
            name=name,
            category=category,
            layers=layers,
            seed=seed,
            cache_dir=cache_dir,
            training_data=[
                f"probes/data/{contrast}_contrast.jsonl",
                "probes/data/examples.jsonl (train split)",
                *([f"{len(negatives)} texts of the model's own benign reasoning (negatives)"] if negatives else []),
            ],
            progress=bar(f"extracting activations for {name}", len(items)),
        )


def calibrate_and_save(
    console: Console,
    engine: HFEngine,
    trained: Sequence[TrainedProbe],
    benign: BenignSet,
    out: Path,
    *,
    target_fpr: float = 0.01,
    statistics: Sequence[str] = STATISTICS,
    tables: bool = True,
) -> list[Path]:
    """Calibrate the probes together on `benign` (one teacher-forced pass), print their tables (unless
    not `tables`), save them."""
    sessions = len(benign.calibration) + len(benign.heldapart)
    with progress_bar(console) as bar:
        advance = bar(f"scoring {sessions} benign sessions to calibrate", sessions)
        probes = calibrate_on_policy(engine, trained, benign, target_fpr=target_fpr, statistics=statistics, progress=advance)
    stems = []
    for probe in probes:
        if tables:
            print_layer_table(console, probe)
            print_calibration_table(console, probe)
        stems.append(probe.save(out / probe.meta.name))
    return stems


def train_pack(
    console: Console,
    engine: HFEngine,
    out: Path,
    *,
    kinds: Sequence[str] = tuple(BUNDLED),
    layers: Sequence[int] | None = None,
    seed: int = 0,
    limit: int | None = 300,
    benign_limit: int | None = None,
    cache_dir: Path,
    tables: bool = True,
) -> list[Path]:
    """Train the bundled probes, calibrate them on the model's own benign text, save them into `out`.

    `cache_dir` holds extracted activations (`activations/`) and generated benign text (`benign/`);
    `benign_limit` calibrates on that many benign prompts' sessions instead of all.
    """
    chosen = list(layers) if layers else default_layers(engine.info.n_layers)
    with progress_bar(console) as bar:
        benign = benign_set(engine, cache_dir / "benign", bar, benign_limit)
    trained = [
        train_bundled(
            console,
            engine,
            kind,
            layers=chosen,
            seed=seed,
            limit=limit,
            cache_dir=cache_dir / "activations",
            negatives=benign.negatives(),
        )
        for kind in kinds
    ]
    return calibrate_and_save(console, engine, trained, benign, out, tables=tables)


def run_training(o: Mapping[str, Any]) -> None:
    """`cotmon probes train` with its parsed options."""
    console = Console(highlight=False)
    settings = Settings.load(model=o["model"], device=o["device"], dtype=o["dtype"], seed=o["seed"])
    started = time.perf_counter()
    engine = load_reader(settings)
    layers = [int(x) for x in str(o["layers"]).split(",")] if o["layers"] else default_layers(engine.info.n_layers)
    out = Path(o["out"])
    cache = Path(o["cache_dir"]) if o["cache_dir"] else settings.data_dir
    dataset, target_fpr = str(o["dataset"]), float(o["target_fpr"])
    with progress_bar(console) as bar:
        benign = benign_set(engine, cache / "benign", bar, o["calibration_limit"])
    if dataset in BUNDLED:
        trained = train_bundled(
            console,
            engine,
            dataset,
            layers=layers,
            seed=settings.seed,
            limit=o["limit"] or 300,
            cache_dir=cache / "activations",
            negatives=benign.negatives(),
        )
    else:
        fields = dict(text_field=o["text_field"], label_field=o["label_field"], positive=o["positive"])
        items = load_labelled_file(dataset, limit=o["limit"], **fields) + benign.negatives()
        name = str(o["name"] or Path(dataset).stem)
        with progress_bar(console) as bar:
            trained = train_probe(
                engine,
                items,
                name=name,
                category=str(o["category"] or name),
                layers=layers,
                seed=settings.seed,
                training_data=[dataset, f"{len(benign.train)} texts of the model's own benign reasoning (negatives)"],
                target_fpr=target_fpr,
                cache_dir=cache / "activations",
                progress=bar(f"extracting activations for {name}", len(items)),
            )
    if o["control_path"] is not None:
        control = load_texts(o["control_path"], text_field=o["text_field"])
        benign = control_set(control, f"{o['control_path']} (control set, half held apart)", seed=settings.seed)
    (stem,) = calibrate_and_save(console, engine, [trained], benign, out, target_fpr=target_fpr)
    console.print(f"wrote {stem}.safetensors and {stem}.json in {time.perf_counter() - started:.1f} s")
