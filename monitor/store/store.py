"""`TranscriptStore`: sessions in SQLite (default, WAL) or PostgreSQL, through SQLAlchemy Core.

It is a pipeline sink: `write` keeps a finished session by the retention setting (every flagged
session always), and `checkpoint` commits a flagged session the moment a rule fires, before the
pipeline counts the flag. Reads return summaries for lists, whole transcripts, and the packed
detections a policy-only replay needs.
"""

from __future__ import annotations

import hashlib
import math
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from monitor.store import packed
from monitor.store.columns import DetectionColumns
from monitor.store.query import EVERYTHING, FIRST_PAGE, SessionQuery, SessionSummary, where_clauses
from monitor.store.schema import flags, metadata, session_data, sessions
from monitor.types import SEVERITIES, ChatMessage, DetectorSpec, Flag, ModelInfo, Severity, Transcript, max_scores

Retention = Literal["all", "flagged", "sample"]
RETENTIONS: tuple[Retention, ...] = ("all", "flagged", "sample")
PREVIEW_CHARS = 240


class StoreError(RuntimeError):
    """The store cannot be opened or used (bad URL, unreachable database, failed migration)."""


class StoreConflict(StoreError):
    """A write that would replace or shorten a stored session: evidence is only ever extended."""


def sqlite_url(data_dir: Path) -> str:
    return f"sqlite:///{(data_dir / 'transcripts.db').resolve()}"


