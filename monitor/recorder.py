"""A session's record while it streams: its spool journal and the sinks, the waits off the event loop.

Each step's additions reach the spool journal on the event loop, before the step goes to the client
(a write handed to the kernel, no disk wait: a killed process loses nothing it streamed). What waits
for a disk or a database runs on a worker thread: a checkpoint (the journal synced, then every
durable sink, then the flags counted) and the end of a session (the journal's end, every sink's
`write`, the log line). A session's jobs run one after another in the order they were asked for, and
a caller cancelled while it waits (a client that disconnects) does not cancel its job: a flagged
session is never lost. Failed writes are counted (`cotmon_store_errors_total`) and logged, never
raised into the stream.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import os
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor, wait
from typing import Any, Protocol

from monitor.observability import Metrics
from monitor.sinks import DurableSink, JournalingSink, SessionJournal, Sink
from monitor.summary import session_summary
from monitor.types import Detection, Flag, Outcome, TraceStep, Transcript


@functools.cache
def shared_sink_threads() -> Executor:
    """The process's worker threads for sink writes (the production default of `Pipeline`)."""
    return ThreadPoolExecutor(thread_name_prefix="cotmon-sink")


os.register_at_fork(after_in_child=shared_sink_threads.cache_clear)  # a forked child has none of the threads


class SessionSoFar(Protocol):
    """What a recorder reads of its session (`monitor.session.Session`)."""

    @property
    def session_id(self) -> str: ...
    @property
    def steps(self) -> Sequence[TraceStep]: ...
    @property
    def detections(self) -> Sequence[Detection]: ...
    @property
    def evaluations(self) -> Sequence[tuple[int, int]]: ...
    @property
    def flags(self) -> Sequence[Flag]: ...

    def snapshot(self, outcome: Outcome, error: str | None = None) -> Transcript:
        """The session as a transcript, with this outcome."""
        ...


class InOrder:
    """Runs jobs on worker threads one after another, in the order they were given."""

    def __init__(self, threads: Executor):
        self._threads = threads
        self._last: Future[None] | None = None

    async def run(self, job: Callable[[], None]) -> None:
        """Run `job` once the earlier ones are done; cancelling the caller does not cancel it."""
        prior, context = self._last, contextvars.copy_context()  # the log line keeps bound context

        def ordered() -> None:
            if prior is not None:
                wait([prior])
            context.run(job)

        future = self._threads.submit(ordered)
        self._last = future
        await asyncio.shield(asyncio.wrap_future(future))


class SessionRecorder:
    """One session's writes to its journal and sinks (see the module docstring).

    Args:
        session: what is recorded; read on the event loop, and by a job while the session waits for it.
        sinks: where the session goes; a `JournalingSink` among them journals it while it streams.
        metrics: `sessions` and `store_errors` are counted here.
        log: gets the canonical `session` line and the failures.
        threads: where the waits run.
    """

    def __init__(self, session: SessionSoFar, sinks: Sequence[Sink], metrics: Metrics, log: Any, threads: Executor):
        self._session = session
        self.sinks = tuple(sinks)
        self._metrics, self._log = metrics, log
        self._jobs = InOrder(threads)
        self._spool = next((sink for sink in self.sinks if isinstance(sink, JournalingSink)), None)
        self._durable = [sink for sink in self.sinks if isinstance(sink, DurableSink)]
        self._journal: SessionJournal | None = None
        # Whether retention keeps this session even unflagged: asked once (a hash), not every token.
        self._kept_unflagged = self._spool is not None and self._spool.keeps_unflagged(session.session_id)
        self._journaled = (0, 0, 0, 0)  # steps, detections, evaluations, flags already in the journal

    def record(self, *, sync: bool = False) -> None:
        """Append what the session added to its journal (opened once the spool keeps the session)."""
        if self._spool is None:
            return
        s = self._session
        try:
            if self._journal is None:
                if not (s.flags or self._kept_unflagged):
                    return
                self._journal = self._spool.journal(s.snapshot("running"))
            else:
                n_steps, n_dets, n_evals, n_flags = self._journaled
                self._journal.extend(s.steps[n_steps:], s.detections[n_dets:], s.evaluations[n_evals:], s.flags[n_flags:])
            self._journaled = (len(s.steps), len(s.detections), len(s.evaluations), len(s.flags))
            if sync:
                self._journal.sync()
        except Exception as exc:  # a full disk must not take the stream down; it is counted and logged
            self._failed("journal_failed", exc)

    async def checkpoint(self, counted: Callable[[], None]) -> None:
        """Commit the flagged session so far (its journal synced to disk, then every durable sink), then
        call `counted`, which counts the flags: an alert never points at a session a crash could lose."""

        def job() -> None:
            self.record(sync=True)
            if self._durable:
                transcript = self._session.snapshot("running")
                for sink in self._durable:
                    self._deliver(sink, sink.checkpoint, transcript)
            counted()

        await self._run(job, waits=self._spool is not None or bool(self._durable))

    async def finish(self, transcript: Transcript) -> None:
        """The session has ended as `transcript`: end its journal, count it, hand it to every sink, log it."""

        def job() -> None:
            self.record()
            if self._journal is not None:
                try:
                    self._journal.end(transcript.outcome, transcript.ended_at, transcript.error, sync=transcript.flagged)
                except Exception as exc:
                    self._failed("journal_failed", exc)
            self._metrics.sessions.labels(transcript.outcome).inc()
            for sink in self.sinks:
                self._deliver(sink, sink.write, transcript)
            self._log.info("session", **session_summary(transcript))

        await self._run(job, waits=bool(self.sinks))

    async def _run(self, job: Callable[[], None], *, waits: bool) -> None:
        if waits:
            await self._jobs.run(job)
        else:  # nothing to wait for: no thread
            job()

    def _deliver(self, sink: Sink, write: Callable[[Transcript], None], transcript: Transcript) -> None:
        try:
            write(transcript)
        except Exception as exc:  # a failing sink must not take the others (or the stream) down
            self._metrics.store_errors.inc()
            self._log.error("sink_failed", session_id=self._session.session_id, sink=type(sink).__name__, error=str(exc))

    def _failed(self, event: str, exc: Exception) -> None:
        self._metrics.store_errors.inc()
        self._log.error(event, session_id=self._session.session_id, error=f"{type(exc).__name__}: {exc}")
