"""The hf engine: generation, teacher-forcing, channels, budget and stopping."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import aclosing
from pathlib import Path

import numpy as np
import pytest

from monitor.engine.base import EngineError
from monitor.engine.hf import HFEngine
from monitor.types import ChatMessage, GenerationRequest, Readout

MESSAGES = (ChatMessage("system", "You are a coding agent."), ChatMessage("user", "Did the tests pass?"))


def _install(engine: HFEngine) -> list[Readout]:
    rng = np.random.default_rng(1)
    readouts = [Readout(f"r{i}", i % 3, rng.standard_normal(engine.info.d_model).astype(np.float32), 0.1 * i) for i in range(4)]
    engine.install(readouts)
    return readouts


async def test_teacher_forcing_reproduces_generated_tokens_and_readouts(engine: HFEngine) -> None:
    _install(engine)
    request = GenerationRequest(MESSAGES, max_tokens=80, temperature=0.9, seed=7, max_reasoning_tokens=40)
    generated = [s async for s in engine.stream(request)]
    text = "".join(s.text for s in generated)
    forced = [s async for s in engine.teacher_force(MESSAGES, text)]
    assert [s.token_id for s in forced] == [s.token_id for s in generated]
    assert [s.channel for s in forced] == [s.channel for s in generated]
    assert {s.channel for s in generated} == {"reasoning", "answer"}
    worst = max(abs(a.readouts[k] - b.readouts[k]) for a, b in zip(generated, forced, strict=True) for k in a.readouts)
    assert worst <= 1e-4


async def test_greedy_generation_is_deterministic(engine: HFEngine) -> None:
    request = GenerationRequest(MESSAGES, max_tokens=30)
    first = [s.token_id async for s in engine.stream(request)]
    second = [s.token_id async for s in engine.stream(request)]
    assert first == second and len(first) == 30


async def test_last_step_is_final_and_indices_are_consecutive(engine: HFEngine) -> None:
    steps = [s async for s in engine.stream(GenerationRequest(MESSAGES, max_tokens=12))]
    assert [s.index for s in steps] == list(range(12))
    assert [s.final for s in steps] == [False] * 11 + [True]


async def test_reasoning_budget_closes_the_think_block(engine: HFEngine) -> None:
    steps = [s async for s in engine.stream(GenerationRequest(MESSAGES, max_tokens=40, max_reasoning_tokens=10))]
    reasoning = "".join(s.text for s in steps if s.channel == "reasoning")
    assert reasoning.endswith("\n</think>")
    assert sum(s.channel == "reasoning" for s in steps) == 10 + len(engine.encode("\n</think>"))
    assert steps[-1].channel == "answer"


async def test_teacher_forced_channels_split_at_think_close(engine: HFEngine) -> None:
    steps = [s async for s in engine.teacher_force(MESSAGES, "I ran nothing.\n</think>\n\nAll tests pass.")]
    reasoning = "".join(s.text for s in steps if s.channel == "reasoning")
    answer = "".join(s.text for s in steps if s.channel == "answer")
    assert reasoning == "I ran nothing.\n</think>"
    assert answer == "\n\nAll tests pass."


async def test_closing_the_stream_stops_generation(engine: HFEngine, forward_count: Callable[[], int]) -> None:
    async with aclosing(engine.stream(GenerationRequest(MESSAGES, max_tokens=100))) as stream:
        async for step in stream:
            if step.index == 4:
                break
    assert forward_count() == 1 + 5  # the prompt, then one forward per emitted token, none after the close


def test_a_model_that_cannot_be_loaded_gives_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(EngineError, match=f"cannot load model '{tmp_path}'"):
        HFEngine.load(str(tmp_path))


def test_an_unknown_dtype_is_refused() -> None:
    with pytest.raises(EngineError, match="unknown dtype 'float7'"):
        HFEngine.load("tiny", dtype="float7")


@pytest.mark.parametrize("piece", [1, 3, 7, 1000])
async def test_forcing_text_in_pieces_equals_teacher_forcing_it_whole(engine: HFEngine, piece: int) -> None:
    _install(engine)
    text = "I did not run the tests.\n</think>\n\nAll 112 tests pass."
    whole = [s async for s in engine.teacher_force(MESSAGES, text)]
    forcer = engine.forcer(MESSAGES, "s")
    pieces = []
    for start in range(0, len(text), piece):
        pieces += await forcer.feed(text[start : start + piece])
    pieces += await forcer.finish()
    assert [s.token_id for s in pieces] == [s.token_id for s in whole]
    assert [s.channel for s in pieces] == [s.channel for s in whole] and pieces[-1].final
    worst = max(abs(a.readouts[k] - b.readouts[k]) for a, b in zip(pieces, whole, strict=True) for k in a.readouts)
    assert worst <= 1e-4


@pytest.mark.parametrize(
    ("temperature", "top_p", "seed"),
    [(5e-324, 1.0, 1), (1e-40, 0.5, 2), (0.7, 5e-324, 3), (1.0, 1e-46, 2**70), (2.0, 1.0, -(2**65))],
)
async def test_extreme_but_valid_sampling_parameters_still_sample(
    engine: HFEngine, temperature: float, top_p: float, seed: int
) -> None:
    request = GenerationRequest(MESSAGES, max_tokens=4, temperature=temperature, top_p=top_p, seed=seed)
    assert len([s async for s in engine.stream(request)]) >= 1


async def test_reading_in_chunks_gives_the_readouts_of_one_forward(engine: HFEngine, forward_count: Callable[[], int]) -> None:
    _install(engine)
    text = "I did not run the tests.\n</think>\n\nAll 112 tests pass."
    request = GenerationRequest(MESSAGES, max_tokens=20)
    engine.prefill_chunk = 1000  # all in one forward
    whole, whole_generated = [s async for s in engine.teacher_force(MESSAGES, text)], [s async for s in engine.stream(request)]
    before, engine.prefill_chunk = forward_count(), 7
    chunked = [s async for s in engine.teacher_force(MESSAGES, text)]
    prompt = engine.prompt_tokens(MESSAGES)
    assert forward_count() - before == -(-(prompt + len(whole)) // 7)  # ceil: read 7 tokens per forward
    chunked_generated = [s async for s in engine.stream(request)]
    for a, b in ((whole, chunked), (whole_generated, chunked_generated)):
        assert [s.token_id for s in a] == [s.token_id for s in b]
        worst = max(abs(x.readouts[k] - y.readouts[k]) for x, y in zip(a, b, strict=True) for k in x.readouts)
        assert worst <= 1e-4
