"""Every Prometheus metric of cotmon and the structlog set-up, in one place.

Metrics live on an injected registry (the process-wide one by default); tests pass a fresh
`CollectorRegistry`. Labels are low-cardinality: never a session id.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

import structlog
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

from monitor.types import CHANNELS, OUTCOMES

SCORE_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)
PER_TOKEN_BUCKETS = (1e-6, 5e-6, 1e-5, 5e-5, 1e-4, 5e-4, 1e-3, 5e-3, 1e-2, 0.1)
LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    """The metrics of ARCHITECTURE.md "Observability", registered on `registry`."""

    def __init__(self, registry: CollectorRegistry = REGISTRY):
        self.registry = registry
        self.tokens = Counter("cotmon_tokens", "Tokens monitored.", ["channel"], registry=registry)
        self.sessions = Counter("cotmon_sessions", "Sessions finished, by outcome.", ["outcome"], registry=registry)
        self.sessions_active = Gauge("cotmon_sessions_active", "Sessions in progress.", registry=registry)
        self.detector_score = Histogram(
            "cotmon_detector_score",
            "Scores reported by detectors.",
            ["detector", "category"],
            buckets=SCORE_BUCKETS,
            registry=registry,
        )
        self.flags = Counter("cotmon_flags", "Policy rules fired.", ["category", "severity", "rule"], registry=registry)
        self.halts = Counter("cotmon_halts", "Generations halted by a rule.", ["rule"], registry=registry)
        self.judge_requests = Counter("cotmon_judge_requests", "LLM judge requests, by outcome.", ["outcome"], registry=registry)
        self.judge_latency = Histogram(
            "cotmon_judge_latency_seconds", "LLM judge request latency.", buckets=LATENCY_BUCKETS, registry=registry
        )
        self.judge_windows = Counter(
            "cotmon_judge_windows",
            "CoT windows the judge looked at, by route: escalated (LLM called), avoided (triage was enough), "
            "triage_only (no LLM configured).",
            ["route"],
            registry=registry,
        )
        self.judge_dropped_quotes = Counter(
            "cotmon_judge_dropped_quotes", "Judge quotes dropped because they are not verbatim in the CoT.", registry=registry
        )
        self.detector_seconds = Histogram(
            "cotmon_detector_seconds",
            "Host time a detector spends per token.",
            ["detector"],
            buckets=PER_TOKEN_BUCKETS,
            registry=registry,
        )
        self.flag_latency = Histogram(
            "cotmon_flag_latency_seconds",
            "Time from a token's arrival to the flag it raised.",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.store_errors = Counter("cotmon_store_errors", "Failed transcript writes.", registry=registry)
        self.store_spooled = Gauge(
            "cotmon_store_spooled_sessions",
            "Kept sessions waiting on local disk (the spool) for the transcript store.",
            registry=registry,
        )

    def declare(
        self, *, flags: Iterable[tuple[str, str, str]] = (), halts: Iterable[str] = (), detectors: Iterable[str] = ()
    ) -> None:
        """Export at 0 the series this deployment can have, before their first event.

        Prometheus sees a counter's first increment only as a change from an earlier sample: a
        series that is born at 1 shows no `increase()`, so the first flag of a rule would raise no
        alert. `flags` are (category, severity, rule) per policy rule; `halts` the rules that halt.
        """
        for channel in CHANNELS:
            self.tokens.labels(channel)
        for outcome in OUTCOMES:
            if outcome != "running":  # a checkpoint, never a finished session
                self.sessions.labels(outcome)
        for category, severity, rule in flags:
            self.flags.labels(category, severity, rule)
        for rule in halts:
            self.halts.labels(rule)
        for name in detectors:
            self.detector_seconds.labels(name)


_DEFAULT_METRICS: Metrics | None = None


def default_metrics() -> Metrics:
    """The process-wide metrics on prometheus_client's global registry (created once)."""
    global _DEFAULT_METRICS
    if _DEFAULT_METRICS is None:
        _DEFAULT_METRICS = Metrics()
    return _DEFAULT_METRICS


def configure_logging(*, json: bool = True, level: str = "info", stream: TextIO | None = None) -> None:
    """structlog to `stream` (stderr by default): JSON lines, or a console renderer for people."""
    renderer: Any = structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=structlog.PrintLoggerFactory(stream or sys.stderr),
        cache_logger_on_first_use=False,
    )


def get_logger(name: str = "cotmon") -> Any:
    return structlog.get_logger(name)


@contextmanager
def logging_to(path: Path, *, json: bool = True, level: str = "info") -> Iterator[None]:
    """Send log lines to the file `path` for the block, then restore the previous configuration."""
    saved = structlog.get_config()
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as stream:
        configure_logging(json=json, level=level, stream=stream)
        try:
            yield
        finally:
            structlog.configure(**saved)
