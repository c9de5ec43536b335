"""`cotmon transcripts list | show | export`: read the transcript store from the command line."""

from __future__ import annotations

import datetime as dt
import json
import sys
from pathlib import Path
from typing import Any

import click

from monitor.cli.store_options import filter_options, open_store, session_query, store_option


@click.group()
def transcripts() -> None:
    """List, show and export stored sessions (the transcript store: SQLite or PostgreSQL)."""


def _console() -> Any:
    from rich.console import Console

    return Console(highlight=False, width=None if sys.stdout.isatty() else 160)


def _when(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


@transcripts.command("list")
@store_option
@filter_options
@click.option("--limit", type=click.IntRange(1), default=50, show_default=True, help="Sessions to show.")
@click.option("--offset", type=click.IntRange(0), default=0, help="Skip this many (newest first).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (one object with `data` and `total`) instead of a table.")
def list_command(store_url: str | None, limit: int, offset: int, as_json: bool, **filters: Any) -> None:
    """Stored sessions, newest first, with their flags."""
    from dataclasses import replace

    from rich.markup import escape
    from rich.table import Table

    query = session_query(filters, limit, offset)
    with open_store(store_url) as store:
        rows = store.sessions(query)
        total = store.count(replace(query, limit=None, offset=0))
    if as_json:
        click.echo(json.dumps({"data": [r.to_dict() for r in rows], "total": total}, indent=2))
        return
    table = Table(title=f"{len(rows)} of {total} sessions (newest first)", title_justify="left")
    for col in ("started (UTC)", "session", "outcome", "flags", "tokens", "model", "reasoning"):
        table.add_column(
            col, no_wrap=col in ("started (UTC)", "session", "outcome", "tokens"), max_width=40 if col == "reasoning" else None
        )
    for r in rows:
        flags = ", ".join(f"{f.rule} ({f.severity})" for f in r.flags) or "-"
        preview = escape(" ".join(r.preview.split())[:60])
        table.add_row(
            _when(r.started_at), escape(r.session_id), r.outcome, escape(flags), str(r.n_tokens), escape(r.model_id), preview
        )
    _console().print(table)


@transcripts.command("show")
@click.argument("session_id")
@store_option
@click.option("--json", "as_json", is_flag=True, help="Print the whole transcript as JSON (the export format).")
def show_command(session_id: str, store_url: str | None, as_json: bool) -> None:
    """One stored session: messages, reasoning, answer, flags, detector maxima, judge rationales."""
    from rich.markup import escape

    from monitor.store import transcript_to_dict
    from monitor.types import max_scores

    with open_store(store_url) as store:
        t = store.get(session_id)
    if t is None:
        raise click.ClickException(f"session {session_id!r} is not in the store")
    if as_json:
        click.echo(json.dumps(transcript_to_dict(t), indent=2))
        return
    out = _console()
    out.print(
        f"[bold]session {escape(t.session_id)}[/bold]  {t.outcome}, {t.mode}, {len(t.steps)} tokens, "
        f"started {_when(t.started_at)} UTC"
    )
    out.print(
        f"model {escape(t.model.model_id)}@{escape(t.model.revision)}, policy {escape(str(t.policy.get('name', '')))}, "
        f"detectors {', '.join(escape(s.name) for s in t.detector_specs) or '-'}"
    )
    for m in t.messages:
        out.print(f"\n[bold]{escape(m.role)}[/bold]: {escape(m.content)}")
    out.print(f"\n[bold]reasoning[/bold]:\n{escape(t.reasoning)}")
    out.print(f"\n[bold]answer[/bold]:\n{escape(t.answer)}")
    out.print("\n[bold]flags[/bold]:" + ("" if t.flags else " none"))
    for f in t.flags:
        out.print(
            f"  {escape(f.rule)} ({f.severity}, {escape(f.category)}) at token {f.index}: {escape(f.reason)} "
            f"-> {', '.join(f.actions)}"
        )
    best = max_scores(t.detections)
    out.print("\n[bold]max score per detector[/bold]: " + (", ".join(f"{escape(k)} {v:.3f}" for k, v in best.items()) or "none"))
    for d in t.detections:
        for e in d.evidence:
            if e.kind in ("judge", "unavailable"):
                out.print(f"\n[bold]{escape(e.label)}[/bold] (score {d.score:.2f}, tokens {d.start}-{d.end}): {escape(e.detail)}")
                for q in e.quotes:
                    out.print(f"  > {escape(q)}")


@transcripts.command("export")
@store_option
@filter_options
@click.option("--limit", type=click.IntRange(1), default=None, help="At most this many sessions [all].")
@click.option("--out", "out_path", type=click.Path(dir_okay=False, path_type=Path), default=None, help="JSONL file [stdout].")
def export_command(store_url: str | None, limit: int | None, out_path: Path | None, **filters: Any) -> None:
    """Write matching sessions as JSONL, one whole transcript per line (what `cotmon replay FILE` reads)."""
    from rich.console import Console
    from rich.progress import Progress

    from monitor.store import transcript_to_dict

    query = session_query(filters, limit)
    with open_store(store_url) as store:
        total = store.count(query) if limit is None else min(limit, store.count(query))
        sink = out_path.open("w", encoding="utf-8") if out_path else sys.stdout
        try:
            with Progress(
                console=Console(stderr=True), transient=True, disable=not sys.stderr.isatty() and out_path is None
            ) as bar:
                task = bar.add_task("exporting transcripts", total=total)
                for t in store.transcripts(query):
                    sink.write(json.dumps(transcript_to_dict(t)) + "\n")
                    bar.advance(task)
        finally:
            if out_path:
                sink.close()
    if out_path:
        click.echo(f"wrote {total} sessions to {out_path}", err=True)
