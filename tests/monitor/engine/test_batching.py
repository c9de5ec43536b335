"""Continuous batching in the hf engine: concurrent sessions share each decode step's forward, and
each session gets what it would get alone (greedy tokens, seeded samples, readouts within 1e-4);
a halt or a disconnect ends only its own session."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from contextlib import aclosing

import numpy as np
import pytest

from monitor.engine.hf import HFEngine
from monitor.types import ChatMessage, GenerationRequest, Readout, TraceStep


@pytest.fixture
def engine(engine: HFEngine) -> Iterator[HFEngine]:
    rng = np.random.default_rng(3)
    engine.install([Readout(f"r{i}", i, rng.standard_normal(engine.info.d_model).astype(np.float32), 0.1) for i in range(3)])
    yield engine
    engine.batching = True
    engine.install([])


def requests(**kwargs: object) -> list[GenerationRequest]:
    """Five sessions with prompts and lengths of their own."""
    return [
        GenerationRequest(
            (ChatMessage("user", "Did the tests pass? " * (i + 1)),), max_tokens=12 + 9 * i, ignore_eos=True, **kwargs
        )  # type: ignore[arg-type]
        for i in range(5)
    ]


async def run(engine: HFEngine, request: GenerationRequest, delay: float = 0.0) -> list[TraceStep]:
    await asyncio.sleep(delay)
    return [s async for s in engine.stream(request)]


async def alone_and_together(engine: HFEngine, reqs: list[GenerationRequest]) -> tuple[list[list[TraceStep]], ...]:
    engine.batching = False
    alone = [await run(engine, r) for r in reqs]
    engine.batching = True
    together = await asyncio.gather(*[run(engine, r, delay=0.02 * i) for i, r in enumerate(reqs)])  # joining at different steps
    return alone, list(together)


def content(steps: list[TraceStep]) -> list[tuple[object, ...]]:
    """The steps without their (random) session id."""
    return [(s.index, s.token_id, s.text, s.channel, dict(s.readouts), s.final) for s in steps]


def worst(a: list[TraceStep], b: list[TraceStep]) -> float:
    return max(abs(x.readouts[k] - y.readouts[k]) for x, y in zip(a, b, strict=True) for k in x.readouts)


async def test_concurrent_sessions_get_their_greedy_tokens_and_readouts_alone_in_fewer_forwards(engine: HFEngine) -> None:
    batch = engine.decode_batch()
    steps_before, rows_before = batch.steps, batch.rows_read
    alone, together = await alone_and_together(engine, requests(temperature=0.0))
    for a, t in zip(alone, together, strict=True):
        assert [s.token_id for s in t] == [s.token_id for s in a] and worst(a, t) <= 1e-4
    rows, steps = batch.rows_read - rows_before, batch.steps - steps_before
    assert rows == sum(len(a) for a in alone) and steps < rows / 1.5  # steps read several sessions' tokens


async def test_seeded_sampling_in_a_batch_reproduces_each_request_alone(engine: HFEngine) -> None:
    reqs = [
        GenerationRequest(r.messages, max_tokens=r.max_tokens, temperature=0.9, top_p=0.95, seed=i)
        for i, r in enumerate(requests())
    ]
    alone, together = await alone_and_together(engine, reqs)
    assert [[s.token_id for s in t] for t in together] == [[s.token_id for s in a] for a in alone]


async def test_a_lone_session_is_bit_for_bit_what_it_was_unbatched(engine: HFEngine) -> None:
    request = requests(temperature=0.0)[2]
    engine.batching = False
    unbatched = await run(engine, request)
    engine.batching = True
    assert content(await run(engine, request)) == content(unbatched)


async def test_a_session_closed_after_five_tokens_stops_there_while_the_others_run_on(engine: HFEngine) -> None:
    reqs = requests(temperature=0.0)
    engine.batching = False
    alone = [await run(engine, r) for r in reqs]
    engine.batching = True
    batch = engine.decode_batch()
    rows_before = batch.rows_read

    async def halted() -> list[TraceStep]:
        kept = []
        async with aclosing(engine.stream(reqs[4])) as steps:  # what a halt does: close the stream
            async for step in steps:
                kept.append(step)
                if len(kept) == 5:
                    break
        return kept

    cut, *others = await asyncio.gather(halted(), *[run(engine, r) for r in reqs[:4]])
    assert [s.token_id for s in cut] == [s.token_id for s in alone[4][:5]]
    assert [[s.token_id for s in o] for o in others] == [[s.token_id for s in a] for a in alone[:4]]
    # The closed session read its 5 tokens and at most the one in flight when it closed.
    assert batch.rows_read - rows_before <= sum(len(a) for a in alone[:4]) + 5 + 1


async def test_a_cancelled_session_leaves_the_batch_and_the_others_finish(engine: HFEngine) -> None:
    reqs = requests(temperature=0.0)
    engine.batching = False
    alone = [await run(engine, r) for r in reqs[:4]]
    engine.batching = True
    gone = asyncio.create_task(run(engine, reqs[4]))  # a client that disconnects
    others = asyncio.gather(*[run(engine, r) for r in reqs[:4]])
    await asyncio.sleep(0.05)
    gone.cancel()
    assert [[s.token_id for s in o] for o in await others] == [[s.token_id for s in a] for a in alone]
    with pytest.raises(asyncio.CancelledError):
        await gone
    assert content(await run(engine, reqs[0])) == content(alone[0])  # the batch goes on serving


async def test_a_prompt_seen_again_is_not_read_again_and_gives_the_same_steps(
    engine: HFEngine, forward_count: Callable[[], int]
) -> None:
    request = requests(temperature=0.0)[1]
    first = await run(engine, request)
    read_once = forward_count()
    again = await run(engine, request)
    assert content(again) == content(first)
    assert read_once == 1 + len(first) and forward_count() - read_once == len(first)  # no prompt forward


async def test_a_session_that_joins_as_the_last_one_leaves_is_served(engine: HFEngine) -> None:
    request = requests(temperature=0.0)[0]
    for _ in range(30):  # back to back: each joins while the batch winds down the one before
        assert len(await asyncio.wait_for(run(engine, request), 10)) == request.max_tokens
