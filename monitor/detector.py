"""The detector extension point: a small protocol, and a registry that finds detectors by kind.

A detector kind is a class registered under a name. The registry holds lazy
``"module:Class"`` entries (built-in kinds come from the ``cotmon.detectors`` entry point group,
exactly like a user's plugin), so heavy modules load only when a kind is used.

A kind builds detectors in two steps: `prepare` checks a spec and loads its artifact once (a
pipeline prepares its detectors when it is built), and the builder it returns makes a cheap
detector for each stream. The registry checks every spec's arguments against the kind's
`known_args` before the kind sees them.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Protocol, TypeVar, runtime_checkable

from monitor.observability import Metrics, default_metrics
from monitor.types import STAT_SEPARATOR, AnyReadout, Detection, DetectorSpec, Evidence, Flag, ModelInfo, TraceStep

__all__ = [
    "Deferred",
    "Detector",
    "DetectorBuilder",
    "DetectorContext",
    "DetectorError",
    "DetectorKind",
    "DetectorRegistry",
    "DetectorSpec",
    "EmitFn",
    "Explainer",
    "build_detector",
    "check_args",
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
    metrics: Metrics = field(default_factory=default_metrics)
    """The pipeline's metrics, for detectors with metrics of their own (the judge); the process-wide
    ones when none are given."""
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


D = TypeVar("D", bound=Detector, covariant=True)

DetectorBuilder = Callable[[DetectorContext], D]
"""Builds one stream's detector from that stream's context (its `emit`, `scores` and `metrics`)."""


class DetectorKind(Protocol[D]):
    """What a registry entry resolves to: usually the detector class itself."""

    @property
    def known_args(self) -> Collection[str]:
        """Every argument a spec of this kind may give; the registry refuses any other."""
        ...

    def prepare(self, spec: DetectorSpec, context: DetectorContext) -> DetectorBuilder[D]:
        """Check `spec` (arguments already known) and load what it names, once per pipeline; return
        the builder of one detector per stream, which shares what was loaded."""
        ...


def check_args(spec: DetectorSpec, known: Collection[str]) -> None:
    """Refuse arguments a kind does not know, naming the spec and each key."""
    unknown = set(spec.args) - set(known)
    if unknown:
        listed = ", ".join(sorted(map(str, unknown)))
        raise DetectorError(f"detector {spec.name!r}: unknown arg(s) {listed} (known: {', '.join(known) or 'none'})")


def build_detector(kind: DetectorKind[D], spec: DetectorSpec, context: DetectorContext) -> D:
    """One detector straight from its kind, arguments checked (tools and tests; a pipeline prepares once)."""
    check_args(spec, kind.known_args)
    return kind.prepare(spec, context)(context)


class DetectorRegistry:
    """Maps detector kinds to their classes; rejects a kind registered twice, naming both sources."""

    def __init__(self) -> None:
        self._entries: dict[str, str | DetectorKind[Detector]] = {}
        self._sources: dict[str, str] = {}
        self._loaded: dict[str, DetectorKind[Detector]] = {}

    def register(self, kind: str, target: str | DetectorKind[Detector], *, source: str | None = None) -> None:
        """Register `kind` as a class or a lazy ``"module:Class"`` string; `source` says where it
        comes from (an entry point and its distribution), for the error a duplicate gets."""
        source = source or repr(target)
        if kind in self._entries:
            raise DetectorError(
                f"detector kind {kind!r} is already registered by {self._sources[kind]}; {source} registers it again"
            )
        if isinstance(target, str) and ":" not in target:
            raise DetectorError(f"detector kind {kind!r}: entry {target!r} is not of the form 'module:Class'")
        self._entries[kind] = target
        self._sources[kind] = source

    def register_entry_points(self, group: str = ENTRY_POINT_GROUP) -> None:
        """Register every installed ``cotmon.detectors`` entry point; two of one name are refused."""
        for ep in entry_points(group=group):
            dist = ep.dist.name if ep.dist is not None else "an unknown distribution"
            self.register(ep.name, ep.value, source=f"{ep.value!r} (entry point of {dist})")

    def kinds(self) -> list[str]:
        return sorted(self._entries)

    def resolve(self, kind: str) -> DetectorKind[Detector]:
        """The class of `kind`, importing its module on first use."""
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
                found: DetectorKind[Detector] = getattr(importlib.import_module(module_name), attr)
            except (ImportError, AttributeError) as exc:
                raise DetectorError(f"detector kind {kind!r}: cannot load {target!r}: {exc}") from exc
        else:
            found = target
        if not callable(getattr(found, "prepare", None)) or not isinstance(getattr(found, "known_args", None), Collection):
            raise DetectorError(
                f"detector kind {kind!r}: {self._sources[kind]} lacks known_args or prepare(spec, context) (see DetectorKind)"
            )
        self._loaded[kind] = found
        return found

    def prepare(self, spec: DetectorSpec, context: DetectorContext) -> DetectorBuilder[Detector]:
        """Check `spec` against its kind and load what it names; returns the per-stream builder."""
        kind = self.resolve(spec.kind)
        check_args(spec, kind.known_args)
        return kind.prepare(spec, context)

    def prepare_all(self, specs: Iterable[DetectorSpec], context: DetectorContext) -> list[DetectorBuilder[Detector]]:
        """One builder per spec; names must be unique."""
        seen: set[str] = set()
        builders = []
        for spec in specs:
            if spec.name in seen:
                raise DetectorError(f"two detectors are named {spec.name!r}")
            seen.add(spec.name)
            builders.append(self.prepare(spec, context))
        return builders


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
