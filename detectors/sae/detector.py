"""Kind `sae_features`: watched SAE features as tripwires, and top features as explanations.

Spec args:
    sae             path to the SAE (folder or file, any format in detectors.sae.formats)
    format          auto (default) or a format name
    layer, k, input_scale, neuronpedia
                    what the files may not say: the layer read, TopK's k, the dataset input
                    scale (SAELens' norm_scaling_factor), the Neuronpedia MODEL/SOURCE
    watch           features to watch (detectors.sae.watch): index / np: ref / URL, label,
                    category, threshold (activation or `Fx max` with max_activation)
    category        category of watched features that name none [sae_feature]
    threshold       threshold of watched features that give none
    explain         keep the top N features of every token and explain flagged spans with them [0: off]
    labels          CSV (feature_id|index, label|description) or JSONL (index, description) of feature labels
    channels        reasoning and/or answer [both]
    allow_other_model   use an SAE whose recorded model is not the served one

A watched feature's score is act / (act + threshold): 0 when inactive, 0.5 at its threshold
(the calibrated threshold policies get with `gte: calibrated`), towards 1 above. Each token
gives one detection per category: its highest-scoring watched feature.
"""

from __future__ import annotations

import csv
import gzip
import json
from collections.abc import Callable, Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

from detectors.sae.formats import Overrides, load_sae
from detectors.sae.model import SAE, SAEError
from detectors.sae.readouts import top_names, watched_readouts, watched_values
from detectors.sae.watch import WatchedFeature, parse_watch
from monitor.detector import DetectorContext, build_detector
from monitor.observability import get_logger
from monitor.types import AnyReadout, Detection, DetectorSpec, Evidence, Flag, TraceStep

CALIBRATED = 0.5


@lru_cache(maxsize=4)
def _cached_sae(path: str, mtime: float, fmt: str, overrides: tuple[Any, ...]) -> SAE:
    return load_sae(path, fmt, Overrides(*overrides))


def open_sae(path: Path, fmt: str = "auto", overrides: Overrides | None = None) -> SAE:
    """Load an SAE once per process (every pipeline prepares its detectors, a replay too; a large SAE is ~1 GiB)."""
    ov = overrides or Overrides()
    mtime = path.stat().st_mtime if path.exists() else 0.0
    return _cached_sae(str(path.resolve()), mtime, fmt, (ov.layer, ov.k, ov.input_scale, ov.neuronpedia))


