"""Options shared by the commands that read the transcript store: where it is, and which sessions."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from monitor.options import setting_option
from monitor.types import OUTCOMES, SEVERITIES

F = Callable[..., Any]


def store_option(f: F) -> F:
    """--store: the store_url setting."""
    return setting_option("store_url", "--store", metavar="URL")(f)


def filter_options(f: F) -> F:
    """--flagged/--unflagged, --category, --rule, --severity, --outcome, --label, --since, --until."""
    options = [
        click.option("--flagged/--unflagged", default=None, help="Only sessions where a rule fired (or none did)."),
        click.option("--category", default=None, help="Only sessions with a flag of this category."),
        click.option("--rule", default=None, help="Only sessions with a flag from this rule."),
        click.option(
            "--severity", type=click.Choice(SEVERITIES), default=None, help="Only sessions flagged at least this severe."
        ),
        click.option(
            "--outcome",
            type=click.Choice(OUTCOMES),
            default=None,
            help="Only this outcome.",
        ),
        click.option("--label", default=None, help="Only sessions the caller labelled so (watch mode's label)."),
        click.option(
            "--since", default=None, metavar="TIME", help="Started at or after: unix seconds, ISO 8601, or an age (30m, 12h, 7d)."
        ),
        click.option("--until", default=None, metavar="TIME", help="Started before TIME."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def session_query(options: dict[str, Any], limit: int | None, offset: int = 0) -> Any:
    """The SessionQuery the filter options describe; a bad time is a usage error naming the option."""
    from monitor.store import QueryError, parse_query

    names = ("flagged", "category", "rule", "severity", "outcome", "label", "since", "until")
    try:
        return parse_query(limit=limit, offset=offset, **{name: options.get(name) for name in names})
    except QueryError as exc:
        raise click.BadParameter(str(exc), param_hint=f"--{exc.param}") from None


def open_store(store_url: str | None) -> Any:
    """The transcript store the options and settings name; ClickException when it cannot be opened."""
    from monitor.build import open_store as configured_store
    from monitor.settings import Settings, SettingsError
    from monitor.store import StoreError

    try:
        return configured_store(Settings.load(store_url=store_url))
    except (SettingsError, StoreError) as exc:
        raise click.ClickException(str(exc)) from None
