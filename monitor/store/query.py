"""Which stored sessions: `SessionQuery` (the filters of lists, exports and backtests), the
summary rows lists show, and times as people type them."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa

from monitor.store.schema import flags, sessions
from monitor.types import SEVERITIES, Flag, Severity


@dataclass(frozen=True)
class SessionQuery:
    """Filters for listing sessions; every field narrows the result."""

    flagged: bool | None = None
    category: str | None = None
    """Sessions with a flag of this category."""
    rule: str | None = None
    """Sessions with a flag from this rule."""
    severity: Severity | None = None
    """Sessions whose highest flag severity is at least this."""
    outcome: str | None = None
    label: str | None = None
    """Sessions the caller labelled so (watch mode's `label`)."""
    since: float | None = None
    """Unix time: sessions started at or after it."""
    until: float | None = None
    """Unix time: sessions started before it."""
    limit: int | None = 50
    offset: int = 0


FIRST_PAGE = SessionQuery()
"""The newest 50 sessions, unfiltered."""
EVERYTHING = SessionQuery(limit=None)
"""Every session."""


@dataclass(frozen=True)
class SessionSummary:
    """One session as lists show it."""

    session_id: str
    started_at: float
    ended_at: float
    outcome: str
    mode: str
    model_id: str
    model_revision: str
    flagged: bool
    severity: str | None
    n_tokens: int
    n_reasoning: int
    preview: str
    policy_name: str
    max_scores: dict[str, float]
    thresholds: dict[str, float | None]
    label: str | None = None
    flags: tuple[Flag, ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "flags"}
        return out | {"flags": [f.to_dict() for f in self.flags]}


def parse_time(text: str, now: float | None = None) -> float:
    """Unix time from `1764460800`, an ISO 8601 date or time (UTC unless it says), or an age such
    as `30m`, `12h`, `7d` (that long before `now`). ValueError says what is accepted."""
    import datetime as dt

    value = text.strip()
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
    try:
        if value[-1:] in units and value[:-1].replace(".", "", 1).isdigit():
            return (time.time() if now is None else now) - float(value[:-1]) * units[value[-1]]
        if math.isfinite(seconds := float(value)):
            return seconds
    except ValueError:
        pass
    try:
        parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(
            f"{text!r} is not a time: use unix seconds, ISO 8601 (2026-11-30T12:00) or an age (30m, 12h, 7d)"
        ) from None
    return (parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)).timestamp()


class QueryError(ValueError):
    """A filter value that does not parse; `param` names the filter."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


MAX_OFFSET = 2**63 - 1


def parse_query(
    *,
    flagged: bool | None = None,
    category: str | None = None,
    rule: str | None = None,
    severity: str | None = None,
    outcome: str | None = None,
    label: str | None = None,
    since: str | None = None,
    until: str | None = None,
    limit: int | None = 50,
    offset: int = 0,
) -> SessionQuery:
    """A SessionQuery from filters as people give them (times as `parse_time` reads them; empty
    strings mean no filter); QueryError names the filter that is wrong."""
    if severity and severity not in SEVERITIES:
        raise QueryError("severity", f"severity must be one of {', '.join(SEVERITIES)}")
    if offset < 0:
        raise QueryError("offset", "offset must not be negative")
    if offset > MAX_OFFSET:  # SQL's BIGINT: a larger one is a database error, not an empty page
        raise QueryError("offset", f"offset must be at most {MAX_OFFSET}")
    times: dict[str, float | None] = {}
    for name, value in (("since", since), ("until", until)):
        try:
            times[name] = parse_time(value) if value else None
        except ValueError as exc:
            raise QueryError(name, str(exc)) from None
    return SessionQuery(
        flagged=flagged,
        category=category or None,
        rule=rule or None,
        severity=severity or None,
        outcome=outcome or None,
        label=label or None,
        since=times["since"],
        until=times["until"],
        limit=limit,
        offset=offset,
    )


def where_clauses(q: SessionQuery) -> list[Any]:
    where: list[Any] = []
    if q.flagged is not None:
        where.append(sessions.c.flagged.is_(q.flagged))
    if q.outcome is not None:
        where.append(sessions.c.outcome == q.outcome)
    if q.label is not None:
        where.append(sessions.c.label == q.label)
    if q.severity is not None:
        where.append(sessions.c.severity.in_(SEVERITIES[SEVERITIES.index(q.severity) :]))
    if q.since is not None:
        where.append(sessions.c.started_at >= q.since)
    if q.until is not None:
        where.append(sessions.c.started_at < q.until)
    if q.category is not None or q.rule is not None:
        match = sa.select(flags.c.session_id)
        if q.category is not None:
            match = match.where(flags.c.category == q.category)
        if q.rule is not None:
            match = match.where(flags.c.rule == q.rule)
        where.append(sessions.c.session_id.in_(match))
    return where
