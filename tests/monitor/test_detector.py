"""The detector registry: duplicates rejected, lazy entries, arguments checked for every kind, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from monitor.detector import DetectorContext, DetectorError, DetectorRegistry
from monitor.observability import Metrics
from monitor.testing import SCRIPTED_MODEL, ScriptedDetector
from monitor.types import DetectorSpec


def test_registering_a_kind_twice_is_rejected() -> None:
    registry = DetectorRegistry()
    registry.register("probe", "probes.linear:ProbeDetector")
    with pytest.raises(DetectorError, match="'probe' is already registered"):
        registry.register("probe", "probes.linear:ProbeDetector")


def test_lazy_entry_imports_its_module_on_resolve() -> None:
    registry = DetectorRegistry()
    registry.register("probe", "probes.linear:ProbeDetector")
    from probes.linear import ProbeDetector

    assert registry.resolve("probe") is ProbeDetector


def test_unknown_kind_lists_the_known_ones() -> None:
    registry = DetectorRegistry()
    registry.register("a", "x.y:Z")
    with pytest.raises(DetectorError, match=r"unknown detector kind 'b' \(registered: a\)"):
        registry.resolve("b")


def test_entry_that_cannot_be_imported_names_it() -> None:
    registry = DetectorRegistry()
    registry.register("broken", "no_such_module:Thing")
    with pytest.raises(DetectorError, match="cannot load 'no_such_module:Thing'"):
        registry.resolve("broken")


def test_entry_must_be_module_colon_class() -> None:
    with pytest.raises(DetectorError, match="not of the form 'module:Class'"):
        DetectorRegistry().register("x", "just_a_module")


def test_registering_a_kind_twice_names_both_sources() -> None:
    registry = DetectorRegistry()
    registry.register("probe", "probes.linear:ProbeDetector")
    with pytest.raises(DetectorError, match=r"by 'probes\.linear:ProbeDetector'; this test registers it again"):
        registry.register("probe", ScriptedDetector, source="this test")


GROUP = "cotmon.detectors_under_test"


def _distribution(root: Path, name: str, entries: str) -> None:
    """An installed distribution (its dist-info) whose entry points are `entries` (entry_points.txt lines)."""
    info = root / f"{name.replace('-', '_')}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[{GROUP}]\n{entries}\n")


def test_two_installed_entry_points_of_one_kind_are_refused_naming_both(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _distribution(tmp_path, "first-plugin", "probe = first_plugin:Probe")
    _distribution(tmp_path, "second-plugin", "probe = second_plugin:Probe\nother = second_plugin:Other")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(DetectorError, match="detector kind 'probe' is already registered") as err:
        DetectorRegistry().register_entry_points(GROUP)
    assert "'first_plugin:Probe' (entry point of first-plugin)" in str(err.value)
    assert "'second_plugin:Probe' (entry point of second-plugin)" in str(err.value)


@pytest.mark.parametrize("kind", ["linear_probe", "sae_features", "cot_judge"])
def test_every_kind_refuses_an_unknown_argument_naming_the_detector_and_the_key(kind: str) -> None:
    registry = DetectorRegistry()
    registry.register_entry_points()
    context = DetectorContext(model=SCRIPTED_MODEL, metrics=Metrics(CollectorRegistry()))
    with pytest.raises(DetectorError, match=r"detector 'mine': unknown arg\(s\) colour, size \(known: "):
        registry.prepare(DetectorSpec(kind, "mine", {"colour": "red", "size": 3}), context)


def test_a_class_without_the_kind_protocol_is_refused_naming_it() -> None:
    class OldStyle:
        @classmethod
        def create(cls, spec: DetectorSpec, context: DetectorContext) -> None: ...

    registry = DetectorRegistry()
    registry.register("old", OldStyle, source="OldStyle in my tests")  # type: ignore[arg-type]
    with pytest.raises(DetectorError, match=r"kind 'old': OldStyle in my tests lacks known_args or prepare\(spec, context\)"):
        registry.resolve("old")


def test_detectors_of_one_spec_are_prepared_once_and_built_fresh_per_stream() -> None:
    registry = DetectorRegistry()
    registry.register("scripted", ScriptedDetector)
    context = DetectorContext(model=SCRIPTED_MODEL, metrics=Metrics(CollectorRegistry()))
    (build,) = registry.prepare_all([DetectorSpec("scripted", "s", {"threshold": 0.7})], context)
    first, second = build(context), build(context)
    assert isinstance(first, ScriptedDetector) and first is not second
    assert first.calibrated_threshold() == second.calibrated_threshold() == 0.7
    with pytest.raises(DetectorError, match="two detectors are named 's'"):
        registry.prepare_all([DetectorSpec("scripted", "s"), DetectorSpec("scripted", "s")], context)
