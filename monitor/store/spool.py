"""`SpooledStore`: the serving process's durable sink. A kept session is journaled on local disk as it
streams and reaches the transcript store from a background thread, so a slow or absent database never
blocks serving and never loses a kept session.

Layout: `<directory>/<session_id>.jsonl`, one journal per session the store does not have whole yet:

- line 1: the session so far (`transcript_to_dict`, outcome `running`);
- then one line per step with what it added: `{"steps": [...], "detections": [...], "evaluations": [...],
  "flags": [...]}` (each list optional);
- last, once the session has ended: `{"end": {"outcome": ..., "ended_at": ..., "error": ...}}`.

A line is handed to the operating system before the token it describes goes to the client (a killed
process loses nothing it streamed); `sync` (at every flag) also forces it to the disk. A journal is
deleted once the store holds the whole session. On start, the journals left behind (a crash, or a store
that was down at shutdown) are written to the store: those that never ended as `interrupted`, with
every step they had. Flagged sessions are written first.
"""

from __future__ import annotations

import heapq
import itertools
import json
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, Any

import sqlalchemy as sa
import structlog
from prometheus_client import Counter, Gauge

from monitor.store.codec import (
    TranscriptFormatError,
    detection_to_dict,
    step_to_dict,
    transcript_from_dict,
    transcript_to_dict,
)
from monitor.store.store import StoreConflict, StoreError, TranscriptStore, sampled
from monitor.types import Detection, Flag, Outcome, TraceStep, Transcript

SUFFIX = ".jsonl"


class Journal:
    """One live session's journal file (see the module docstring); written by one caller at a time."""

    def __init__(self, path: Path, so_far: Transcript):
        self.path = path
        # "x": a journal never overwrites another session's (ids are unique; a clash is a bug to see).
        self._file: IO[str] | None = path.open("x", encoding="utf-8")
        self._write(transcript_to_dict(so_far))

    def extend(
        self,
        steps: Sequence[TraceStep],
        detections: Sequence[Detection],
        evaluations: Sequence[tuple[int, int]],
        flags: Sequence[Flag],
    ) -> None:
        """Append what the session added since the last call (nothing is written when it is nothing)."""
        delta: dict[str, Any] = {}
        if steps:
            delta["steps"] = [step_to_dict(s) for s in steps]
        if detections:
            delta["detections"] = [detection_to_dict(d) for d in detections]
        if evaluations:
            delta["evaluations"] = [list(e) for e in evaluations]
        if flags:
            delta["flags"] = [f.to_dict() for f in flags]
        if delta:
            self._write(delta)

    def sync(self) -> None:
        """Force what was written to the disk (a power cut keeps it too)."""
        if self._file is not None:
            os.fsync(self._file.fileno())

    def end(self, outcome: Outcome, ended_at: float, error: str | None, *, sync: bool) -> None:
        self._write({"end": {"outcome": outcome, "ended_at": ended_at, "error": error}})
        if sync:
            self.sync()
        self.close()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def _write(self, record: dict[str, Any]) -> None:
        if self._file is None:
            raise ValueError(f"journal {self.path} is closed")
        self._file.write(json.dumps(record, separators=(",", ":")) + "\n")
        self._file.flush()  # in the kernel now: a killed process loses nothing written so far


def read_journal(path: Path, *, ended_as: Outcome = "interrupted") -> Transcript:
    """The session a journal holds; one that never ended gets outcome `ended_as` (its last step's
    time unknown, it ends when the journal was last written). A torn last line (the process died
    while writing it) is left out; TranscriptFormatError names the file and line otherwise."""
    lines = path.read_text(encoding="utf-8").splitlines()
    records: list[dict[str, Any]] = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            if number == len(lines):
                break
            raise TranscriptFormatError(f"{path}:{number}: not JSON ({exc})") from None
        if not isinstance(record, dict):
            raise TranscriptFormatError(f"{path}:{number}: expected an object")
        records.append(record)
    if not records:
        raise TranscriptFormatError(f"{path}: empty journal")
    data = dict(records[0])
    end: dict[str, Any] | None = None
    for number, record in enumerate(records[1:], 2):
        if "end" in record:
            end = record["end"]
            continue
        for key in ("steps", "detections", "evaluations", "flags"):
            if key in record:
                if not isinstance(record[key], list):
                    raise TranscriptFormatError(f"{path}:{number}.{key}: expected a list")
                data[key] = [*data.get(key, []), *record[key]]
    if end is not None:
        data.update(outcome=end.get("outcome"), ended_at=end.get("ended_at"), error=end.get("error"))
    else:
        data.update(outcome=ended_as, ended_at=path.stat().st_mtime)
    return transcript_from_dict(data, str(path))


