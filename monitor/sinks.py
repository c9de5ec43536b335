"""What a session's transcript goes to: sinks (the interfaces; the transcript store implements them).

A `Sink` receives every finished session; a `DurableSink` also commits a flagged session the moment
a rule fires; a `JournalingSink` keeps a kept session on local disk as it streams.

`write` and `checkpoint` are called on a worker thread, never on the event loop (`monitor.recorder`):
a slow disk or database holds up its own session only. One session's calls come one at a time, in
order; different sessions' calls may run at the same time.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from monitor.types import Detection, Flag, Outcome, TraceStep, Transcript


class Sink(Protocol):
    """Receives every finished session's transcript (metrics and the log line are built in)."""

    def write(self, transcript: Transcript) -> None: ...


@runtime_checkable
class DurableSink(Sink, Protocol):
    """A sink that commits a session the moment a rule fires (the transcript store).

    `checkpoint` gets the session so far (outcome `running`) and returns once it is durable; only
    then are the flags counted, so an alert never points at a transcript a crash could lose.
    """

    def checkpoint(self, transcript: Transcript) -> None: ...


class SessionJournal(Protocol):
    """A live session's record on local disk, appended to as it streams (`monitor.store.spool.Journal`)."""

    def extend(
        self,
        steps: Sequence[TraceStep],
        detections: Sequence[Detection],
        evaluations: Sequence[tuple[int, int]],
        flags: Sequence[Flag],
    ) -> None: ...

    def sync(self) -> None: ...

    def end(self, outcome: Outcome, ended_at: float, error: str | None, *, sync: bool) -> None: ...


@runtime_checkable
class JournalingSink(DurableSink, Protocol):
    """A durable sink that journals kept sessions while they stream (`monitor.store.spool.SpooledStore`).

    Each step's additions reach the journal before the step goes to the client, so a crash loses
    no streamed token of a kept session; a checkpoint syncs the journal first.
    """

    def keeps_unflagged(self, session_id: str) -> bool:
        """Whether retention keeps the session even unflagged (asked once per session)."""
        ...

    def journal(self, so_far: Transcript) -> SessionJournal: ...
