"""Watch lists: which SAE features to watch, under what label, category and threshold.

A feature is named by its index (`1234`), a Neuronpedia reference (`np:MODEL/SOURCE/1234`) or a
pasted Neuronpedia URL (`https://www.neuronpedia.org/MODEL/SOURCE/1234`). Neuronpedia names are
checked against the SAE's Neuronpedia id (`MODEL/SOURCE`), so a feature of another SAE or layer
cannot be watched by mistake. A threshold is an activation (`2.5`) or a multiple of the
feature's recorded max activation (`0.5x max`, with `max_activation`, e.g. Neuronpedia's
maxActApprox).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from detectors.sae.model import SAE, SAEError

_URL = re.compile(r"https?://(?:www\.)?neuronpedia\.org/([^/\s]+)/([^/\s]+)/(\d+)/?(?:[?#].*)?")
_NP = re.compile(r"np:([^/\s]+)/([^/\s]+)/(\d+)")
_TIMES_MAX = re.compile(r"\s*([0-9]*\.?[0-9]+)\s*x\s*max\s*")
FIELDS = ("feature", "label", "category", "threshold", "max_activation")


@dataclass(frozen=True)
class WatchedFeature:
    """One feature to watch."""

    index: int
    label: str
    category: str
    threshold: float
    """Activation at which the feature counts as firing (its score is 0.5 there)."""


def parse_watch(raw: Any, sae: SAE, where: str, default_category: str, default_threshold: Any = None) -> list[WatchedFeature]:
    """Validate a watch list against the SAE; errors start with `where` and name the SAE file."""
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise SAEError(f"{where}: 'watch' must be a list of features")
    out: list[WatchedFeature] = []
    for i, item in enumerate(raw):
        at = f"{where}: watch[{i}]"
        entry: Mapping[str, Any] = item if isinstance(item, Mapping) else {"feature": item}
        unknown = set(entry) - set(FIELDS)
        if unknown:
            raise SAEError(f"{at}: unknown field(s) {', '.join(sorted(map(str, unknown)))} (known: {', '.join(FIELDS)})")
        if "feature" not in entry:
            raise SAEError(f"{at}: missing field 'feature'")
        index = feature_index(entry["feature"], sae, at)
        max_act = entry.get("max_activation")
        if max_act is not None and (not _number(max_act) or max_act <= 0):
            raise SAEError(f"{at}: field 'max_activation' must be a positive number, got {max_act!r}")
        threshold = _threshold(entry.get("threshold", default_threshold), max_act, at)
        label = entry.get("label", f"feature {index}")
        category = entry.get("category", default_category)
        for key, value in (("label", label), ("category", category)):
            if not isinstance(value, str) or not value:
                raise SAEError(f"{at}: field {key!r} must be a non-empty string")
        out.append(WatchedFeature(index, label, category, threshold))
    if len({w.index for w in out}) != len(out):
        raise SAEError(f"{where}: a feature is watched twice")
    return out


def feature_index(ref: Any, sae: SAE, at: str) -> int:
    """The index a reference names, checked against the SAE (range, Neuronpedia model/source/layer)."""
    if isinstance(ref, bool):
        raise SAEError(f"{at}: feature {ref!r} is not an index or a Neuronpedia reference")
    if isinstance(ref, int):
        index = ref
    elif isinstance(ref, str) and ref.strip().isdigit():
        index = int(ref)
    elif isinstance(ref, str) and (m := _NP.fullmatch(ref.strip()) or _URL.fullmatch(ref.strip())):
        model, source, number = m.groups()
        _check_source(f"{model}/{source}", sae, at, ref)
        index = int(number)
    else:
        raise SAEError(
            f"{at}: feature {ref!r} is not an index, np:MODEL/SOURCE/INDEX, or https://www.neuronpedia.org/MODEL/SOURCE/INDEX"
        )
    if not 0 <= index < sae.d_sae:
        raise SAEError(
            f"{sae.info.source}: {at}: feature {index} is out of range: the SAE has {sae.d_sae} features (0..{sae.d_sae - 1})"
        )
    return index


def _check_source(named: str, sae: SAE, at: str, ref: str) -> None:
    known = sae.info.neuronpedia
    if not known:
        raise SAEError(
            f"{sae.info.source}: {at}: {ref!r} is a Neuronpedia reference, but the SAE's Neuronpedia id is unknown; "
            "set args.neuronpedia to its MODEL/SOURCE"
        )
    if named != known:
        raise SAEError(f"{sae.info.source}: {at}: {ref!r} names Neuronpedia source {named!r}, but this SAE is {known!r}")
    layer = re.match(r"(\d+)-", named.split("/", 1)[1])
    if layer and int(layer.group(1)) != sae.info.layer:
        raise SAEError(
            f"{sae.info.source}: {at}: {ref!r} is a layer-{layer.group(1)} feature, but the SAE reads layer {sae.info.layer}"
        )


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _threshold(value: Any, max_act: Any, at: str) -> float:
    if value is None:
        if max_act is None:
            raise SAEError(f"{at}: missing field 'threshold' (an activation, or '0.5x max' with max_activation)")
        return 0.5 * float(max_act)
    if isinstance(value, str) and (m := _TIMES_MAX.fullmatch(value)):
        if max_act is None:
            raise SAEError(f"{at}: threshold {value!r} is relative to the max activation; give field 'max_activation'")
        value = float(m.group(1)) * float(max_act)
    if not _number(value) or value <= 0:
        raise SAEError(f"{at}: field 'threshold' must be a positive activation or 'Fx max', got {value!r}")
    return float(value)
