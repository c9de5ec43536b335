"""The detector registry: duplicates rejected, lazy entries, clear errors."""

from __future__ import annotations

import pytest

from monitor.detector import DetectorError, DetectorRegistry


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
