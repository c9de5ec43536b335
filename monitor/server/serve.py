"""Running the serving process: the app over what `monitor.build` built, under uvicorn."""

from __future__ import annotations

import asyncio
import gc
from pathlib import Path

import uvicorn

from monitor.build import build_service, load_reader
from monitor.engine.base import Engine, EngineError
from monitor.observability import get_logger
from monitor.server.app import create_app
from monitor.settings import Settings


def serve(settings: Settings, default_policy: Path) -> None:
    """Run the API until SIGTERM/SIGINT; in-flight streams get `drain_seconds` to finish. The vllm
    engine's self-test runs first, on the same event loop as the server (vLLM's output handler
    stays on the loop that first used it)."""
    service = build_service(settings, default_policy)
    pipeline, spool = service.pipeline, service.spool
    app = create_app(settings, pipeline, store=service.store, spool=spool, model_name=service.model_name)
    log = get_logger("cotmon.server")
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level="warning",
        timeout_graceful_shutdown=int(settings.drain_seconds),
        access_log=False,
    )
    engine = pipeline.engine

    async def main() -> None:
        if settings.engine == "vllm" and settings.vllm_selftest:
            await check_vllm_readouts(settings, engine)
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
        spool.close(drain=settings.drain_seconds)  # what the store has not taken yet stays spooled for the next start
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
