"""`cotmon`: the command line.

Commands that live in other packages (the applications' `demo` and `eval`, the plugins' `probes`
and `sae`) are found through the `cotmon.commands` entry point group and imported only when run,
so `monitor` never imports `apps`, `probes` or `detectors` and `cotmon --help` stays fast. Options
that set a setting are made from its `Settings` field (`monitor.options`).
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import click

from monitor.options import setting_option, setting_options

COMMAND_GROUP = "cotmon.commands"


class LazyGroup(click.Group):
    """A click group whose plugin commands load on first use."""

    def _plugins(self) -> dict[str, str]:
        return {ep.name: ep.value for ep in entry_points(group=COMMAND_GROUP)}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(self._plugins()))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        command = super().get_command(ctx, cmd_name)
        if command is not None:
            return command
        target = self._plugins().get(cmd_name)
        if target is None:
            return None
        module_name, _, attr = target.partition(":")
        loaded: Any = getattr(importlib.import_module(module_name), attr)
        return loaded if isinstance(loaded, click.Command) else None


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="cotmon")
def main() -> None:
    """cotmon watches the chain of thought of a reasoning model while it generates.

    White-box: linear probes (and SAE features) read the residual stream at every token.
    A policy turns their scores into flags: metrics, log lines, stored transcripts, and halts
    before the answer reaches the agent.

    Start with `cotmon demo`: on the embedded real model (smollm2: SmolLM2-135M-Instruct, no
    model hub needed) it trains and calibrates probes, runs bundled example transcripts and a live
    chat through the whole loop on a CPU. Then `cotmon serve` serves that model, monitored.
    """


def _add_store_commands() -> None:
    from monitor.cli.replay import replay
    from monitor.cli.transcripts import transcripts

    main.add_command(transcripts)
    main.add_command(replay)


@main.group()
def policy() -> None:
    """Check policy files."""


@policy.command("check")
@click.argument("path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--detector",
    "detectors",
    multiple=True,
    metavar="NAME[=THRESHOLD]",
    help="A detector that exists (repeatable), with its calibrated threshold if it has one. "
    "Without any, detector names are not checked.",
)
def policy_check(path: Path, detectors: tuple[str, ...]) -> None:
    """Validate a policy YAML file; errors name the file, rule and field."""
    from monitor.policy import PolicyError, load_policy

    known: dict[str, float | None] = {}
    for item in detectors:
        name, _, threshold = item.partition("=")
        known[name] = float(threshold) if threshold else None
    try:
        loaded = load_policy(path, known or None)
    except PolicyError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"{path}: ok, policy {loaded.name!r} with {len(loaded.rules)} rules")


SERVE_SETTINGS = (
    "model",
    "think",
    "host",
    "allowed_hosts",
    "port",
    "device",
    "dtype",
    "probes",
    "detectors",
    "policy",
    "served_model_name",
    "engine",
    "tensor_parallel_size",
    "gpu_memory_utilization",
    "vllm_capture",
    "upstream_url",
    "upstream_model",
    "reader",
    "judge_url",
    "judge_model",
    "store_url",
    "store_keep",
    "max_concurrent",
    "max_queued",
    "max_prompt_tokens",
    "max_transcript_tokens",
)
"""The settings `cotmon serve` takes as options (the others, secrets among them, only as variables)."""
EXISTING_FILE = click.Path(exists=True, dir_okay=False, path_type=Path)
SERVE_REFINED: dict[str, dict[str, Any]] = {
    "probes": {"type": click.Path(file_okay=False, path_type=Path)},
    "allowed_hosts": {"metavar": "NAMES"},
    "detectors": {"type": EXISTING_FILE},
    "policy": {"type": EXISTING_FILE},
    "store_url": {"metavar": "URL"},
}


@main.command()
@setting_options(*SERVE_SETTINGS, refined=SERVE_REFINED)
@click.option("--no-probes", is_flag=True, help="Load no probes: serve the model unmonitored (the start-up log says so).")
def serve(**options: Any) -> None:
    """Serve the model behind an OpenAI-compatible API, monitoring every stream.

    POST /v1/chat/completions (streaming or not; reasoning in delta.reasoning and
    delta.reasoning_content), POST /v1/monitor/transcripts (watch mode), GET /v1/models,
    /v1/sessions (stored transcripts, replay), /ui/ (the transcript viewer), /healthz, /readyz,
    /metrics. COTMON_API_KEY, when set, protects every route but the last three. Requests must
    address the server by an allowed host name (--allowed-hosts); the last three need not.
    """
    from monitor.engine.base import EngineError
    from monitor.observability import configure_logging
    from monitor.policy import PolicyError
    from monitor.server.serve import serve as run_server
    from monitor.settings import Settings, SettingsError
    from monitor.store import StoreError
    from policies import bundled_policy

    if options.pop("no_probes"):
        options["probes"] = "none"
    try:
        settings = Settings.load(**options)
        configure_logging(json=settings.log_format == "json", level=settings.log_level)
        run_server(settings, bundled_policy("default"))
    except (SettingsError, EngineError, PolicyError, StoreError, FileNotFoundError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None


@main.command()
@setting_option("model")
@click.option("--no-probes", is_flag=True, help="Only the model: no default probe pack.")
def prepare(model: str | None, no_probes: bool) -> None:
    """Build what `cotmon serve` builds on its first start, then exit.

    The model is loaded (smollm2 and *.gguf files dequantised into <data dir>/models) and, with
    `--probes auto` (the default), its default probe pack is trained and calibrated into
    <data dir>/probes. The container image runs it at build time with COTMON_DATA_DIR=/opt/cotmon
    and serves that folder read-only as COTMON_PREBUILT_DIR, so a container starts monitoring at once.
    """
    from monitor.build import load_reader, resolve_probes
    from monitor.engine.base import EngineError
    from monitor.settings import Settings, SettingsError

    try:
        settings = Settings.load(model=model, probes="none" if no_probes else None)
        reader = load_reader(settings)
        directory = resolve_probes(settings, reader)
    except (SettingsError, EngineError, FileNotFoundError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"model {reader.info.model_id} (revision {reader.info.revision}): ready")
    click.echo(f"probes: {directory or 'none'}")


_add_store_commands()
