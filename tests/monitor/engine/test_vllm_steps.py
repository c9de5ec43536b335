"""Pairing vLLM's streamed tokens with the worker's readouts (StepAssembler), in either arrival
order, and labelling channels by token id (TokenChannels) as vLLM's reasoning parsers do."""

from __future__ import annotations

import numpy as np

from monitor.engine.vllm_steps import StepAssembler, TokenChannels, channels_of

P = 10  # prompt length: token k sits at position P + k


def rows(*values: float) -> np.ndarray:
    return np.array([[v] for v in values], dtype=np.float32)


def test_a_token_waits_for_its_readouts_and_for_the_next_token() -> None:
    a = StepAssembler(P, max_steps=10, n_values=1)
    a.add_tokens([5])
    a.add_readouts(P, rows(0.5))
    assert a.pop_ready() == []  # is token 0 the last? not known until the next token or the end
    a.add_tokens([6])
    (step,) = a.pop_ready()
    assert (step.index, step.token_id, step.values, step.final) == (0, 5, (0.5,), False)
    a.add_tokens([7])
    assert a.pop_ready() == []  # token 1's readouts are still on their way
    assert a.overdue() == [1]


def test_readouts_may_arrive_before_their_tokens() -> None:
    a = StepAssembler(P, max_steps=10, n_values=1)
    a.add_readouts(P, rows(0.125, 0.25))
    a.add_tokens([1, 2, 3])
    assert [(s.index, s.values) for s in a.pop_ready()] == [(0, (0.125,)), (1, (0.25,))]


def test_the_extra_token_only_feeds_the_last_one() -> None:
    """vLLM is asked for max_tokens + 1: the last emitted token got its readouts from that forward."""
    a = StepAssembler(P, max_steps=2, n_values=1)
    a.add_tokens([1, 2])
    a.add_readouts(P, rows(0.125))
    assert [s.index for s in a.pop_ready()] == [0]
    a.add_readouts(P + 1, rows(0.25))  # the forward that feeds token 1 and samples the extra one
    (last,) = a.pop_ready()
    assert (last.index, last.values, last.final) == (1, (0.25,), True)
    assert a.done and not a.finished  # the frontend aborts the request now


def test_an_end_of_sequence_token_ends_the_steps_and_is_not_one() -> None:
    a = StepAssembler(P, max_steps=10, n_values=1, eos=frozenset({0}))
    a.add_tokens([4, 0])
    a.add_readouts(P, rows(0.625))
    (step,) = a.pop_ready()
    assert (step.token_id, step.final) == (4, True)
    assert a.done


def test_a_request_cut_by_the_length_limit_ends_without_the_last_readouts() -> None:
    a = StepAssembler(P, max_steps=10, n_values=1)
    a.add_tokens([4, 5])
    a.add_readouts(P, rows(0.625))
    a.finish()  # max_model_len: token 1 was sampled but never fed back
    steps = a.pop_ready()
    assert [(s.index, s.values, s.final) for s in steps] == [(0, (0.625,), False), (1, None, True)]
    assert a.done


def test_a_teacher_forced_text_waits_for_every_readout_even_after_the_request_ends() -> None:
    a = StepAssembler(P, max_steps=3, n_values=1, forced=True)
    a.add_tokens([1, 2, 3])
    a.finish()
    a.add_readouts(P, rows(0.125, 0.25))
    assert [s.index for s in a.pop_ready()] == [0, 1]
    assert a.overdue() == [2]
    a.add_readouts(P + 2, rows(0.375))
    (last,) = a.pop_ready()
    assert (last.values, last.final) == ((0.375,), True)


def test_a_recomputed_position_keeps_its_first_readouts() -> None:
    a = StepAssembler(P, max_steps=10, n_values=1)
    a.add_readouts(P - 2, rows(9.0, 9.0, 0.125))  # prompt rows are ignored
    a.add_readouts(P, rows(0.75))  # vLLM preempted and recomputed the request
    a.add_tokens([1, 2])
    assert a.pop_ready()[0].values == (0.125,)


def test_without_readouts_installed_steps_need_only_the_tokens() -> None:
    a = StepAssembler(P, max_steps=10, n_values=0)
    a.add_tokens([1, 2])
    assert [(s.index, s.values) for s in a.pop_ready()] == [(0, ())]


def test_reasoning_runs_through_the_end_token_when_the_prompt_opens_it() -> None:
    START, END = 100, 101
    assert channels_of([5, 6, END, 7], START, END, in_reasoning=True) == ["reasoning", "reasoning", "reasoning", "answer"]


def test_a_stream_that_opens_with_the_start_token_is_reasoning() -> None:
    START, END = 100, 101
    assert channels_of([START, 5, END, 6], START, END, in_reasoning=False) == ["reasoning"] * 3 + ["answer"]
    assert channels_of([5, START, 6], START, END, in_reasoning=False) == ["answer"] * 3


def test_token_channels_count_reasoning_tokens() -> None:
    tracker = TokenChannels(None, 9, in_reasoning=True)
    for token in (1, 2, 9, 3):
        tracker.push(token)
    assert tracker.reasoning_tokens == 3 and tracker.channel == "answer"