def normalise_url(url: str) -> str:
    """`postgresql://` means psycopg 3 here (the driver cotmon installs)."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def sampled(session_id: str, rate: float) -> bool:
    """Whether an unflagged session falls in the kept sample; the same answer for the same id."""
    return int.from_bytes(hashlib.sha256(session_id.encode()).digest()[:8], "big") < rate * 2**64


def highest_severity(found: Sequence[Flag]) -> Severity | None:
    ranks = [SEVERITIES.index(f.severity) for f in found]
    return SEVERITIES[max(ranks)] if ranks else None


class TranscriptStore:
    """Durable sessions; see the module docstring.

    Args:
        url: SQLAlchemy URL (`sqlite:///path.db`, `postgresql://user@host/db`).
        keep: which finished sessions to keep besides flagged ones: `all`, `flagged` (none), or
            `sample` (a share `sample_rate` of unflagged sessions, chosen by session id).
        timeout: seconds a connect or statement may take before the call fails (PostgreSQL:
            connect_timeout and statement_timeout; SQLite: how long a locked database is waited for).
        clock: unix time for `stored_at`.
    """

    def __init__(
        self, url: str, *, keep: Retention = "flagged", sample_rate: float = 0.0, timeout: float = 10.0, clock: Any = time.time
    ):
        if keep not in RETENTIONS:
            raise StoreError(f"store retention {keep!r} is not one of {', '.join(RETENTIONS)}")
        if not 0.0 <= sample_rate <= 1.0:
            raise StoreError(f"store sample rate {sample_rate} is not in [0, 1]")
        self.url = normalise_url(url)
        self.keep, self.sample_rate, self.clock = keep, sample_rate, clock
        try:
            self.engine = _create_engine(self.url, timeout)
        except (sa.exc.SQLAlchemyError, ImportError, ValueError) as exc:
            raise StoreError(f"cannot open the transcript store at {_redacted(self.url)}: {exc}") from exc
        try:
            migrate(self.engine)
        except (sa.exc.SQLAlchemyError, ValueError, OSError) as exc:
            self.engine.dispose()
            raise StoreError(f"cannot open the transcript store at {_redacted(self.url)}: {exc}") from exc

    @classmethod
    def at(cls, data_dir: Path, **kwargs: Any) -> TranscriptStore:
        """The default SQLite store under `data_dir`."""
        data_dir.mkdir(parents=True, exist_ok=True)
        return cls(sqlite_url(data_dir), **kwargs)

    @classmethod
    def configured(cls, url: str | None, data_dir: Path, **kwargs: Any) -> TranscriptStore:
        """The store at `url` (COTMON_STORE_URL), else the default SQLite store under `data_dir`."""
        return cls(url, **kwargs) if url else cls.at(data_dir, **kwargs)

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> TranscriptStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- writing --------------------------------------------------------------------------------

    def wants(self, t: Transcript) -> bool:
        """Whether retention keeps this finished session."""
        if t.flagged or self.keep == "all":
            return True
        return self.keep == "sample" and sampled(t.session_id, self.sample_rate)

    def write(self, transcript: Transcript) -> None:
        """Keep a finished session if retention says so (replacing its checkpoint, if any)."""
        if self.wants(transcript):
            self.save(transcript)

    def checkpoint(self, transcript: Transcript) -> None:
        """Commit a flagged session so far; returns once the database has it."""
        self.save(transcript)

    def save(self, t: Transcript) -> None:
        """Store one session, in one transaction: a new one, or a longer version of a stored one
        that is still `running` (its checkpoint). Anything else that names a stored session raises
        StoreConflict and leaves the stored one as it was; the same finished session again is a no-op.
        """
        row = _session_row(t, self.clock())
        data = {
            "session_id": t.session_id,
            "steps": packed.pack_steps(t.steps),
            "readouts": packed.pack_readouts(t.steps),
            "detections": packed.pack_detections(t.detections, t.evaluations),
        }
        flag_rows = [
            {
                "session_id": t.session_id,
                "rule": f.rule,
                "category": f.category,
                "severity": f.severity,
                "actions": list(f.actions),
                "token_index": f.index,
                "reason": _text(f.reason),
            }
            for f in t.flags
        ]
        with self.engine.begin() as conn:
            stored = conn.execute(
                sa.select(sessions.c.outcome, sessions.c.n_tokens).where(sessions.c.session_id == t.session_id).with_for_update()
            ).first()
            if stored is not None:
                if not _extends(conn, t, stored.outcome, stored.n_tokens):
                    return
                for table in (flags, session_data, sessions):
                    conn.execute(sa.delete(table).where(table.c.session_id == t.session_id))
            conn.execute(sa.insert(sessions), [row])
            conn.execute(sa.insert(session_data), [data])
            if flag_rows:
                conn.execute(sa.insert(flags), flag_rows)

    def delete(self, session_id: str) -> bool:
        with self.engine.begin() as conn:
            for table in (flags, session_data):
                conn.execute(sa.delete(table).where(table.c.session_id == session_id))
            return bool(conn.execute(sa.delete(sessions).where(sessions.c.session_id == session_id)).rowcount)

    # -- reading --------------------------------------------------------------------------------

    def ping(self) -> None:
        """Raise StoreError unless the database answers."""
        try:
            with self.engine.connect() as conn:
                conn.execute(sa.select(sa.func.count()).select_from(sessions).where(sa.false()))
        except sa.exc.SQLAlchemyError as exc:
            raise StoreError(f"transcript store at {_redacted(self.url)} does not answer: {exc}") from exc

    def count(self, query: SessionQuery = FIRST_PAGE) -> int:
        stmt = sa.select(sa.func.count()).select_from(sessions).where(*where_clauses(query))
        with self.engine.connect() as conn:
            return int(conn.execute(stmt).scalar_one())

    def sessions(self, query: SessionQuery = FIRST_PAGE) -> list[SessionSummary]:
        """Summaries of matching sessions, newest first, with their flags."""
        with self.engine.connect() as conn:
            rows = conn.execute(_page(sa.select(*SUMMARY_COLUMNS), query)).mappings().all()
            by_session = _flags_of(conn, [r["session_id"] for r in rows if r["flagged"]])
        return [SessionSummary(**dict(r), flags=by_session.get(r["session_id"], ())) for r in rows]

    def get(self, session_id: str) -> Transcript | None:
        """The whole stored transcript, or None."""
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(sessions).where(sessions.c.session_id == session_id)).mappings().first()
            if row is None:
                return None
            data = conn.execute(sa.select(session_data).where(session_data.c.session_id == session_id)).mappings().one()
            found = _flags_of(conn, [session_id]).get(session_id, ())
        return _transcript(row, data, found)

    def transcripts(self, query: SessionQuery = EVERYTHING, batch: int = 200) -> Iterator[Transcript]:
        """Whole transcripts of matching sessions, newest first, read in batches."""
        offset = query.offset
        while True:
            limit = batch if query.limit is None else min(batch, query.limit - (offset - query.offset))
            if limit <= 0:
                return
            page = self.sessions(SessionQuery(**{**query.__dict__, "offset": offset, "limit": limit}))
            for summary in page:
                t = self.get(summary.session_id)
                if t is not None:
                    yield t
            if len(page) < limit:
                return
            offset += len(page)

    def detection_columns(self, query: SessionQuery = EVERYTHING) -> Iterator[tuple[SessionSummary, DetectionColumns]]:
        """Each matching session's summary and packed detections (no tokens, no readouts)."""
        joined = sa.select(*SUMMARY_COLUMNS, session_data.c.detections).join(
            session_data, session_data.c.session_id == sessions.c.session_id
        )
        stmt = _page(joined, query)
        with self.engine.connect() as conn:
            all_flags = _flags_of(conn, None)
            for row in conn.execute(stmt.execution_options(yield_per=500)).mappings():
                values = dict(row)
                blob = values.pop("detections")
                summary = SessionSummary(**values, flags=all_flags.get(values["session_id"], ()))
                yield summary, packed.unpack_detections(blob)


