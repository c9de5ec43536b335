"""The work behind `cotmon probes train`, the demo's training step and `serve --probes auto`."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from monitor.engine.hf import HFEngine
from monitor.settings import Settings
from probes.datasets import examples_as_training, load_contrast, load_examples, load_labelled_file, load_texts
from probes.linear import LinearProbe
from probes.train import LayerResult, train_probe

# bundled set -> (probe name, category, contrast file stem, positive example label)
BUNDLED = {
    "deception": ("deception_probe", "deception", "deception", "deceptive"),
    "harmful": ("harmful_probe", "harmful_planning", "harmful", "harmful_planning"),
}


def default_layers(n_layers: int) -> list[int]:
    """A few evenly spaced middle layers (all of them for small models)."""
    if n_layers <= 6:
        return list(range(n_layers))
    return sorted({round(n_layers * f) for f in (0.25, 0.4, 0.5, 0.6, 0.75)})


def print_layer_table(console: Console, name: str, results: Sequence[LayerResult], probe: LinearProbe) -> None:
    table = Table(title=f"{name}: per-layer AUROC (validation texts held out from training)", title_justify="left")
    for col in ("layer", "C", "train AUROC", "val AUROC"):
        table.add_column(col, justify="right")
    for r in results:
        mark = " <- chosen" if r.layer == probe.meta.layer else ""
        table.add_row(str(r.layer), f"{r.c:g}", f"{r.train_auroc:.3f}", f"{r.val_auroc:.3f}{mark}")
    console.print(table)
    fpr = probe.meta.metrics.get("calibration_token_fpr", float("nan"))
    console.print(
        f"  threshold {probe.meta.threshold:.4f} at {probe.meta.target_fpr:.0%} target FPR "
        f"(measured {fpr:.2%} on {int(probe.meta.metrics.get('calibration_tokens', 0))} benign tokens)"
    )


@contextmanager
def extraction_bar(console: Console, name: str, total: int) -> Iterator[Callable[[int], None]]:
    """A progress bar over the texts whose activations are extracted; yields its advance callback."""
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task(f"extracting activations for {name}", total=total)
        yield lambda n: bar.advance(task, n)


def train_bundled(
    console: Console,
    engine: HFEngine,
    kind: str,
    out: Path,
    *,
    layers: Sequence[int],
    seed: int = 0,
    limit: int | None = 300,
    cache_dir: Path | None = None,
) -> tuple[LinearProbe, Path]:
    """Train the bundled `deception` or `harmful` probe, print its table, save it into `out`."""
    name, category, contrast, positive = BUNDLED[kind]
    items = load_contrast(contrast, limit) + examples_as_training(load_examples(), positive)  # type: ignore[arg-type]
    with extraction_bar(console, name, len(items)) as progress:
        probe, results = train_probe(
            engine,
            items,
            name=name,
            category=category,
            layers=layers,
            seed=seed,
            cache_dir=cache_dir,
            training_data=[f"probes/data/{contrast}_contrast.jsonl", "probes/data/examples.jsonl (train split)"],
            progress=progress,
        )
    print_layer_table(console, name, results, probe)
    return probe, probe.save(out / name)


def run_training(o: Mapping[str, Any]) -> None:
    """`cotmon probes train` with its parsed options."""
    console = Console(highlight=False)
    settings = Settings.load(model=o["model"], device=o["device"], dtype=o["dtype"], seed=o["seed"])
    started = time.perf_counter()
    engine = HFEngine.load(
        settings.model, device=settings.device, dtype=settings.dtype, revision=settings.revision, seed=settings.seed
    )
    layers = [int(x) for x in str(o["layers"]).split(",")] if o["layers"] else default_layers(engine.info.n_layers)
    out, cache = Path(o["out"]), Path(o["cache_dir"] or settings.data_dir / "activations")
    dataset = str(o["dataset"])
    if dataset in BUNDLED:
        probe, stem = train_bundled(
            console, engine, dataset, out, layers=layers, seed=settings.seed, limit=o["limit"] or 300, cache_dir=cache
        )
    else:
        fields = dict(text_field=o["text_field"], label_field=o["label_field"], positive=o["positive"])
        items = load_labelled_file(dataset, limit=o["limit"], **fields)
        control = load_texts(o["control_path"], text_field=o["text_field"]) if o["control_path"] is not None else []
        name = str(o["name"] or Path(dataset).stem)
        with extraction_bar(console, name, len(items) + len(control)) as progress:
            probe, results = train_probe(
                engine,
                items,
                name=name,
                category=str(o["category"] or name),
                layers=layers,
                seed=settings.seed,
                training_data=[dataset],
                control=control,
                target_fpr=float(o["target_fpr"]),
                cache_dir=cache,
                progress=progress,
            )
        print_layer_table(console, name, results, probe)
        stem = probe.save(out / name)
    console.print(f"wrote {stem}.safetensors and {stem}.json in {time.perf_counter() - started:.1f} s")
