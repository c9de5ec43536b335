"""Sinks are written off the event loop, and a caller cancelled meanwhile (a disconnect) loses no write."""

from __future__ import annotations

import asyncio
import threading

import pytest

from monitor.observability import Metrics
from monitor.pipeline import Pipeline
from monitor.policy import Policy
from monitor.testing import ScriptedEngine
from monitor.types import ChatMessage, GenerationRequest, Transcript

MESSAGES = (ChatMessage("user", "hi"),)
NO_RULES = Policy("none", "", (), "test")


class Gate:
    """A sink whose writes wait until released; it notes the thread each one ran on."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.threads: list[threading.Thread] = []
        self.written: list[Transcript] = []
        self.done = threading.Event()

    def write(self, transcript: Transcript) -> None:
        self.threads.append(threading.current_thread())
        self.release.wait(10)
        self.written.append(transcript)
        self.done.set()


def _pipeline(sink: Gate, metrics: Metrics) -> Pipeline:
    return Pipeline(ScriptedEngine([(f"t{i} ", "reasoning") for i in range(3)]), [], NO_RULES, metrics=metrics, sinks=[sink])


async def _writing(sink: Gate) -> None:
    async with asyncio.timeout(10):
        while not sink.threads:
            await asyncio.sleep(0.001)  # the event loop runs on while the write waits


async def test_a_slow_sink_does_not_hold_up_the_event_loop(metrics: Metrics) -> None:
    sink = Gate()
    task = asyncio.ensure_future(_pipeline(sink, metrics).generate(GenerationRequest(MESSAGES)).run())
    await _writing(sink)
    assert not task.done() and sink.threads[0] is not threading.current_thread()
    sink.release.set()
    transcript = await task
    assert sink.written == [transcript] and transcript.outcome == "completed"


async def test_a_caller_cancelled_while_its_session_is_written_loses_no_write(metrics: Metrics) -> None:
    sink = Gate()
    session = _pipeline(sink, metrics).generate(GenerationRequest(MESSAGES))
    task = asyncio.ensure_future(session.run())
    await _writing(sink)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    sink.release.set()
    assert sink.done.wait(10)
    assert [t.session_id for t in sink.written] == [session.session_id]
