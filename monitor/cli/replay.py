"""`cotmon replay`: run stored sessions again under their own or a new pipeline and diff the flags."""

from __future__ import annotations

import asyncio
import json
import re
import sys
from pathlib import Path
from typing import Any

import click

from monitor.cli.store_options import filter_options, open_store, session_query, store_option
from monitor.options import setting_options

TINY_REVISION = re.compile(r"^seed(-?\d+)-")


@click.command()
@click.argument("target", required=False, metavar="ID|FILE")
@click.option("--all", "replay_all", is_flag=True, help="Backtest --policy over every stored session (filters apply); no model.")
@click.option(
    "--policy",
    "policy_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Policy YAML to replay under [the one stored with the session].",
)
@click.option(
    "--detectors",
    "detectors_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Detectors YAML ({kind, name, args} list) to replay with [the stored detector specs].",
)
@click.option("--policy-only", is_flag=True, help="Re-run only the policy, over the stored detections: no model, no detectors.")
@click.option("--model", default=None, help="Model to teacher-force with [the session's model id].")
@setting_options("device", "dtype")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@store_option
@filter_options
def replay(
    target: str | None,
    replay_all: bool,
    policy_path: Path | None,
    detectors_path: Path | None,
    policy_only: bool,
    model: str | None,
    device: str | None,
    dtype: str | None,
    as_json: bool,
    store_url: str | None,
    **filters: Any,
) -> None:
    """Replay a stored session (ID, from the store) or exported transcripts (FILE: JSON or JSONL from
    `cotmon transcripts export`) and print how the flags change.

    By default the session's own detectors and policy are rebuilt from what was stored with it and
    its tokens are teacher-forced through its model (a generated session token by token with a KV
    cache, as it was generated): the same model gives back the same tokens, readouts and flags.
    --policy and --detectors swap in new ones ("would the new probe or policy have caught this?").

    --all --policy P backtests P over the stored detections of every session in the store (with
    the filters), thousands of sessions a second and no model: which sessions it flags that were
    not flagged, and which it would miss.
    """
    from monitor.detector import DetectorError
    from monitor.engine.base import EngineError
    from monitor.observability import configure_logging
    from monitor.policy import PolicyError
    from monitor.store import StoreError, TranscriptFormatError

    configure_logging(json=False, level="warning", stream=sys.stderr)  # the results own stdout

    try:
        if replay_all:
            if target is not None:
                raise click.UsageError("give either ID|FILE or --all, not both")
            if policy_path is None:
                raise click.UsageError("--all needs --policy (the policy to backtest)")
            _backtest(policy_path, store_url, filters, as_json)
            return
        if target is None:
            raise click.UsageError("give a session ID, a transcript FILE, or --all")
        stored = _load(target, store_url)
        options = {"policy_path": policy_path, "detectors_path": detectors_path, "model": model, "device": device, "dtype": dtype}
        results = [_replay_one(t, policy_only, options) for t in stored]
    except (StoreError, TranscriptFormatError, PolicyError, DetectorError, EngineError, FileNotFoundError) as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        payload = [r.to_dict() for r in results]
        click.echo(json.dumps(payload[0] if len(payload) == 1 else payload, indent=2))
    else:
        for result in results:
            _print_result(result)


def _load(target: str, store_url: str | None) -> list[Any]:
    """Transcripts from FILE (JSON object, JSON list or JSONL) or the session ID from the store."""
    from monitor.store import TranscriptFormatError, transcript_from_dict

    path = Path(target)
    if path.is_file():
        text = path.read_text(encoding="utf-8")
        if path.suffix != ".jsonl":
            try:
                data = json.loads(text)
            except json.JSONDecodeError:
                data = None
            if isinstance(data, dict):
                return [transcript_from_dict(data, str(path))]
            if isinstance(data, list):
                return [transcript_from_dict(r, f"{path}[{i}]") for i, r in enumerate(data)]
        lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
        try:
            records = [json.loads(line) for _, line in lines]
        except json.JSONDecodeError as exc:
            raise TranscriptFormatError(f"{path}: neither JSON nor JSONL ({exc})") from None
        where = [f"{path}:{n}" for n, _ in lines]
        return [transcript_from_dict(r, w) for r, w in zip(records, where, strict=True)]
    with open_store(store_url) as store:
        found = store.get(target)
    if found is None:
        raise click.ClickException(f"{target!r} is neither a file nor a session in the store")
    return [found]