SUMMARY_COLUMNS = [sessions.c[name] for name in SessionSummary.__dataclass_fields__ if name != "flags"]


def _page(stmt: Any, query: SessionQuery) -> Any:
    """`stmt` narrowed by the query's filters, newest first, with its offset and limit."""
    stmt = stmt.where(*where_clauses(query)).order_by(sessions.c.started_at.desc(), sessions.c.session_id).offset(query.offset)
    return stmt if query.limit is None else stmt.limit(query.limit)


def _extends(conn: Connection, t: Transcript, outcome: str, n_tokens: int) -> bool:
    """Whether `t` may replace the stored version of its session (True), is that version already
    (False: nothing to write), or would rewrite it (StoreConflict)."""
    row = conn.execute(sa.select(sessions).where(sessions.c.session_id == t.session_id)).mappings().one()
    data = conn.execute(sa.select(session_data).where(session_data.c.session_id == t.session_id)).mappings().one()
    before = _transcript(row, data, _flags_of(conn, [t.session_id]).get(t.session_id, ()))
    same_start = (before.messages, before.mode, before.started_at, before.model) == (t.messages, t.mode, t.started_at, t.model)
    prefix = (
        [s.token_id for s in t.steps[:n_tokens]] == [s.token_id for s in before.steps]
        and t.flags[: len(before.flags)] == before.flags
        and t.detections[: len(before.detections)] == before.detections
    )
    if outcome != "running":
        if same_start and prefix and (len(t.steps), t.outcome, len(t.flags)) == (n_tokens, outcome, len(before.flags)):
            return False  # written before (a retry after a lost acknowledgement)
        raise StoreConflict(f"session {t.session_id!r} is stored as {outcome}: a stored transcript is never replaced")
    if not (same_start and prefix and len(t.steps) >= n_tokens):
        raise StoreConflict(f"session {t.session_id!r}: the new version does not extend the stored one; it is never replaced")
    return True


