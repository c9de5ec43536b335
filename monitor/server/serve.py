"""Building the serving process from settings: engine, detectors, policy, sinks, app, uvicorn."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Sequence
from importlib.metadata import entry_points
from pathlib import Path

import uvicorn
from fastapi import FastAPI

from monitor.detector import DetectorError, load_detector_specs
from monitor.engine.base import Engine, EngineError
from monitor.engine.hf import HFEngine
from monitor.engine.upstream import UpstreamEngine
from monitor.observability import Metrics, default_metrics, get_logger
from monitor.pipeline import Pipeline
from monitor.policy import Policy, load_policy
from monitor.server.app import create_app
from monitor.settings import Settings
from monitor.sinks import Sink
from monitor.store import Retention, TranscriptStore
from monitor.store.spool import SpooledStore
from monitor.types import DetectorSpec

NO_RULES = Policy(name="none", description="no detectors are configured", rules=(), source="<no policy>")


AUTO = Path("auto")


def auto_probes(engine: HFEngine, root: Path, prebuilt: Sequence[Path] = ()) -> Path:
    """`--probes auto`: the installed default probe pack for this model, found whole in a read-only
    `prebuilt` folder, or cached under `root` and trained there on first use."""
    found = [ep for ep in entry_points(group="cotmon.probe_packs") if ep.name == "default"]
    if not found:
        raise FileNotFoundError("--probes auto needs a probe pack provider (entry point group cotmon.probe_packs)")
    directory: Path = found[0].load()(engine, root, prebuilt=prebuilt)
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


def open_spool(settings: Settings, store: TranscriptStore, metrics: Metrics) -> SpooledStore:
    """The pipeline's sink in front of `store`: sessions journaled under <data_dir>/spool, written to
    the store off the event loop; journals a previous process left are queued first."""
    spool = SpooledStore(store, settings.data_dir / "spool", errors=metrics.store_errors, waiting=metrics.store_spooled)
    spool.start()
    return spool


def open_store(settings: Settings, keep: Retention | None = None) -> TranscriptStore:
    """The transcript store the settings name (SQLite under data_dir by default), migrated to the
    newest schema; `keep` overrides the retention setting."""
    keep = keep or settings.store_keep
    return TranscriptStore.configured(
        settings.store_url, settings.data_dir, keep=keep, sample_rate=settings.store_sample, timeout=settings.store_timeout
    )


def load_reader(settings: Settings, *, device: str | None = None, dtype: str | None = None) -> HFEngine:
    """The hf engine on the configured model (the reader model in upstream mode)."""
    return HFEngine.load(
        settings.reader or settings.model,
        device=device or settings.device,
        dtype=dtype or settings.dtype,
        revision=settings.revision,
        seed=settings.seed,
        models_dir=settings.models_dir,
        think=settings.think,
        prebuilt_models=settings.prebuilt_models,
    )


def build_engine(settings: Settings) -> tuple[Engine, HFEngine | None]:
    """The engine the settings name, and the hf engine behind it (None for vllm)."""
    if settings.engine == "vllm":
        from monitor.engine.vllm import VLLMEngine

        engine = VLLMEngine.load(
            settings.model,
            revision=settings.revision,
            dtype=settings.dtype,
            seed=settings.seed,
            tensor_parallel_size=settings.tensor_parallel_size,
            gpu_memory_utilization=settings.gpu_memory_utilization,
            max_model_len=settings.max_model_len,
            capture=settings.vllm_capture,
            reasoning_parser=settings.reasoning_parser,
        )
        return engine, None
    reader = load_reader(settings)
    if settings.engine == "upstream":
        if not settings.upstream_url:
            raise ValueError("the upstream engine needs --upstream-url (COTMON_UPSTREAM_URL)")
        model = settings.upstream_model or settings.served_model_name or settings.model
        return UpstreamEngine(settings.upstream_url, reader, model=model, api_key=settings.upstream_api_key), reader
    return reader, reader


def resolve_probes(settings: Settings, reader: HFEngine | None) -> Path | None:
    """The probe directory; `auto` trains (or finds) the default pack with the hf engine. For
    vllm it is loaded for that and let go before vLLM starts, which takes the GPU."""
    if settings.probes != AUTO:
        return settings.probes
    if reader is not None:
        return auto_probes(reader, settings.probes_dir, settings.prebuilt_probes)
    trainer = load_reader(settings)
    directory = auto_probes(trainer, settings.probes_dir, settings.prebuilt_probes)
    del trainer
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return directory


def build_pipeline(
    settings: Settings, default_policy: Path, *, metrics: Metrics | None = None, store: Sink | None = None
) -> Pipeline:
    """Engine + detectors (`settings.probes`, `settings.detectors`) + policy (the given one, or
    `default_policy` when there are probes)."""
    engine, reader = build_engine(settings)
    specs = probe_specs(resolve_probes(settings, reader))
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
    metrics = default_metrics()
    spool = open_spool(settings, store, metrics)
    pipeline = build_pipeline(settings, default_policy, metrics=metrics, store=spool)
    return create_app(settings, pipeline, store=store, spool=spool, model_name=settings.served_model_name or settings.model)


def serve(settings: Settings, default_policy: Path) -> None:
    """Run the API until SIGTERM/SIGINT; in-flight streams get `drain_seconds` to finish. The vllm
    engine's self-test runs first, on the same event loop as the server (vLLM's output handler
    stays on the loop that first used it)."""
    app = build_app(settings, default_policy)
    log = get_logger("cotmon.server")
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level="warning",
        timeout_graceful_shutdown=int(settings.drain_seconds),
        access_log=False,
    )
    engine = app.state.cotmon.pipeline.engine

    async def main() -> None:
        if settings.engine == "vllm" and settings.vllm_selftest:
            await check_vllm_readouts(settings, engine)
        pipeline = app.state.cotmon.pipeline
        detectors = [spec.name for spec in pipeline.specs]
        if not detectors:
            log.warning(
                "unmonitored",
                reason="no detector is loaded (--no-probes and no --detectors or --judge-url): "
                "the model is served without monitoring",
            )
        log.info(
            "serving",
            host=settings.host,
            port=settings.port,
            model=settings.model,
            detectors=detectors,
            policy=pipeline.policy.name,
        )
        # What is loaded by now (model, detectors, libraries) lives as long as the process: moved out
        # of the garbage collector's sight, a full collection (which stops every thread, the event
        # loop's too) scans only what came later, not the whole heap.
        gc.collect()
        gc.freeze()
        await uvicorn.Server(config).serve()

    try:
        asyncio.run(main())
    finally:
        spool = app.state.cotmon.spool
        if spool is not None:  # what the store has not taken yet stays spooled for the next start
            spool.close(drain=settings.drain_seconds)
        if hasattr(engine, "close"):
            engine.close()


async def check_vllm_readouts(settings: Settings, engine: Engine) -> None:
    """The start-up self-test (monitor.engine.selftest) against the hf engine on CPU in float32;
    EngineError, with the per-readout table, when they disagree."""
    from monitor.engine.selftest import selftest

    log = get_logger("cotmon.server")
    installed = getattr(engine, "installed", ())
    if not installed:
        log.info("vllm_selftest_skipped", reason="no readouts installed")
        return
    reference = await asyncio.to_thread(load_reader, settings, device="cpu", dtype="float32")
    reference.install(installed)
    report = await selftest(engine, reference)
    if not report.ok:
        raise EngineError(report.message() + "\n(COTMON_VLLM_CAPTURE=hooks is the eager reference path)")
    log.info("vllm_selftest_passed", tokens=report.tokens, readouts=len(report.columns), table=report.table())
