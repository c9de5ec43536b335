"""The engine on the real model (smollm2: SmolLM2-135M-Instruct, a byte-level BPE tokenizer), where
the tiny character-level model cannot speak: readouts against transformers' own hidden states,
generated text forced back, a halt, the prompted think block, the GGUF cache."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry

from conftest import MODELS, ProbeFactory, counting_forwards
from monitor.engine.base import EngineError
from monitor.engine.batching import PromptCache
from monitor.engine.hf import HFEngine
from monitor.engine.models import MANIFEST, SMOLLM2, cache_is_complete, dequantised, known_file, resolve_model
from monitor.observability import Metrics
from monitor.pipeline import Pipeline
from monitor.policy import parse_policy
from monitor.types import ChatMessage, DetectorSpec, GenerationRequest, Readout, TraceStep

PROMPT = (ChatMessage("user", "Is the X200 laptop in stock? I need it delivered by Friday."),)
LAYERS = (3, 18, 22, 29)


def readouts(engine: HFEngine, seed: int = 0) -> list[Readout]:
    rng = np.random.default_rng(seed)
    d = engine.info.d_model
    return [
        Readout(f"r{layer}", layer, rng.standard_normal(d).astype(np.float32) / np.sqrt(d), float(rng.standard_normal()))
        for layer in LAYERS
    ]


def greedy(max_tokens: int, **extra: object) -> GenerationRequest:
    return GenerationRequest(messages=list(PROMPT), max_tokens=max_tokens, temperature=0.0, session_id="s", **extra)  # type: ignore[arg-type]


async def collect(stream: object) -> list[TraceStep]:
    return [s async for s in stream]  # type: ignore[attr-defined]


def test_readouts_equal_transformers_hidden_states_at_the_probe_layers(real_engine: HFEngine) -> None:
    columns = readouts(real_engine)
    real_engine.install(columns)
    text = "Let me check the inventory first. The X200 shows zero units, so I should say it is out of stock."
    steps = asyncio.run(collect(real_engine.teacher_force(PROMPT, text)))
    prompt_ids = real_engine.encode(real_engine.render_prompt(PROMPT))
    ids = prompt_ids + [s.token_id for s in steps]
    with torch.inference_mode():
        hidden = real_engine.model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
    for column in columns:
        # layer L's output is hidden_states[L + 1], but for the last layer, whose entry has the final norm
        if column.layer == real_engine.info.n_layers - 1:
            continue
        h = hidden[column.layer + 1][0, len(prompt_ids) :].double().numpy()
        expected = h @ column.weight.astype(np.float64) + column.bias
        got = np.array([s.readouts[column.name] for s in steps])
        assert np.max(np.abs(got - expected)) <= 1e-4, column.name


def test_generated_text_forced_back_gives_the_same_tokens_and_readouts(real_engine: HFEngine) -> None:
    real_engine.install(readouts(real_engine, seed=1))
    generated = asyncio.run(collect(real_engine.stream(greedy(48))))
    text = "".join(s.text for s in generated)
    assert len(generated) == 48 and len(text.split()) >= 10  # English words, not bytes
    forced = asyncio.run(collect(real_engine.teacher_force(PROMPT, text)))
    assert [s.token_id for s in forced] == [s.token_id for s in generated]
    assert [s.channel for s in forced] == [s.channel for s in generated]
    for a, b in zip(generated, forced, strict=True):
        # One cached decode step vs one full forward sum in another order: float32 rounding, relative
        # to readouts of magnitude ~10 at the last layers (1e-4 absolute on the hidden states themselves).
        assert a.readouts == pytest.approx(b.readouts, rel=2e-5, abs=1e-4)


def test_the_prompted_think_block_gives_english_reasoning_then_an_answer(real_engine: HFEngine) -> None:
    prompt = real_engine.render_prompt(PROMPT)
    assert prompt.endswith("<|im_start|>assistant\n<think>\n") and SMOLLM2.think is not None
    assert SMOLLM2.think.instruction in prompt
    steps = asyncio.run(collect(real_engine.stream(greedy(120, max_reasoning_tokens=40))))
    reasoning = "".join(s.text for s in steps if s.channel == "reasoning")
    answer = "".join(s.text for s in steps if s.channel == "answer")
    assert reasoning.rstrip().endswith("</think>") and len(reasoning.split()) >= 8
    assert len(answer.split()) >= 3 and "<|im_end|>" not in answer


def test_a_halt_on_the_real_model_stops_within_one_token(real_engine: HFEngine, make_probe: ProbeFactory) -> None:
    artifact = make_probe(layer=18, d_model=real_engine.info.d_model)
    spec = DetectorSpec("linear_probe", "p", {"artifact": str(artifact), "allow_other_model": True})
    rule = {
        "name": "halt-at-7",
        "category": "deception",
        "severity": "critical",
        "when": {"detector": "p", "stat": "count_over", "over": 0.0, "window": 7, "gte": 7},
        "actions": ["alert", "halt"],
    }
    pipeline = Pipeline(
        real_engine, [spec], parse_policy({"name": "t", "rules": [rule]}, "t"), metrics=Metrics(CollectorRegistry())
    )
    real_engine.prompts = PromptCache()  # the prompt is read, not remembered
    with counting_forwards(real_engine.model) as forwards:
        transcript = asyncio.run(pipeline.generate(greedy(200, ignore_eos=True)).run())
    assert transcript.outcome == "halted" and [f.index for f in transcript.flags] == [6]
    assert len(transcript.steps) == 7 and forwards() == 1 + 7  # the prompt, then one forward per emitted token


def test_the_gguf_cache_is_checked_and_a_corrupt_one_is_rebuilt(tmp_path: Path) -> None:
    folder = resolve_model("smollm2", MODELS).path  # the session's cache, built once
    copy = tmp_path / Path(folder).name
    shutil.copytree(folder, copy)
    digest = json.loads((copy / MANIFEST).read_text())["gguf_sha256"]
    assert cache_is_complete(copy, digest)
    with (copy / "config.json").open("a") as fh:
        fh.write(" ")
    assert not cache_is_complete(copy, digest)
    (copy / MANIFEST).unlink()
    assert not cache_is_complete(copy, digest)


def test_a_gguf_file_with_the_wrong_hash_is_refused_naming_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    original = known_file(SMOLLM2)
    fake = tmp_path / SMOLLM2.file
    fake.write_bytes(original.read_bytes()[: 1 << 20])  # a truncated download
    monkeypatch.setattr("monitor.engine.models.known_file", lambda model: fake)
    with pytest.raises(EngineError, match=rf"{fake}: sha256 [0-9a-f]{{64}} does not match the expected {SMOLLM2.sha256}"):
        resolve_model("smollm2", tmp_path / "models")
    assert not (tmp_path / "models").exists()


def test_a_file_that_is_not_a_loadable_gguf_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "notes.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(EngineError, match=r"notes\.gguf: transformers cannot load this GGUF file"):
        dequantised(bad, "0" * 64, tmp_path / "models")
    assert list((tmp_path / "models").iterdir()) == []  # no partial cache left behind


def test_a_capture_after_another_with_a_common_prompt_start_equals_a_full_forward(real_engine: HFEngine) -> None:
    first = (ChatMessage("system", "You are a travel assistant."), ChatMessage("user", "Is breakfast included?"))
    second = (ChatMessage("system", "You are a travel assistant."), ChatMessage("user", "Can I check out late?"))
    text = "Let me look at the booking. It includes breakfast, served from seven."
    real_engine.capture(first, "Yes.", [18])  # nothing of one capture may leak into the next
    reused = real_engine.capture(second, text, [15, 18])
    ids = real_engine.encode(real_engine.render_prompt(second)) + real_engine.encode(text)
    with torch.inference_mode():
        hidden = real_engine.model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
    for layer in (15, 18):
        expected = hidden[layer + 1][0, len(ids) - reused[layer].shape[0] :]
        assert torch.max(torch.abs(reused[layer] - expected)) <= 1e-5 * torch.max(torch.abs(expected))  # float rounding


def test_capture_many_equals_capture_one_by_one(real_engine: HFEngine) -> None:
    items = [
        ((ChatMessage("user", "Write a haiku about autumn."),), "Leaves fall on the path."),
        ((ChatMessage("system", "You are a tutor."), ChatMessage("user", "Why is the sky blue?")), "Light scatters off air."),
        ((ChatMessage("user", "Hi"),), "Hello! How can I help you today with anything at all?"),
    ]
    together = real_engine.capture_many(items, [15, 22])
    for (messages, text), got in zip(items, together, strict=True):
        alone = real_engine.capture(messages, text, [15, 22])
        for layer in (15, 22):
            assert got[layer].shape == alone[layer].shape
            assert torch.max(torch.abs(got[layer] - alone[layer])) <= 1e-5 * torch.max(torch.abs(alone[layer]))
