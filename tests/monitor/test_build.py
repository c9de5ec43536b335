"""The composition root: what monitor.build makes of the settings."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from monitor.build import NO_RULES, build_engine, build_service
from monitor.engine.hf import HFEngine
from monitor.engine.upstream import UpstreamEngine
from monitor.observability import Metrics
from monitor.settings import Settings
from policies import bundled_policy


def test_a_service_without_detectors_has_no_rules_and_spools_in_front_of_its_store(tmp_path: Path) -> None:
    settings = Settings.load({}, model="tiny", probes="none", data_dir=tmp_path, served_model_name="agent-model")
    service = build_service(settings, bundled_policy("default"), metrics=Metrics(CollectorRegistry()))
    try:
        assert service.pipeline.policy is NO_RULES and not service.pipeline.specs
        assert service.pipeline.sinks == (service.spool,) and service.model_name == "agent-model"
        assert service.store.url.startswith("sqlite:") and (tmp_path / "transcripts.db").exists()
    finally:
        service.spool.close()
        service.store.close()


def test_the_upstream_engine_reads_with_the_local_model_and_asks_for_the_served_name() -> None:
    settings = Settings.load({}, model="tiny", engine="upstream", upstream_url="http://127.0.0.1:9/v1", served_model_name="m")
    engine, reader = build_engine(settings)
    assert isinstance(engine, UpstreamEngine) and isinstance(reader, HFEngine)
    assert engine.model == "m" and engine.url == "http://127.0.0.1:9/v1"


def test_the_upstream_engine_without_a_url_names_the_option() -> None:
    with pytest.raises(ValueError, match="--upstream-url"):
        build_engine(Settings.load({}, model="tiny", engine="upstream"))
