"""Linear probes: the artifact format and the `linear_probe` detector.

An artifact is two files side by side: ``NAME.safetensors`` (tensors ``direction`` [d_model],
``bias`` [1], ``mean`` [d_model], ``scale`` [d_model]) and ``NAME.json`` (metadata). The probe's
logit for a residual-stream vector h is ``((h - mean) / scale) @ direction + bias`` and its score
is ``sigmoid(logit)``, exactly scikit-learn's ``predict_proba`` after a ``StandardScaler``.
The standardisation folds into the readout, so the engine computes the logit on device.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from monitor.detector import DetectorContext, DetectorError, build_detector
from monitor.types import Detection, DetectorSpec, Evidence, ModelInfo, Readout, TraceStep

FORMAT = "cotmon.linear_probe/1"
TENSORS = ("direction", "bias", "mean", "scale")
FloatArray = npt.NDArray[np.float32]


class ProbeArtifactError(DetectorError):
    """A probe artifact that is malformed or does not fit the model."""


@dataclass(frozen=True)
class ProbeMetadata:
    """The JSON half of a probe artifact."""

    name: str
    category: str
    model_id: str
    model_revision: str
    layer: int
    d_model: int
    threshold: float
    """Per-token threshold: a benign session has a token at or above it at rate `target_fpr` (calibrated
    on the model's own benign text; older artifacts: a token does, on the control set)."""
    target_fpr: float
    training_data: list[str] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    calibration: dict[str, Any] = field(default_factory=dict)
    """How the thresholds were set and what they do (probes.calibrate): `unit` (session), `target_fpr`,
    `texts` (what they were set on), and per statistic (`last`, `mean@16` ...) its `threshold`,
    `calibration_n`, `heldapart_fpr`, `heldapart_n`, `recall`, `recall_n`; `check`: the same set at a
    5% target (its `target_fpr`, and per statistic `threshold`, `heldapart_fpr`), a rate the held-apart
    n can resolve. Empty: per-token only."""
    layers: list[dict[str, float]] = field(default_factory=list)
    """Training's per-layer results: layer, c, train_auroc, val_auroc."""
    format: str = FORMAT

    def statistic_thresholds(self) -> dict[str, float]:
        """Statistic -> calibrated threshold, for the windowed statistics (`last` is `threshold`)."""
        stats = self.calibration.get("statistics", {})
        return {key: float(value["threshold"]) for key, value in stats.items() if key != "last"}


@dataclass(frozen=True)
class LinearProbe:
    """A loaded probe: metadata plus weights."""

    meta: ProbeMetadata
    direction: FloatArray  # [d_model]
    bias: float
    mean: FloatArray  # [d_model]
    scale: FloatArray  # [d_model]

    def folded(self) -> tuple[FloatArray, float]:
        """(weight, bias) with the standardisation folded in: logit = h @ weight + bias."""
        weight = (self.direction / self.scale).astype(np.float32)
        return weight, float(self.bias - float(self.mean.astype(np.float64) @ weight.astype(np.float64)))

    def logits(self, hidden: npt.NDArray[np.floating[Any]]) -> npt.NDArray[np.float64]:
        """Reference computation on the host for activations [tokens, d_model]."""
        z = (hidden.astype(np.float64) - self.mean) / self.scale
        return np.asarray(z @ self.direction.astype(np.float64) + self.bias)

    def save(self, path: str | Path) -> Path:
        """Write `path`.safetensors and `path`.json; returns the stem path."""
        stem = _stem(path)
        stem.parent.mkdir(parents=True, exist_ok=True)
        save_file(
            {
                "direction": self.direction.astype(np.float32),
                "bias": np.array([self.bias], dtype=np.float32),
                "mean": self.mean.astype(np.float32),
                "scale": self.scale.astype(np.float32),
            },
            str(stem.with_suffix(".safetensors")),
        )
        stem.with_suffix(".json").write_text(json.dumps(asdict(self.meta), indent=2) + "\n")
        return stem

    def check_fits(self, model: ModelInfo, source: str, allow_other_model: bool = False) -> None:
        """Refuse a probe whose width, layer or model does not match `model`."""
        meta = self.meta
        if meta.d_model != model.d_model:
            raise ProbeArtifactError(
                f"{source}: probe was trained for d_model {meta.d_model}, "
                f"but model {model.model_id!r} has d_model {model.d_model}"
            )
        if not 0 <= meta.layer < model.n_layers:
            raise ProbeArtifactError(
                f"{source}: probe reads layer {meta.layer}, but model {model.model_id!r} has layers 0..{model.n_layers - 1}"
            )
        if meta.model_id != model.model_id and not allow_other_model:
            raise ProbeArtifactError(
                f"{source}: probe was trained on model {meta.model_id!r}, not {model.model_id!r} "
                "(set allow_other_model: true to use it anyway)"
            )


def _stem(path: str | Path) -> Path:
    p = Path(path)
    return p.with_suffix("") if p.suffix in (".json", ".safetensors") else p


def load_probe(path: str | Path) -> LinearProbe:
    """Load and validate an artifact; errors name the file and the field."""
    stem = _stem(path)
    meta_path, tensor_path = stem.with_suffix(".json"), stem.with_suffix(".safetensors")
    try:
        raw = json.loads(meta_path.read_text())
    except FileNotFoundError:
        raise ProbeArtifactError(f"{meta_path}: probe metadata file not found") from None
    except json.JSONDecodeError as exc:
        raise ProbeArtifactError(f"{meta_path}: not valid JSON ({exc})") from None
    meta = _parse_meta(raw, meta_path)
    try:
        tensors = load_file(str(tensor_path))
    except FileNotFoundError:
        raise ProbeArtifactError(f"{tensor_path}: probe weights file not found") from None
    except (SafetensorError, OSError) as exc:
        raise ProbeArtifactError(f"{tensor_path}: not a readable safetensors file ({exc})") from None
    for name in TENSORS:
        if name not in tensors:
            raise ProbeArtifactError(f"{tensor_path}: missing tensor {name!r}")
        expected = (1,) if name == "bias" else (meta.d_model,)
        if tuple(tensors[name].shape) != expected:
            raise ProbeArtifactError(
                f"{tensor_path}: tensor {name!r} has shape {tuple(tensors[name].shape)}, expected {expected} "
                f"(d_model {meta.d_model} in {meta_path.name})"
            )
        if not np.all(np.isfinite(tensors[name])):
            raise ProbeArtifactError(f"{tensor_path}: tensor {name!r} has non-finite values")
    if np.any(tensors["scale"] <= 0):
        raise ProbeArtifactError(f"{tensor_path}: tensor 'scale' must be positive")
    return LinearProbe(
        meta=meta,
        direction=tensors["direction"].astype(np.float32),
        bias=float(tensors["bias"][0]),
        mean=tensors["mean"].astype(np.float32),
        scale=tensors["scale"].astype(np.float32),
    )


def _parse_meta(raw: Any, source: Path) -> ProbeMetadata:
    if not isinstance(raw, Mapping):
        raise ProbeArtifactError(f"{source}: expected a JSON object")
    if raw.get("format") != FORMAT:
        raise ProbeArtifactError(f"{source}: field 'format' is {raw.get('format')!r}, expected {FORMAT!r}")
    kinds: dict[str, type | tuple[type, ...]] = {
        "name": str,
        "category": str,
        "model_id": str,
        "model_revision": str,
        "layer": int,
        "d_model": int,
        "threshold": (int, float),
        "target_fpr": (int, float),
        "training_data": list,
        "metrics": dict,
    }
    for key, kind in kinds.items():
        if key not in raw:
            raise ProbeArtifactError(f"{source}: missing field {key!r}")
        if not isinstance(raw[key], kind) or isinstance(raw[key], bool):
            raise ProbeArtifactError(f"{source}: field {key!r} has the wrong type ({type(raw[key]).__name__})")
    if raw["d_model"] < 1 or raw["layer"] < 0:
        raise ProbeArtifactError(f"{source}: fields 'd_model' and 'layer' must be positive")
    for key in ("threshold", "target_fpr"):
        if not 0.0 <= raw[key] <= 1.0:
            raise ProbeArtifactError(f"{source}: field {key!r} must be within [0, 1], got {raw[key]}")
    optional = {"calibration": dict, "layers": list}
    for key, kind in optional.items():
        if key in raw and not isinstance(raw[key], kind):
            raise ProbeArtifactError(f"{source}: field {key!r} has the wrong type ({type(raw[key]).__name__})")
    statistics = raw.get("calibration", {}).get("statistics", {})
    if not isinstance(statistics, Mapping):
        raise ProbeArtifactError(f"{source}: field 'calibration.statistics' must map statistics to their calibration")
    for key, value in statistics.items():
        threshold = value.get("threshold") if isinstance(value, Mapping) else None
        if not isinstance(threshold, int | float) or isinstance(threshold, bool) or not 0.0 <= threshold <= 1.0:
            raise ProbeArtifactError(f"{source}: field 'calibration.statistics.{key}.threshold' must be a number in [0, 1]")
    unknown = set(raw) - set(kinds) - set(optional) - {"format"}
    if unknown:
        raise ProbeArtifactError(f"{source}: unknown field(s) {', '.join(sorted(unknown))}")
    return ProbeMetadata(**{key: raw[key] for key in (*kinds, *optional, "format") if key in raw})


def _sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


class ProbeDetector:
    """Kind `linear_probe`: scores every token with a linear probe read out on device.

    Spec args: `artifact` (path, without or with suffix; relative to the context's base dir),
    optional `channels` (default both: reasoning and answer) and `allow_other_model`.
    """

    known_args = ("artifact", "channels", "allow_other_model")

    def __init__(self, spec: DetectorSpec, probe: LinearProbe, channels: Sequence[str]):
        self.spec = spec
        self.probe = probe
        self.category = probe.meta.category
        self._channels = frozenset(channels)
        self._evidence = (
            Evidence(
                label="linear probe",
                detail=f"layer {probe.meta.layer}, threshold {probe.meta.threshold:.3f} at {probe.meta.target_fpr:.0%} FPR"
                + (" per session" if probe.meta.calibration else ""),
                kind="probe",
            ),
        )

    @classmethod
    def prepare(cls, spec: DetectorSpec, context: DetectorContext) -> Callable[[DetectorContext], ProbeDetector]:
        """Load and check the artifact once; every stream's detector shares it."""
        artifact = spec.args.get("artifact")
        if not isinstance(artifact, str | Path):
            raise ProbeArtifactError(f"detector {spec.name!r}: args.artifact must be a path to a probe artifact")
        path = Path(artifact)
        path = path if path.is_absolute() else context.base_dir / path
        probe = load_probe(path)
        probe.check_fits(context.model, str(path), bool(spec.args.get("allow_other_model", False)))
        channels = spec.args.get("channels", ("reasoning", "answer"))
        if not isinstance(channels, list | tuple) or not set(channels) <= {"reasoning", "answer"}:
            raise ProbeArtifactError(f"detector {spec.name!r}: args.channels must list reasoning and/or answer")
        return lambda stream: cls(spec, probe, channels)

    @classmethod
    def create(cls, spec: DetectorSpec, context: DetectorContext) -> ProbeDetector:
        """One detector straight from a spec (tools and tests)."""
        return build_detector(cls, spec, context)

    def readouts(self) -> Sequence[Readout]:
        weight, bias = self.probe.folded()
        return [Readout(name=self.spec.name, layer=self.probe.meta.layer, weight=weight, bias=bias)]

    def calibrated_threshold(self) -> float | None:
        return self.probe.meta.threshold

    def calibrated_thresholds(self) -> Mapping[str, float]:
        return self.probe.meta.statistic_thresholds()

    async def observe(self, step: TraceStep) -> Sequence[Detection]:
        if step.channel not in self._channels:
            return ()
        logit = step.readouts.get(self.spec.name)
        if logit is None:
            return ()
        return (Detection(self.spec.name, self.category, _sigmoid(logit), step.index, step.index + 1, self._evidence),)
