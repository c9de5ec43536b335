"""Fused readouts computed in forward hooks equal an independent computation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from monitor.engine.hf import HFEngine
from monitor.engine.readout import ReadoutError, ReadoutPlan
from monitor.types import ChatMessage, Readout

MESSAGES = [ChatMessage("user", "Summarise the quarterly report for the board.")]
TEXT = "The revenue fell 4% but I will say it grew.\n</think>\n\nRevenue grew this quarter."


def _columns(d_model: int, layers: list[int], per_layer: int, seed: int = 0, threshold: float | None = None) -> list[Readout]:
    rng = np.random.default_rng(seed)
    return [
        Readout(f"L{layer}c{i}", layer, rng.standard_normal(d_model).astype(np.float32), float(rng.standard_normal()), threshold)
        for layer in layers
        for i in range(per_layer)
    ]


def _reference(engine: HFEngine, readouts: list[Readout]) -> dict[str, np.ndarray]:
    """h @ w + b from output_hidden_states (layer L = hidden_states[L + 1]) for the assistant tokens."""
    prompt = engine.encode(engine.render_prompt(MESSAGES))
    text = engine.encode(TEXT)
    with torch.no_grad():
        out = engine.model(input_ids=torch.tensor([prompt + text]), output_hidden_states=True)
    ref = {}
    for r in readouts:
        h = out.hidden_states[r.layer + 1][0, len(prompt) :].double().numpy()
        value = h @ r.weight.astype(np.float64) + r.bias
        if r.threshold is not None:
            value = np.where(value > r.threshold, value, 0.0)
        ref[r.name] = value
    return ref


@pytest.mark.parametrize("prefill_chunk", [1000, 5])
async def test_hook_readouts_equal_hidden_state_matmul_on_several_layers(engine: HFEngine, prefill_chunk: int) -> None:
    engine.prefill_chunk = prefill_chunk  # 1000: one forward; 5: in chunks, through the KV cache
    readouts = _columns(engine.info.d_model, [0, 1, 2], per_layer=3)
    engine.install(readouts)
    steps = [s async for s in engine.teacher_force(MESSAGES, TEXT)]
    ref = _reference(engine, readouts)
    assert len(steps) == len(next(iter(ref.values())))
    for r in readouts:
        got = np.array([s.readouts[r.name] for s in steps])
        assert np.max(np.abs(got - ref[r.name])) <= 1e-4, r.name


async def test_jumprelu_threshold_zeroes_values_not_above_it(engine: HFEngine) -> None:
    readouts = _columns(engine.info.d_model, [1, 2], per_layer=2, seed=3, threshold=0.5)
    engine.install(readouts)
    steps = [s async for s in engine.teacher_force(MESSAGES, TEXT)]
    ref = _reference(engine, readouts)
    for r in readouts:
        got = np.array([s.readouts[r.name] for s in steps])
        assert np.max(np.abs(got - ref[r.name])) <= 1e-4
        assert (got == 0).any() and (got > 0.5).any()


def test_plan_refuses_a_layer_the_model_does_not_have() -> None:
    with pytest.raises(ReadoutError, match="layer 4 does not exist"):
        ReadoutPlan([Readout("x", 4, np.zeros(8, np.float32))], d_model=8, n_layers=4)


def test_plan_refuses_a_weight_of_the_wrong_width() -> None:
    with pytest.raises(ReadoutError, match=r"shape \(7,\), model needs \(8,\)"):
        ReadoutPlan([Readout("x", 0, np.zeros(7, np.float32))], d_model=8, n_layers=4)


def test_plan_refuses_duplicate_names() -> None:
    w = np.zeros(8, np.float32)
    with pytest.raises(ReadoutError, match="two readouts are named 'x'"):
        ReadoutPlan([Readout("x", 0, w), Readout("x", 1, w)], d_model=8, n_layers=4)


async def test_uninstalling_removes_every_hook(engine: HFEngine) -> None:
    engine.install(_columns(engine.info.d_model, [0, 1], per_layer=2))
    engine.install([])
    steps = [s async for s in engine.teacher_force(MESSAGES, TEXT)]
    assert all(not s.readouts for s in steps)
    assert all(not layer._forward_hooks for layer in engine.model.model.layers)