@dataclass
class _Pending:
    """A session waiting for the store: its newest version in memory (None: read the journal)."""

    session_id: str
    flagged: bool
    final: bool
    transcript: Transcript | None


class SpooledStore:
    """The pipeline sink in front of a `TranscriptStore` (see the module docstring).

    Args:
        store: where sessions end up; its retention decides which sessions are journaled
            (flagged ones from their first flag, all or a sample of the others from their first token).
        directory: the spool (journals); on local disk, one per process.
        errors: counts failed writes (`cotmon_store_errors_total`).
        waiting: set to the sessions queued for the store (`cotmon_store_spooled_sessions`).
        retry: seconds between attempts while the store fails, doubling up to `retry_max` (one
            connection attempt every 2 s costs a down database nothing; a store that is back is
            used within 2 s).
    """

    def __init__(
        self,
        store: TranscriptStore,
        directory: Path,
        *,
        errors: Counter | None = None,
        waiting: Gauge | None = None,
        retry: float = 0.25,
        retry_max: float = 2.0,
    ):
        self.store, self.directory = store, directory
        self._errors, self._waiting = errors, waiting
        self.retry, self.retry_max = retry, retry_max
        directory.mkdir(parents=True, exist_ok=True)
        self.log = structlog.get_logger("cotmon.store")
        self._lock = threading.Condition()
        self._pending: dict[str, _Pending] = {}
        self._order: list[tuple[int, int, str]] = []  # (0 flagged / 1 not, arrival, id): a heap
        self._arrivals = itertools.count()
        self._live: set[str] = set()
        self._busy: str | None = None
        self._busy_since = 0.0
        self._stopping = False
        self.last_error: str | None = None
        """Why the last write failed, while the store keeps failing; None once a write succeeds."""
        self._thread: threading.Thread | None = None

    # -- what the pipeline calls (on the event loop or a sink thread: nothing here waits for the database)

    def keeps_unflagged(self, session_id: str) -> bool:
        """Whether retention keeps this session even if it is never flagged (then it is journaled from
        its first step; a flagged one always is)."""
        keep = self.store.keep
        return keep == "all" or (keep == "sample" and sampled(session_id, self.store.sample_rate))

    def journal(self, so_far: Transcript) -> Journal:
        """Start the journal of a live session, holding everything it has so far."""
        journal = Journal(self._path(so_far.session_id), so_far)
        with self._lock:
            self._live.add(so_far.session_id)
        return journal

    def checkpoint(self, transcript: Transcript) -> None:
        """A flagged session so far (its journal is already synced): to the store soon, for the viewer."""
        self._queue(transcript, final=False)

    def write(self, transcript: Transcript) -> None:
        """A session has ended (its journal, if any, ends with its outcome): to the store if kept."""
        with self._lock:
            self._live.discard(transcript.session_id)
        if not self.store.wants(transcript):
            return
        if not self._path(transcript.session_id).exists():  # kept, but never journaled (ended before a step)
            Journal(self._path(transcript.session_id), transcript).end(
                transcript.outcome, transcript.ended_at, transcript.error, sync=transcript.flagged
            )
        self._queue(transcript, final=True)

    # -- status ---------------------------------------------------------------------------------

    def waiting(self) -> int:
        """Sessions queued for the store."""
        with self._lock:
            return len(self._pending) + (self._busy is not None)

    # -- the writer -----------------------------------------------------------------------------

    def start(self) -> None:
        """Queue the journals a previous process left (not live ones) and start writing."""
        for path in sorted(self.directory.glob("*" + SUFFIX), key=lambda p: p.stat().st_mtime):
            session_id = path.name[: -len(SUFFIX)]
            with self._lock:
                if session_id in self._live or session_id in self._pending:
                    continue
            try:
                recovered = read_journal(path)
            except (TranscriptFormatError, OSError) as exc:
                self.log.error("journal_unreadable", path=str(path), error=str(exc))
                continue
            if recovered.outcome == "interrupted":
                self.log.warning("session_interrupted", session_id=session_id, tokens=len(recovered.steps))
            self._queue(recovered, final=True)
        self._thread = threading.Thread(target=self._run, name="cotmon-store-writer", daemon=True)
        self._thread.start()

    def flush(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for the queue to empty; whether it did."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while self._pending or self._busy is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._lock.wait(min(left, 0.1))
        return True

    def wait_stored(self, session_id: str, timeout: float, *, slow: float = 1.0) -> bool:
        """Block up to `timeout` seconds until the store has taken `session_id` (as queued so far);
        whether it has. Returns at once while the store is failing or one write has taken over `slow`
        seconds (a stalled database): callers then go on and the session stays spooled."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while session_id in self._pending or self._busy == session_id:
                left = deadline - time.monotonic()
                stalled = self._busy is not None and time.monotonic() - self._busy_since > slow
                if left <= 0 or self.last_error is not None or stalled:
                    return False
                self._lock.wait(min(left, 0.05))
        return True

    def close(self, drain: float = 5.0) -> None:
        """Write what is queued for up to `drain` seconds, then stop (what is left stays spooled)."""
        if self._thread is not None:
            self.flush(drain)
            with self._lock:
                self._stopping = True
                self._lock.notify_all()
            self._thread.join(timeout=drain + 1)
            self._thread = None

    def _path(self, session_id: str) -> Path:
        return self.directory / (session_id + SUFFIX)

    def _queue(self, transcript: Transcript, *, final: bool) -> None:
        with self._lock:
            known = self._pending.get(transcript.session_id)
            if known is not None and known.final and not final:
                return  # the ended session is queued already
            memory = transcript if self.last_error is None else None  # failing: the journal has it
            self._pending[transcript.session_id] = _Pending(transcript.session_id, transcript.flagged, final, memory)
            if known is None:
                heapq.heappush(self._order, (0 if transcript.flagged else 1, next(self._arrivals), transcript.session_id))
            self._set_gauge()
            self._lock.notify_all()

    def _next(self) -> _Pending | None:
        with self._lock:
            while not self._order and not self._stopping:
                self._lock.wait()
            if self._stopping:
                return None
            _, _, session_id = heapq.heappop(self._order)
            item = self._pending.pop(session_id)
            self._busy, self._busy_since = session_id, time.monotonic()
            return item

    def _run(self) -> None:
        delay = self.retry
        while (item := self._next()) is not None:
            try:
                self._save(item)
            except (StoreError, sa.exc.SQLAlchemyError, TranscriptFormatError, OSError) as exc:
                self._failed(item, exc)
                with self._lock:
                    self._done()
                    if not self._stopping:
                        self._lock.wait(delay)  # a store that is down is not hammered
                delay = min(delay * 2, self.retry_max)
            else:
                delay = self.retry
                with self._lock:
                    self.last_error = None
                    self._done()

    def _done(self) -> None:
        """(Holding the lock.) The item in hand is stored or queued again."""
        self._busy = None
        self._set_gauge()
        self._lock.notify_all()

    def _save(self, item: _Pending) -> None:
        t = item.transcript
        if t is None:
            live = item.session_id in self._live
            t = read_journal(self._path(item.session_id), ended_as="running" if live else "interrupted")
            if live and not item.final:
                t = replace(t, outcome="running")
        self.store.save(t)
        if item.final:
            self._path(item.session_id).unlink(missing_ok=True)
            self.log.debug("session_stored", session_id=item.session_id)

    def _failed(self, item: _Pending, exc: Exception) -> None:
        reason = f"{type(exc).__name__}: {exc}"
        if isinstance(exc, StoreConflict):
            # Not an outage: the store refused a write that would rewrite a stored session. The journal
            # is kept (as evidence) under another name; nothing is retried.
            self._path(item.session_id).rename(self._path(item.session_id).with_suffix(".refused"))
            self.log.error("session_refused", session_id=item.session_id, error=reason)
            return
        if self._errors is not None:
            self._errors.inc()
        self.log.error("store_write_failed", session_id=item.session_id, error=reason, spooled=True)
        with self._lock:
            self.last_error = reason
            for pending in self._pending.values():
                pending.transcript = None  # keep memory flat while the store is away: the journals have them
            if item.session_id not in self._pending:
                item.transcript = None
                self._pending[item.session_id] = item
                heapq.heappush(self._order, (0 if item.flagged else 1, next(self._arrivals), item.session_id))
            elif item.final and not self._pending[item.session_id].final:
                self._pending[item.session_id].final = True

    def _set_gauge(self) -> None:
        if self._waiting is not None:
            self._waiting.set(len(self._pending) + (self._busy is not None))
