"""Batched teacher-forcing in the hf engine: texts forced at the same time (watch mode, eval, replays)
share forwards, and each text gets the steps it gets alone (tokens, text, channels exact; readouts
within 1e-4); a lone text is bit for bit what it always was."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from transformers import DynamicCache

from conftest import counting_forwards
from monitor.engine.forcing import TextBatch
from monitor.engine.hf import HFEngine
from monitor.engine.readout import decoder_layers
from monitor.types import ChatMessage, GenerationRequest, Readout, TraceStep


@pytest.fixture
def engine(engine: HFEngine) -> Iterator[HFEngine]:
    rng = np.random.default_rng(5)
    engine.install([Readout(f"r{i}", i, rng.standard_normal(engine.info.d_model).astype(np.float32), 0.1) for i in range(3)])
    yield engine
    engine.install([])


def texts() -> list[tuple[tuple[ChatMessage, ...], str]]:
    """Six (prompt, text) pairs: two prompts, texts of different lengths (within the padding a shared
    forward allows)."""
    prompts = [(ChatMessage("user", "Did the tests pass?"),), (ChatMessage("user", "Summarise the report, please."),)]
    said = ["<think>\nThe tests " + "ran and mostly passed. " * (8 + i % 3) + "</think>\nYes." for i in range(6)]
    return [(prompts[i % 2], text) for i, text in enumerate(said)]


async def force(engine: HFEngine, messages: tuple[ChatMessage, ...], text: str, *, delay: float = 0.0) -> list[TraceStep]:
    await asyncio.sleep(delay)
    return [s async for s in engine.teacher_force(messages, text, "s")]


def content(steps: list[TraceStep]) -> list[tuple[object, ...]]:
    return [(s.index, s.token_id, s.text, s.channel, s.final) for s in steps]


def worst(a: list[TraceStep], b: list[TraceStep]) -> float:
    return max(abs(x.readouts[k] - y.readouts[k]) for x, y in zip(a, b, strict=True) for k in x.readouts)


async def test_texts_forced_together_share_forwards_and_get_their_own_steps(engine: HFEngine) -> None:
    pairs = texts()
    alone = [await force(engine, m, t) for m, t in pairs]
    batch = engine.force_batch()
    read_before = batch.texts_read
    with counting_forwards(engine.model) as forwards:
        together = await asyncio.gather(*[force(engine, m, t) for m, t in pairs])
    for a, t in zip(alone, together, strict=True):
        assert content(t) == content(a) and worst(a, t) <= 1e-4
    # All six were waiting when the first forward started: their common prompt start is read once,
    # then the rest of all six in one forward.
    assert forwards() == 2 and batch.texts_read - read_before == 6


async def test_a_lone_text_is_bit_for_bit_the_plain_read(engine: HFEngine) -> None:
    messages, text = texts()[3]
    prompt, ids = engine.encode(engine.render_prompt(messages)), engine.encode(text)
    _, values = await engine.prefill(prompt + ids, DynamicCache())  # the forward generation makes, head included
    steps = await force(engine, messages, text)
    assert values is not None
    assert [list(s.readouts.values()) for s in steps] == values[len(prompt) :].tolist()


async def test_reads_share_a_forward_only_within_the_budget_and_the_padding_allowed(engine: HFEngine) -> None:
    long_messages, long_text = (ChatMessage("user", "Go on."),), "<think>\n" + "word " * 250
    short_messages, short_text = (ChatMessage("user", "Go on."),), "<think>\nYes."
    engine.force_batch_tokens = 1000
    assert len(engine.encode(engine.render_prompt(long_messages) + long_text)) > 1000  # over what one shared forward may hold
    pairs = [*texts()[:3], (long_messages, long_text), (short_messages, short_text)]
    alone = [await force(engine, m, t) for m, t in pairs]
    batch = engine.force_batch()
    forwards_before, read_before = batch.forwards, batch.texts_read
    together = await asyncio.gather(*[force(engine, m, t) for m, t in pairs])
    for a, t in zip(alone, together, strict=True):
        assert content(t) == content(a) and worst(a, t) <= 1e-4
    # The long text goes alone (chunked), the short one too (padded to the others it would be mostly
    # padding); the three of similar length share one forward.
    assert (batch.forwards - forwards_before, batch.texts_read - read_before) == (1, 3)


async def test_a_cancelled_read_leaves_the_others_theirs(engine: HFEngine) -> None:
    pairs = texts()
    alone = [await force(engine, m, t) for m, t in pairs]
    tasks = [asyncio.create_task(force(engine, m, t)) for m, t in pairs]
    await asyncio.sleep(0)
    tasks[2].cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert isinstance(results[2], asyncio.CancelledError)
    for i, (a, t) in enumerate(zip(alone, results, strict=True)):
        if i != 2:
            assert isinstance(t, list) and content(t) == content(a) and worst(a, t) <= 1e-4


async def test_stepwise_replays_share_decode_steps_with_live_sessions(engine: HFEngine) -> None:
    """A replay of generated tokens makes the calls generation makes, in the same decode batch."""
    request = GenerationRequest((ChatMessage("user", "Did the tests pass?"),), max_tokens=24, ignore_eos=True)
    generated = [s async for s in engine.stream(request)]
    tokens = [s.token_id for s in generated]

    async def replay() -> list[TraceStep]:
        return [s async for s in engine.force_tokens(request.messages, tokens, "r", stepwise=True)]

    lone = await replay()
    assert [s.readouts for s in lone] == [s.readouts for s in generated]  # alone: bit for bit the generation
    batch = engine.decode_batch()
    steps_before, rows_before = batch.steps, batch.rows_read
    replays = await asyncio.gather(*[replay() for _ in range(3)], *[engine_run(engine, request)])
    assert batch.rows_read - rows_before == 4 * len(tokens) and batch.steps - steps_before < 2 * len(tokens)
    for steps in replays:
        assert [s.token_id for s in steps] == tokens and worst(generated, steps) <= 1e-4


async def engine_run(engine: HFEngine, request: GenerationRequest) -> list[TraceStep]:
    return [s async for s in engine.stream(request)]


def test_text_batch_lays_out_the_common_prompt_start_once() -> None:
    batch = TextBatch.of([[1, 2, 3, 4], [1, 2, 5]], [[7, 8], [9]], pad=0, device=torch.device("cpu"))
    assert batch.prefix == [1, 2] and batch.rows.tolist() == [[3, 4, 7, 8], [5, 9, 0, 0]]
    values = torch.arange(8).reshape(2, 4)
    assert [v.tolist() for v in batch.texts_of(values)] == [[2, 3], [5]]
    same = TextBatch.of([[1, 2], [1, 2]], [[3], [4, 5]], pad=0, device=torch.device("cpu"))
    assert same.prefix == [1] and same.rows.tolist() == [[2, 3, 0], [2, 4, 5]]  # each row keeps a prompt token


async def test_a_forced_read_runs_no_layer_above_the_highest_readout(engine: HFEngine) -> None:
    """Teacher-forcing wants readouts, not logits: the layers above the highest readout layer (2 of
    the tiny model's 4) never run, alone or in a shared forward, and the readouts are unchanged."""
    layers = decoder_layers(engine.model)
    ran = {i: 0 for i in range(len(layers))}
    handles = [layer.register_forward_pre_hook(lambda *_, i=i: ran.__setitem__(i, ran[i] + 1)) for i, layer in enumerate(layers)]
    try:
        pairs = texts()
        alone = await force(engine, *pairs[0])
        together = await asyncio.gather(*[force(engine, m, t) for m, t in pairs])
    finally:
        for handle in handles:
            handle.remove()
    assert ran[0] == ran[2] > 0 and ran[3] == 0
    assert worst(alone, together[0]) <= 1e-4
