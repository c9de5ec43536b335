"""The default probe pack for a model: trained on bundled data on first use, then cached.

`cotmon serve --probes auto` finds `default_pack` through the `cotmon.probe_packs` entry point
group (monitor never imports probes), so the first start of a new model trains its probes,
with progress on stderr, and later starts load them from the cache. A pack built ahead of time
in a read-only folder (`prebuilt`: the container image's) is served from there.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console

from monitor.engine.hf import HFEngine
from probes.datasets import model_slug
from probes.train_run import BUNDLED, train_pack


def pack_dir(root: Path, engine: HFEngine, tag: str = "") -> Path:
    """Where the pack of this model id and revision lives under `root` (`tag`: non-default training)."""
    slug = model_slug(engine.info.model_id)
    return root / f"{slug}@{engine.info.revision}{tag}"


def is_current(stem: Path) -> bool:
    """Whether a cached artifact exists whole and was calibrated the way this version calibrates
    (per session and statistic, with the 5% check): an older pack is trained again, not served."""
    meta, weights = stem.with_suffix(".json"), stem.with_suffix(".safetensors")
    if not (meta.is_file() and weights.is_file()):
        return False
    try:
        record = json.loads(meta.read_text(encoding="utf-8")).get("calibration", {})
    except (OSError, ValueError, AttributeError):
        return False
    return isinstance(record, dict) and record.get("unit") == "session" and "check" in record


def default_pack(
    engine: HFEngine,
    root: Path,
    *,
    limit: int | None = 300,
    layers: Sequence[int] | None = None,
    seed: int = 0,
    benign_limit: int | None = None,
    prebuilt: Sequence[Path] = (),
    console: Console | None = None,
    tables: bool = True,
) -> Path:
    """A directory holding the deception and harmful-planning probes for `engine`'s model, trained
    and calibrated on first use (`probes.train_run.train_pack`), loaded from `root` afterwards.
    A current pack in one of the read-only `prebuilt` folders (laid out like `root`) is used as is.
    A non-default `limit`, `layers`, `seed` or `benign_limit` gets a pack of its own. Progress and the training tables
    go to `console` (stderr by default; `tables=False`: progress only, for callers that print the
    artifacts' tables themselves)."""
    tag = "".join(
        part
        for part, default in (
            (f"-limit{limit}", limit == 300),
            (f"-layers{'_'.join(map(str, layers or ()))}", not layers),
            (f"-seed{seed}", seed == 0),
            (f"-benign{benign_limit}", benign_limit is None),
        )
        if not default
    )
    names = [name for name, *_rest in BUNDLED.values()]
    for folder in prebuilt:
        built = pack_dir(folder, engine, tag)
        if all(is_current(built / n) for n in names):
            return built
    directory = pack_dir(root, engine, tag)
    stale = [n for n in names if not is_current(directory / n)]
    if not stale:
        return directory
    console = console or Console(file=sys.stderr, highlight=False)
    if any((directory / f"{n}.json").exists() for n in stale):
        console.print(f"the cached pack in {directory} predates calibration per statistic with its 5% check: training it again")
    console.print(f"training the default probes for {engine.info.model_id} (once; cached in {directory})")
    train_pack(
        console,
        engine,
        directory,
        layers=layers,
        seed=seed,
        limit=limit,
        benign_limit=benign_limit,
        cache_dir=root,
        tables=tables,
    )
    return directory
