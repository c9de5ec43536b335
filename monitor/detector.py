"""The detector extension point: a small protocol, and a registry that finds detectors by kind.

A detector kind is a class registered under a name. The registry holds lazy
``"module:Class"`` entries (built-in kinds come from the ``cotmon.detectors`` entry point group,
exactly like a user's plugin), so heavy modules load only when a kind is used.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from monitor.types import STAT_SEPARATOR, AnyReadout, Detection, DetectorSpec, Evidence, Flag, ModelInfo, TraceStep

__all__ = [
    "Deferred",
    "Detector",
    "DetectorContext",
    "DetectorError",
    "DetectorFactory",
    "DetectorRegistry",
    "DetectorSpec",
    "EmitFn",
    "Explainer",
    "default_registry",
]

ENTRY_POINT_GROUP = "cotmon.detectors"

EmitFn = Callable[[Sequence[Detection]], None]
"""Callback through which a slow detector (the judge) hands in detections later."""


class DetectorError(ValueError):
    """A detector cannot be built: unknown kind, bad arguments, an artifact that does not fit."""


@dataclass(frozen=True)
class DetectorContext:
    """What a detector may use when it is built."""

    model: ModelInfo
    """The model the engine runs; artifacts are checked against it."""
    base_dir: Path = field(default_factory=Path.cwd)
    """Relative artifact paths in specs resolve against this directory."""
    emit: EmitFn | None = None
    """Set by the pipeline for each stream; detectors that answer late call it."""
    scores: Mapping[str, float] = field(default_factory=dict)
    """Set by the pipeline for each stream: the highest score so far per detector name (live view)."""
    metrics: Any = None
    """The pipeline's `monitor.observability.Metrics`, for detectors with metrics of their own (the judge)."""
    secrets: Mapping[str, str] = field(default_factory=dict, repr=False)
    """Credentials from settings (`judge_api_key`); kept out of specs, which transcripts store."""


@runtime_checkable
class Detector(Protocol):
    """Scores a stream of tokens. One instance per stream, so per-stream state is safe."""

    spec: DetectorSpec

    def readouts(self) -> Sequence[AnyReadout]:
        """Columns this detector needs the engine to compute for every token (linear or on-device functions)."""
        ...

    def calibrated_threshold(self) -> float | None:
        """Score at the artifact's calibrated false-positive rate, if it has one."""
        ...

    async def observe(self, step: TraceStep) -> Sequence[Detection]:
        """Look at one token; return detections available now (possibly none)."""
        ...


@runtime_checkable
class StatCalibrated(Protocol):
    """A detector whose thresholds are calibrated on windowed statistics too (a probe artifact)."""

    def calibrated_thresholds(self) -> Mapping[str, float]:
        """Statistic (`mean@16`, `ema@16`: `monitor.policy.stat_key`'s names) -> its calibrated threshold."""
        ...


@runtime_checkable
class Explainer(Protocol):
    """A detector that can explain a flagged span (an SAE detector: the span's top features)."""

    def explain(self, flag: Flag, start: int, end: int) -> Sequence[Evidence]:
        """Evidence for why tokens [start, end) look the way they do; () when it has none."""
        ...


@runtime_checkable
class Deferred(Protocol):
    """A detector with work in flight (the judge) whose detections arrive later through `emit`."""

    async def settle(self) -> None:
        """Return once every piece of work started so far has handed in its detections (or failed)."""
        ...


class DetectorFactory(Protocol):
    """What a registry entry resolves to: usually the detector class itself."""

    def create(self, spec: DetectorSpec, context: DetectorContext) -> Detector:
        """Build one detector instance for one stream."""
        ...


