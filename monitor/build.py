"""The composition root: a cotmon process's parts built from `Settings`.

Engine (hf, upstream with its hf reader, or vllm), detectors (probe packs, a detectors file, the
judge), policy, transcript store with its spool, metrics and sinks are constructed here and
nowhere else; `cotmon serve`, the demo, eval, replay and the benches call these functions, then
only run what they get. The server, the CLI and the applications sit above this module; the
pipeline, engines, store and policy below it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path

from monitor.detector import DetectorError, load_detector_specs
from monitor.engine.base import Engine
from monitor.engine.hf import HFEngine
from monitor.engine.upstream import UpstreamEngine
from monitor.observability import Metrics, default_metrics
from monitor.pipeline import Pipeline
from monitor.policy import Policy, load_policy
from monitor.settings import Settings
from monitor.sinks import Sink
from monitor.store import Retention, TranscriptStore
from monitor.store.spool import SpooledStore
from monitor.types import DetectorSpec

NO_RULES = Policy(name="none", description="no detectors are configured", rules=(), source="<no policy>")
"""The policy of a pipeline without detectors (and of evaluations, which score without rules)."""

AUTO = Path("auto")
"""`--probes auto`: the default probe pack for the model."""


def load_reader(settings: Settings, *, device: str | None = None, dtype: str | None = None) -> HFEngine:
    """The hf engine on the configured model (the reader model in upstream mode); `device` and
    `dtype` override the settings (the vllm self-test's CPU reference)."""
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
        from monitor.engine.vllm import VLLMEngine  # vllm loads only when asked for

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


def auto_probes(engine: HFEngine, root: Path, prebuilt: Sequence[Path] = ()) -> Path:
    """`--probes auto`: the installed default probe pack for this model, found whole in a read-only
    `prebuilt` folder, or cached under `root` and trained there on first use."""
    found = [ep for ep in entry_points(group="cotmon.probe_packs") if ep.name == "default"]
    if not found:
        raise FileNotFoundError("--probes auto needs a probe pack provider (entry point group cotmon.probe_packs)")
    directory: Path = found[0].load()(engine, root, prebuilt=prebuilt)
    return directory


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


def build_policy(settings: Settings, default_policy: Path, *, monitored: bool) -> Policy:
    """The policy the settings name; else `default_policy` when there are probes (`monitored`),
    else no rules."""
    if settings.policy is not None:
        return load_policy(settings.policy)
    return load_policy(default_policy) if monitored else NO_RULES


def open_store(settings: Settings, keep: Retention | None = None) -> TranscriptStore:
    """The transcript store the settings name (SQLite under data_dir by default), migrated to the
    newest schema; `keep` overrides the retention setting."""
    keep = keep or settings.store_keep
    return TranscriptStore.configured(
        settings.store_url, settings.data_dir, keep=keep, sample_rate=settings.store_sample, timeout=settings.store_timeout
    )


def open_spool(settings: Settings, store: TranscriptStore, metrics: Metrics) -> SpooledStore:
    """The pipeline's sink in front of `store`: sessions journaled under <data_dir>/spool, written to
    the store off the event loop; journals a previous process left are queued first."""
    spool = SpooledStore(store, settings.data_dir / "spool", errors=metrics.store_errors, waiting=metrics.store_spooled)
    spool.start()
    return spool


def build_pipeline(
    settings: Settings,
    default_policy: Path,
    *,
    metrics: Metrics | None = None,
    store: Sink | None = None,
    engine: Engine | None = None,
    probes: Path | None = AUTO,
) -> Pipeline:
    """Engine + detectors (`settings.probes`, `settings.detectors`, `settings.judge_url`) + policy
    (the configured one, or `default_policy` when there are probes). A caller that built the engine
    or the probe pack itself (the demo trains its own) passes them; `probes=AUTO`: as the settings say."""
    reader = None
    if engine is None:
        engine, reader = build_engine(settings)
    if probes == AUTO:
        probes = resolve_probes(settings, reader if reader is not None else _hf_or_none(engine))
    specs = probe_specs(probes)
    policy = build_policy(settings, default_policy, monitored=bool(specs))
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


def _hf_or_none(engine: Engine) -> HFEngine | None:
    return engine if isinstance(engine, HFEngine) else None


@dataclass
class Service:
    """What `cotmon serve` runs: the pipeline, the store the viewer reads, the spool in front of it."""

    settings: Settings
    pipeline: Pipeline
    store: TranscriptStore
    spool: SpooledStore
    metrics: Metrics = field(repr=False)

    @property
    def model_name(self) -> str:
        """The name clients use for the model."""
        return self.settings.served_model_name or self.settings.model


def build_service(settings: Settings, default_policy: Path, *, metrics: Metrics | None = None) -> Service:
    """The whole serving process but its HTTP app: store, spool, then the pipeline; `metrics` on the
    process-wide registry unless given."""
    store = open_store(settings)
    metrics = metrics or default_metrics()
    spool = open_spool(settings, store, metrics)
    pipeline = build_pipeline(settings, default_policy, metrics=metrics, store=spool)
    return Service(settings, pipeline, store, spool, metrics)
