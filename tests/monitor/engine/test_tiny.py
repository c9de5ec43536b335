"""The tiny model: deterministic from its seed and loadable through the real loading code."""

from __future__ import annotations

from pathlib import Path

import torch

from monitor.engine.hf import HFEngine
from monitor.engine.tiny import build_tiny, weights_digest
from monitor.types import ChatMessage, GenerationRequest

# sha256 prefix of the seed-0 weights; a change means the tiny model is no longer the same
# model on every machine (or torch's seeded generator changed).
SEED0_DIGEST = "bf47f979a8d627b8"
REQUEST = GenerationRequest((ChatMessage("user", "Hello"),), max_tokens=24)


def test_same_seed_gives_identical_weights() -> None:
    a, _ = build_tiny(0)
    b, _ = build_tiny(0)
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(pa, pb), name


def test_different_seeds_give_different_weights() -> None:
    assert weights_digest(build_tiny(0)[0]) != weights_digest(build_tiny(1)[0])


def test_seed0_weights_match_the_recorded_digest() -> None:
    assert weights_digest(build_tiny(0)[0]) == SEED0_DIGEST


async def test_same_seed_gives_identical_greedy_generation() -> None:
    first = [s.token_id async for s in HFEngine.load("tiny", seed=0).stream(REQUEST)]
    second = [s.token_id async for s in HFEngine.load("tiny", seed=0).stream(REQUEST)]
    assert first == second


async def test_save_pretrained_round_trip_loads_equal_weights_and_generation(tmp_path: Path) -> None:
    model, tokenizer = build_tiny(0)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded = HFEngine.load(str(tmp_path))
    for (name, pa), (_, pb) in zip(model.state_dict().items(), loaded.model.state_dict().items(), strict=True):
        assert torch.equal(pa, pb), name
    assert loaded.info.d_model == 64 and loaded.info.n_layers == 4
    original = [s.token_id async for s in HFEngine.load("tiny").stream(REQUEST)]
    reloaded = [s.token_id async for s in loaded.stream(REQUEST)]
    assert original == reloaded
    assert loaded.render_prompt(REQUEST.messages) == HFEngine.load("tiny").render_prompt(REQUEST.messages)
