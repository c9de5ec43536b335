"""Building the serving process from settings: engine, detectors, policy, sinks, app, uvicorn."""

from __future__ import annotations

from importlib.metadata import entry_points
from pathlib import Path

import uvicorn
from fastapi import FastAPI

from monitor.detector import DetectorError, load_detector_specs
from monitor.engine.base import Engine
from monitor.engine.hf import HFEngine
from monitor.engine.upstream import UpstreamEngine
from monitor.observability import Metrics, default_metrics, get_logger
from monitor.pipeline import Pipeline
from monitor.policy import Policy, load_policy
from monitor.server.app import create_app
from monitor.settings import Settings
from monitor.store import Retention, TranscriptStore
from monitor.types import DetectorSpec

NO_RULES = Policy(name="none", description="no detectors are configured", rules=(), source="<no policy>")


AUTO = Path("auto")


def auto_probes(engine: HFEngine, root: Path) -> Path:
    """`--probes auto`: the installed default probe pack for this model, trained on first use."""
    found = [ep for ep in entry_points(group="cotmon.probe_packs") if ep.name == "default"]
    if not found:
        raise FileNotFoundError("--probes auto needs a probe pack provider (entry point group cotmon.probe_packs)")
    directory: Path = found[0].load()(engine, root)
    return directory


def probe_specs(directory: Path | None) -> list[DetectorSpec]:
    """One `linear_probe` detector per artifact (NAME.json + NAME.safetensors) in `directory`."""
    if directory is None:
        return []
    if not directory.is_dir():
        raise FileNotFoundError(f"probe directory {directory} does not exist")
    return [
        DetectorSpec("linear_probe", meta.stem, {"artifact": str(meta.with_suffix("").resolve())})
        for meta in sorted(directory.glob("*.json"))
        if meta.with_suffix(".safetensors").exists()
    ]


def open_store(settings: Settings, keep: Retention | None = None) -> TranscriptStore:
    """The transcript store the settings name (SQLite under data_dir by default), migrated to the
    newest schema; `keep` overrides the retention setting."""
    keep = keep or settings.store_keep
    return TranscriptStore.configured(settings.store_url, settings.data_dir, keep=keep, sample_rate=settings.store_sample)


def build_pipeline(
    settings: Settings, default_policy: Path, *, metrics: Metrics | None = None, store: TranscriptStore | None = None
) -> Pipeline:
    """Engine + detectors (`settings.probes`, `settings.detectors`) + policy (the given one, or
    `default_policy` when there are probes)."""
    reader = HFEngine.load(
        settings.reader or settings.model,
        device=settings.device,
        dtype=settings.dtype,
        revision=settings.revision,
        seed=settings.seed,
    )
    engine: Engine = reader
    if settings.engine == "upstream":
        if not settings.upstream_url:
            raise ValueError("the upstream engine needs --upstream-url (COTMON_UPSTREAM_URL)")
        model = settings.upstream_model or settings.served_model_name or settings.model
        engine = UpstreamEngine(settings.upstream_url, reader, model=model, api_key=settings.upstream_api_key)
    probes = auto_probes(reader, settings.probes_dir) if settings.probes == AUTO else settings.probes
    specs = probe_specs(probes)
    if settings.policy is not None:
        policy = load_policy(settings.policy)
    elif specs:
        policy = load_policy(default_policy)
    else:
        policy = NO_RULES
    if settings.judge_url:
        args = {} if settings.judge_url == "triage" else {"url": settings.judge_url, "model": settings.judge_model or ""}
        specs.append(DetectorSpec("cot_judge", "cot_judge", args))
    base_dir = Path.cwd()
    if settings.detectors is not None:
        specs += load_detector_specs(settings.detectors)
        base_dir = settings.detectors.resolve().parent
    try:
        secrets = {"judge_api_key": settings.judge_api_key} if settings.judge_api_key else {}
        return Pipeline(
            engine,
            specs,
            policy,
            metrics=metrics or default_metrics(),
            sinks=[store] if store is not None else [],
            base_dir=base_dir,
            secrets=secrets,
        )
    except DetectorError as exc:
        where = f"{settings.detectors}: " if settings.detectors is not None else ""
        raise DetectorError(f"{where}{exc}") from exc


def build_app(settings: Settings, default_policy: Path) -> FastAPI:
    store = open_store(settings)
    pipeline = build_pipeline(settings, default_policy, store=store)
    return create_app(settings, pipeline, store=store, model_name=settings.served_model_name or settings.model)


def serve(settings: Settings, default_policy: Path) -> None:
    """Run the API until SIGTERM/SIGINT; in-flight streams get `drain_seconds` to finish."""
    app = build_app(settings, default_policy)
    get_logger("cotmon.server").info("serving", host=settings.host, port=settings.port, model=settings.model)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level="warning",
        timeout_graceful_shutdown=int(settings.drain_seconds),
        access_log=False,
    )
    uvicorn.Server(config).run()