def _replay_one(stored: Any, policy_only: bool, options: dict[str, Any]) -> Any:
    from monitor.build import load_reader
    from monitor.detector import load_detector_specs
    from monitor.policy import load_policy
    from monitor.replay import replay_full, replay_pipeline, replay_policy, stored_policy
    from monitor.settings import Settings

    policy_path, detectors_path = options["policy_path"], options["detectors_path"]
    if policy_only:
        if detectors_path is not None:
            raise click.UsageError("--policy-only re-runs a policy over stored detections; new detectors need the model")
        policy = load_policy(policy_path, dict(stored.thresholds)) if policy_path else stored_policy(stored)
        return replay_policy(stored, policy)
    settings = Settings.load(device=options["device"], dtype=options["dtype"])
    seed_match = TINY_REVISION.match(stored.model.revision)
    revision = None if options["model"] or stored.model.revision in ("local", "unknown") or seed_match else stored.model.revision
    # the session's model (or --model), not the configured one: reader, revision and seed follow it
    session_model = {
        "model": options["model"] or stored.model.model_id,
        "reader": None,
        "revision": revision,
        "seed": int(seed_match.group(1)) if seed_match else settings.seed,
    }
    engine = load_reader(settings.model_copy(update=session_model))
    if engine.info.revision != stored.model.revision:
        click.echo(
            f"warning: session {stored.session_id} ran on {stored.model.model_id}@{stored.model.revision}; replaying on "
            f"{engine.info.model_id}@{engine.info.revision}: readouts will differ",
            err=True,
        )
    specs = load_detector_specs(detectors_path) if detectors_path else None
    pipeline = replay_pipeline(
        stored,
        engine,
        detectors=specs,
        policy=load_policy(policy_path) if policy_path else None,
        base_dir=detectors_path.resolve().parent if detectors_path else None,
        secrets={"judge_api_key": settings.judge_api_key} if settings.judge_api_key else None,
    )
    return asyncio.run(replay_full(pipeline, stored))


def _print_result(result: Any) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    out = Console(highlight=False)
    table = Table(title=f"session {result.session_id}: {result.mode} replay", title_justify="left")
    for col in ("rule", "change", "stored", "replay"):
        table.add_column(col)
    for c in result.changes:
        table.add_row(escape(c.rule), c.change, _flag_text(c.old), _flag_text(c.new))
    if not result.changes:
        table.add_row("-", "no flags either way", "", "")
    out.print(table)
    if result.mode == "full":
        out.print(
            f"tokens {'identical' if result.tokens_equal else 'DIFFER'}; detections "
            f"{'identical' if result.detections_equal else 'differ'}; largest readout difference {result.readouts_max_diff}"
        )


def _flag_text(flag: Any) -> str:
    return "-" if flag is None else f"token {flag.index} ({flag.severity})"


def _backtest(policy_path: Path, store_url: str | None, filters: dict[str, Any], as_json: bool) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.progress import Progress
    from rich.table import Table

    from monitor.policy import load_policy
    from monitor.replay import backtest_store

    policy = load_policy(policy_path)
    query = session_query(filters, None)
    with open_store(store_url) as store:
        total = store.count(query)
        with Progress(console=Console(stderr=True), transient=True, disable=not sys.stderr.isatty()) as bar:
            task = bar.add_task(f"backtesting {policy_path.name}", total=total)
            report = backtest_store(store, policy, query, progress=lambda n: bar.update(task, completed=n))
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
        return
    out = Console(highlight=False)
    rate = report.sessions / report.seconds if report.seconds else 0.0
    out.print(
        f"{report.sessions} sessions in {report.seconds:.2f} s ({rate:,.0f}/s); flagged: {report.flagged_old} stored -> "
        f"{report.flagged_new} under {escape(str(policy_path))}"
    )
    table = Table(title="sessions per rule", title_justify="left")
    for col in ("rule", "stored", "backtest", "newly flagged", "no longer flagged"):
        table.add_column(col, justify="left" if col == "rule" else "right")
    for r in sorted(report.rules.values(), key=lambda r: r.rule):
        table.add_row(escape(r.rule), str(r.old), str(r.new), str(r.added), str(r.removed))
    out.print(table)
    for result in report.changed[:20]:
        moves = "; ".join(f"{c.rule} {c.change}" for c in result.changes if c.change != "same")
        out.print(f"  {result.session_id}: {escape(moves)}")
    if len(report.changed) > 20:
        out.print(f"  ... and {len(report.changed) - 20} more sessions changed (--json lists up to 100)")
    for session_id, why in list(report.skipped.items())[:5]:
        out.print(f"  skipped {session_id}: {escape(why)}")
