"""The default probe pack for a model: trained on bundled data on first use, then cached.

`cotmon serve --probes auto` finds `default_pack` through the `cotmon.probe_packs` entry point
group (monitor never imports probes), so the first start of a new model trains its probes,
with progress on stderr, and later starts load them from the cache.
"""

from __future__ import annotations

import sys
from pathlib import Path

from rich.console import Console

from monitor.engine.hf import HFEngine
from probes.train_run import BUNDLED, default_layers, train_bundled


def pack_dir(root: Path, engine: HFEngine) -> Path:
    """Where the pack of this model id and revision lives under `root`."""
    slug = "".join(c if c.isalnum() or c in "-_." else "_" for c in engine.info.model_id)
    return root / f"{slug}@{engine.info.revision}"


def default_pack(engine: HFEngine, root: Path, *, limit: int | None = 300, seed: int = 0) -> Path:
    """A directory holding the deception and harmful-planning probes for `engine`'s model."""
    directory = pack_dir(root, engine)
    console = Console(file=sys.stderr, highlight=False)
    for kind, (name, *_rest) in BUNDLED.items():
        if (directory / f"{name}.json").exists() and (directory / f"{name}.safetensors").exists():
            continue
        console.print(f"training the default {name} for {engine.info.model_id} (cached in {directory})")
        train_bundled(
            console,
            engine,
            kind,
            directory,
            layers=default_layers(engine.info.n_layers),
            seed=seed,
            limit=limit,
            cache_dir=root / "activations",
        )
    return directory