def _create_engine(url: str, timeout: float) -> Engine:
    """An engine whose connects and statements give up after `timeout` seconds (a stalled database
    fails a call instead of holding its thread)."""
    if url.startswith("sqlite"):
        engine = sa.create_engine(url, connect_args={"timeout": timeout, "check_same_thread": False}, pool_timeout=timeout)

        @sa.event.listens_for(engine, "connect")
        def _pragmas(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")  # readers never block the writer
            cursor.execute("PRAGMA synchronous=FULL")  # a committed flag survives power loss, not just a crash
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        return engine
    if url.startswith("postgresql"):
        ms = max(1, int(timeout * 1000))
        # TCP keepalives: a peer that vanished (or a paused server) is noticed on an idle connection too.
        args = {"connect_timeout": max(1, math.ceil(timeout)), "options": f"-c statement_timeout={ms} -c lock_timeout={ms}"}
        args |= {"keepalives": 1, "keepalives_idle": 5, "keepalives_interval": 2, "keepalives_count": 2}
        return sa.create_engine(url, pool_pre_ping=True, pool_timeout=timeout, connect_args=args)
    return sa.create_engine(url, pool_pre_ping=True, pool_timeout=timeout)


_MIGRATING = threading.Lock()  # Alembic's `context` is one per process: one migration at a time
PG_MIGRATION_LOCK = 0x636F746D6F6E  # "cotmon": replicas starting together migrate one after another


def migrate(engine: Engine) -> None:
    """Bring the database to the newest schema (Alembic `upgrade head`)."""
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
    with _MIGRATING, engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": PG_MIGRATION_LOCK})
        config.attributes["connection"] = conn
        command.upgrade(config, "head")


def _redacted(url: str) -> str:
    return sa.engine.make_url(url).render_as_string(hide_password=True) if "://" in url else url


def _flags_of(conn: Connection, session_ids: list[str] | None) -> dict[str, tuple[Flag, ...]]:
    """Flags per session, in firing order (all sessions when `session_ids` is None)."""
    if session_ids is not None and not session_ids:
        return {}
    stmt = sa.select(flags).order_by(flags.c.session_id, flags.c.id)
    if session_ids is not None:
        stmt = stmt.where(flags.c.session_id.in_(session_ids))
    out: dict[str, list[Flag]] = {}
    for r in conn.execute(stmt).mappings():
        flag = Flag(r["rule"], r["category"], r["severity"], tuple(r["actions"]), r["token_index"], r["reason"])
        out.setdefault(r["session_id"], []).append(flag)
    return {k: tuple(v) for k, v in out.items()}


def _text(value: str) -> str:
    """PostgreSQL text cannot hold NUL; the exact text stays in the blobs and JSON."""
    return value.replace("\x00", "\ufffd")


def _finite(values: dict[str, float | None]) -> dict[str, float | None]:
    """JSON has no NaN or infinity (PostgreSQL's json type refuses them): those become null."""
    return {k: v if v is None or math.isfinite(v) else None for k, v in values.items()}


def _session_row(t: Transcript, stored_at: float) -> dict[str, Any]:
    reasoning = t.reasoning
    return {
        "session_id": t.session_id,
        "started_at": t.started_at,
        "ended_at": t.ended_at,
        "stored_at": stored_at,
        "outcome": t.outcome,
        "mode": t.mode,
        "model_id": t.model.model_id,
        "model_revision": t.model.revision,
        "model": asdict(t.model),
        "flagged": t.flagged,
        "severity": highest_severity(t.flags),
        "n_tokens": len(t.steps),
        "n_reasoning": sum(1 for s in t.steps if s.channel == "reasoning"),
        "preview": _text((reasoning or t.answer)[:PREVIEW_CHARS]),
        "error": None if t.error is None else _text(t.error),
        "policy_name": str(t.policy.get("name", "")),
        "max_scores": _finite(dict(max_scores(t.detections))),
        "messages": [m.to_dict() for m in t.messages],
        "request": dict(t.request),
        "policy": dict(t.policy),
        "detector_specs": [s.to_dict() for s in t.detector_specs],
        "thresholds": _finite(dict(t.thresholds)),
        "label": _label(t.request.get("label")),
    }


def _label(value: object) -> str | None:
    return _text(value)[:128] if isinstance(value, str) and value else None


def _transcript(row: Any, data: Any, found: tuple[Flag, ...]) -> Transcript:
    columns = packed.unpack_detections(data["detections"])
    return Transcript(
        session_id=row["session_id"],
        model=ModelInfo(**row["model"]),
        messages=tuple(ChatMessage(m["role"], m["content"]) for m in row["messages"]),
        steps=packed.unpack_steps(row["session_id"], data["steps"], data["readouts"]),
        detections=columns.detections(),
        flags=found,
        outcome=row["outcome"],
        detector_specs=tuple(DetectorSpec.from_dict(s) for s in row["detector_specs"]),
        policy=row["policy"],
        started_at=row["started_at"],
        ended_at=row["ended_at"],
        error=row["error"],
        mode=row["mode"],
        request=row["request"],
        thresholds=row["thresholds"],
        evaluations=tuple((int(a), int(b)) for a, b in columns.evaluations.tolist()),
    )


__all__ = ["RETENTIONS", "Retention", "StoreConflict", "StoreError", "TranscriptStore", "metadata"]