def load_labels(path: Path) -> dict[int, str]:
    """Feature labels from a Neuronpedia explanations export (JSONL, .gz) or a CSV (Goodfire autointerp)."""
    opener: Any = gzip.open if path.suffix == ".gz" else open
    labels: dict[int, str] = {}
    try:
        with opener(path, "rt", encoding="utf-8") as fh:
            if ".csv" in path.suffixes:
                for n, row in enumerate(csv.DictReader(fh), start=2):
                    _add_label(labels, row.get("feature_id", row.get("index")), row.get("label", row.get("description")), path, n)
            else:
                for n, line in enumerate(fh, start=1):
                    if line.strip():
                        row = json.loads(line)
                        _add_label(labels, row.get("index"), row.get("description", row.get("label")), path, n)
    except FileNotFoundError:
        raise SAEError(f"{path}: labels file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError, OSError, AttributeError) as exc:
        raise SAEError(f"{path}: not a readable labels file ({exc})") from None
    return labels


def _add_label(labels: dict[int, str], index: Any, label: Any, path: Path, line: int) -> None:
    try:
        i = int(index)
    except (TypeError, ValueError):
        raise SAEError(f"{path}: line {line}: feature index {index!r} is not an integer") from None
    if label:
        labels.setdefault(i, str(label))


class SAEFeatureDetector:
    """Watches SAE features per token; explains flagged spans by their top features."""

    known_args = (
        "sae", "format", "layer", "k", "input_scale", "neuronpedia", "watch", "category", "threshold", "explain",
        "labels", "channels", "allow_other_model",
    )  # fmt: skip

    def __init__(
        self,
        spec: DetectorSpec,
        sae: SAE,
        watched: list[WatchedFeature],
        explain: int,
        labels: Mapping[int, str],
        channels: Sequence[str],
    ):
        self.spec = spec
        self.sae = sae
        self.watched = watched
        self.top = explain
        self.labels = labels
        """Feature index -> label: the labels file's, and the watched features' own (shared by every stream)."""
        self._channels = frozenset(channels)
        self._indices = [w.index for w in watched]
        self._texts: dict[int, str] = {}
        self._tops: dict[int, list[tuple[int, float]]] = {}

    @classmethod
    def prepare(cls, spec: DetectorSpec, context: DetectorContext) -> Callable[[DetectorContext], SAEFeatureDetector]:
        """Load the SAE (once per process), the watch list and the labels once; every stream's detector shares them."""
        args = spec.args
        where = f"detector {spec.name!r}"
        if not isinstance(args.get("sae"), str | Path):
            raise SAEError(f"{where}: args.sae must be the path of an SAE folder or file")
        path = Path(args["sae"])
        path = path if path.is_absolute() else context.base_dir / path
        overrides = Overrides(
            _opt(args, "layer", int, where), _opt(args, "k", int, where), _opt(args, "input_scale", float, where),
            _opt(args, "neuronpedia", str, where),
        )  # fmt: skip
        sae = open_sae(path, str(args.get("format", "auto")), overrides)
        _check_model(sae, context, bool(args.get("allow_other_model", False)))
        watched = parse_watch(args.get("watch"), sae, where, str(args.get("category", "sae_feature")), args.get("threshold"))
        explain = args.get("explain", 0)
        if not isinstance(explain, int) or isinstance(explain, bool) or not 0 <= explain <= min(64, sae.d_sae):
            raise SAEError(f"{where}: args.explain must be a number of top features in 0..{min(64, sae.d_sae)}")
        if not watched and not explain:
            raise SAEError(f"{where}: watches no feature and explains nothing; give args.watch and/or args.explain")
        labels = load_labels(_resolve(args["labels"], context)) if args.get("labels") else {}
        labels.update({w.index: w.label for w in watched})
        channels = args.get("channels", ("reasoning", "answer"))
        if not isinstance(channels, list | tuple) or not set(channels) <= {"reasoning", "answer"}:
            raise SAEError(f"{where}: args.channels must list reasoning and/or answer")
        return lambda stream: cls(spec, sae, watched, explain, labels, channels)

    @classmethod
    def create(cls, spec: DetectorSpec, context: DetectorContext) -> SAEFeatureDetector:
        """One detector straight from a spec (tools and tests)."""
        return build_detector(cls, spec, context)

    def readouts(self) -> Sequence[AnyReadout]:
        return watched_readouts(self.sae, self.spec.name, self._indices, self.top)

    def calibrated_threshold(self) -> float | None:
        return CALIBRATED if self.watched else None

    async def observe(self, step: TraceStep) -> Sequence[Detection]:
        self._texts[step.index] = step.text
        if self.top:
            names = top_names(self.spec.name, self.top)
            pairs = [(step.readouts.get(names[2 * j]), step.readouts.get(names[2 * j + 1])) for j in range(self.top)]
            self._tops[step.index] = [(int(i), float(a)) for i, a in pairs if i is not None and a is not None and a > 0]
        if step.channel not in self._channels or not self.watched:
            return ()
        values = watched_values(self.sae, self.spec.name, self._indices, step.readouts)
        best: dict[str, tuple[float, list[Evidence]]] = {}
        for w in self.watched:
            act = values.get(w.index)
            if act is None:
                continue
            score = act / (act + w.threshold) if act > 0 else 0.0
            evidence = best.get(w.category, (0.0, []))[1]
            if act >= w.threshold:
                quote = (step.text.strip(),) if step.text.strip() else ()
                evidence.append(Evidence(w.label, f"SAE feature {w.index} activation {act:.4g} >= {w.threshold:g}", quote, "sae"))
            best[w.category] = (max(score, best.get(w.category, (0.0, []))[0]), evidence)
        return tuple(
            Detection(self.spec.name, category, score, step.index, step.index + 1, tuple(evidence))
            for category, (score, evidence) in best.items()
        )

    def explain(self, flag: Flag, start: int, end: int) -> Sequence[Evidence]:
        """The span's top features by their highest activation in it."""
        if not self.top:
            return ()
        peak: dict[int, tuple[float, int]] = {}
        active: dict[int, int] = {}
        for t in range(start, end):
            for feature, act in self._tops.get(t, ()):
                active[feature] = active.get(feature, 0) + 1
                if act > peak.get(feature, (0.0, -1))[0]:
                    peak[feature] = (act, t)
        ranked = sorted(peak.items(), key=lambda kv: -kv[1][0])[: self.top]
        evidence = []
        for feature, (act, t) in ranked:
            label = f"SAE feature {feature}" + (f": {self.labels[feature]}" if feature in self.labels else "")
            quote = self._texts.get(t, "").strip()
            detail = (
                f"{self.spec.name} top feature over tokens {start}..{end - 1} (rule {flag.rule}): max activation "
                f"{act:.4g} at token {t}, active on {active[feature]} of {end - start} tokens"
            )
            evidence.append(Evidence(label, detail, (quote,) if quote else (), "sae"))
        return evidence


def _opt(args: Mapping[str, Any], key: str, kind: type, where: str) -> Any:
    value = args.get(key)
    if value is None:
        return None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise SAEError(f"{where}: args.{key} must be {kind.__name__}, got {value!r}")
    return value


def _resolve(value: Any, context: DetectorContext) -> Path:
    path = Path(str(value))
    return path if path.is_absolute() else context.base_dir / path


def _check_model(sae: SAE, context: DetectorContext, allow_other: bool) -> None:
    model = context.model
    if sae.d_in != model.d_model:
        raise SAEError(
            f"{sae.info.source}: the SAE reads d_in {sae.d_in}, but model {model.model_id!r} has d_model {model.d_model}"
        )
    if not 0 <= sae.info.layer < model.n_layers:
        raise SAEError(
            f"{sae.info.source}: the SAE reads layer {sae.info.layer}, "
            f"but model {model.model_id!r} has layers 0..{model.n_layers - 1}"
        )
    trained = sae.info.model_name.lower().rsplit("/", 1)[-1]
    served = model.model_id.lower().rstrip("/").rsplit("/", 1)[-1]
    if trained and trained != served and not allow_other:
        get_logger("cotmon.sae").warning(
            "sae_other_model", sae=sae.info.source, trained_on=sae.info.model_name, served=model.model_id,
            note="features transfer only approximately; validate them on this model (allow_other_model: true silences this)",
        )  # fmt: skip