class DetectorRegistry:
    """Maps detector kinds to factories; rejects a kind registered twice."""

    def __init__(self) -> None:
        self._entries: dict[str, str | DetectorFactory] = {}
        self._loaded: dict[str, DetectorFactory] = {}

    def register(self, kind: str, target: str | DetectorFactory) -> None:
        """Register `kind` as a factory object or a lazy ``"module:Class"`` string."""
        if kind in self._entries:
            raise DetectorError(f"detector kind {kind!r} is already registered ({self._entries[kind]!r})")
        if isinstance(target, str) and ":" not in target:
            raise DetectorError(f"detector kind {kind!r}: entry {target!r} is not of the form 'module:Class'")
        self._entries[kind] = target

    def register_entry_points(self, group: str = ENTRY_POINT_GROUP) -> None:
        """Register every installed ``cotmon.detectors`` entry point not yet registered."""
        for ep in entry_points(group=group):
            if ep.name not in self._entries:
                self.register(ep.name, ep.value)

    def kinds(self) -> list[str]:
        return sorted(self._entries)

    def resolve(self, kind: str) -> DetectorFactory:
        """The factory for `kind`, importing its module on first use."""
        if kind in self._loaded:
            return self._loaded[kind]
        try:
            target = self._entries[kind]
        except KeyError:
            known = ", ".join(self.kinds()) or "none"
            raise DetectorError(f"unknown detector kind {kind!r} (registered: {known})") from None
        if isinstance(target, str):
            module_name, _, attr = target.partition(":")
            try:
                factory: DetectorFactory = getattr(importlib.import_module(module_name), attr)
            except (ImportError, AttributeError) as exc:
                raise DetectorError(f"detector kind {kind!r}: cannot load {target!r}: {exc}") from exc
        else:
            factory = target
        self._loaded[kind] = factory
        return factory

    def create(self, spec: DetectorSpec, context: DetectorContext) -> Detector:
        return self.resolve(spec.kind).create(spec, context)

    def create_all(self, specs: Iterable[DetectorSpec], context: DetectorContext) -> list[Detector]:
        """Build one detector per spec; names must be unique."""
        seen: set[str] = set()
        detectors = []
        for spec in specs:
            if spec.name in seen:
                raise DetectorError(f"two detectors are named {spec.name!r}")
            seen.add(spec.name)
            detectors.append(self.create(spec, context))
        return detectors


_DEFAULT: DetectorRegistry | None = None


def default_registry() -> DetectorRegistry:
    """The process-wide registry with every installed entry point; tests build their own."""
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = DetectorRegistry()
        _DEFAULT.register_entry_points()
    return _DEFAULT


def load_detector_specs(path: Path) -> list[DetectorSpec]:
    """Detector specs from a YAML file: a list (or `detectors:` list) of {kind, name, args}.

    Errors name the file and the entry. Relative paths inside `args` are resolved by each detector
    against the file's directory (pass it as the pipeline's base_dir).
    """
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DetectorError(f"{path}: detectors file not found") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise DetectorError(f"{path}: not valid YAML ({exc})") from None
    if isinstance(data, Mapping) and set(data) == {"detectors"}:
        data = data["detectors"]
    if not isinstance(data, list):
        raise DetectorError(f"{path}: expected a list of detectors (or a mapping with one key, 'detectors')")
    specs = []
    for i, item in enumerate(data):
        where = f"{path}: detectors[{i}]"
        if not isinstance(item, Mapping):
            raise DetectorError(f"{where}: expected a mapping with kind, name and args")
        unknown = set(item) - {"kind", "name", "args"}
        if unknown:
            raise DetectorError(f"{where}: unknown field(s) {', '.join(sorted(map(str, unknown)))} (known: kind, name, args)")
        for key in ("kind", "name"):
            if not isinstance(item.get(key), str) or not item[key]:
                raise DetectorError(f"{where}: field {key!r} must be a non-empty string")
        if not isinstance(item.get("args", {}), Mapping):
            raise DetectorError(f"{where}: field 'args' must be a mapping")
        specs.append(DetectorSpec.from_dict(item))
    return specs


def thresholds_of(detectors: Sequence[Detector]) -> Mapping[str, float | None]:
    """Calibrated threshold per detector name, for policies that say `gte: calibrated`, plus
    `name:statistic` for the statistics a detector is calibrated on (`monitor.policy.calibrated_bound`)."""
    thresholds: dict[str, float | None] = {}
    for d in detectors:
        thresholds[d.spec.name] = d.calibrated_threshold()
        if isinstance(d, StatCalibrated):
            thresholds.update({d.spec.name + STAT_SEPARATOR + key: value for key, value in d.calibrated_thresholds().items()})
    return thresholds
