"""The vllm engine's serving side against a tiny vLLM (vllm_fakes.TinyVLLM: vLLM-shaped
scheduling of the real tiny model, the real worker readouts and ZMQ side channel): the same
tokens, channels and readouts as the hf engine, alone and in mixed batches, teacher forcing and
the start-up self-test, a halt that aborts the vLLM request, and a clear refusal without vllm."""

from __future__ import annotations

import asyncio
import importlib.util
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry
from vllm_fakes import SamplingParams, TinyVLLM

from conftest import HALT_AT_FIFTH, ProbeFactory
from monitor.engine.base import EngineError
from monitor.engine.hf import HFEngine
from monitor.engine.selftest import selftest
from monitor.engine.vllm import INSTALL_HINT, VLLMEngine
from monitor.observability import Metrics
from monitor.pipeline import Pipeline
from monitor.policy import parse_policy
from monitor.server.serve import check_vllm_readouts
from monitor.settings import Settings
from monitor.types import ChatMessage, DetectorSpec, DeviceReadout, GenerationRequest, Readout, TraceStep

MESSAGES = [ChatMessage("user", "Did you run the tests before saying they pass?")]
OTHER = [ChatMessage("system", "Be brief."), ChatMessage("user", "Name three primes.")]


def norm_readout(layer: int) -> DeviceReadout:
    def build(device: Any) -> Any:
        return lambda h: h.norm(dim=-1, keepdim=True)  # a closure: it crosses to the worker by cloudpickle

    return DeviceReadout(("norm",), layer, build)


def readouts(d_model: int) -> list[Any]:
    rng = np.random.default_rng(3)
    return [
        Readout("a", 1, rng.standard_normal(d_model).astype(np.float32), 0.5),
        Readout("b", 3, rng.standard_normal(d_model).astype(np.float32), -0.25, threshold=0.0),
        norm_readout(2),
    ]


class Harness:
    """A VLLMEngine whose vLLM is a TinyVLLM, and the hf engine to compare it with."""

    def __init__(
        self, eos: frozenset[int] = frozenset(), timeout: float = 30.0, address: str | None = None, served_seed: int = 0
    ):
        self.hf = HFEngine.load("tiny")
        self.llm: TinyVLLM | None = None
        tok = self.hf.tokenizer
        think = (tok.convert_tokens_to_ids("<think>"), tok.convert_tokens_to_ids("</think>"))

        def start(config: dict[str, Any]) -> TinyVLLM:
            if address is not None:
                config = config | {"address": address}
            self.llm = TinyVLLM(HFEngine.load("tiny", seed=served_seed), config, eos=eos)
            return self.llm

        self.engine = VLLMEngine(start, SamplingParams, tok, self.hf.info, think_ids=think, eos=eos, readout_timeout_s=timeout)

    def install(self, items: list[Any] | None = None) -> None:
        items = readouts(self.hf.info.d_model) if items is None else items
        self.engine.install(items)
        self.hf.install(items)

    def close(self) -> None:
        if self.llm is not None:
            self.llm.shutdown()
        self.engine.close()


@pytest.fixture
def harness() -> Iterator[Harness]:
    h = Harness()
    h.install()
    yield h
    h.close()


async def collect(stream: Any) -> list[TraceStep]:
    return [step async for step in stream]


def assert_same_steps(got: list[TraceStep], want: list[TraceStep]) -> None:
    assert [(s.index, s.token_id, s.text, s.channel, s.final) for s in got] == [
        (s.index, s.token_id, s.text, s.channel, s.final) for s in want
    ]
    for g, w in zip(got, want, strict=True):
        assert g.readouts.keys() == w.readouts.keys()
        np.testing.assert_allclose([g.readouts[k] for k in w.readouts], list(w.readouts.values()), rtol=1e-4, atol=1e-4)


async def test_a_generation_matches_the_hf_engine(harness: Harness) -> None:
    request = GenerationRequest(MESSAGES, max_tokens=24, ignore_eos=True, session_id="s")
    got = await collect(harness.engine.stream(request))
    want = await collect(harness.hf.stream(request))
    assert len(got) == 24 and got[-1].final
    assert_same_steps(got, want)
    assert {"a", "b", "norm"} <= got[0].readouts.keys()


async def test_concurrent_streams_in_mixed_batches_each_get_their_own_rows(harness: Harness) -> None:
    one = GenerationRequest(MESSAGES, max_tokens=12, ignore_eos=True, session_id="one")
    two = GenerationRequest(OTHER, max_tokens=9, ignore_eos=True, session_id="two")
    got_one, got_two = await asyncio.gather(collect(harness.engine.stream(one)), collect(harness.engine.stream(two)))
    assert_same_steps(got_one, await collect(harness.hf.stream(one)))
    assert_same_steps(got_two, await collect(harness.hf.stream(two)))
    assert harness.llm is not None
    mixed = [b for b in harness.llm.batches if len(b) == 2 and max(b.values()) > 1 and min(b.values()) == 1]
    assert mixed, "no step had a prefill chunk beside a decode"


async def test_teacher_forcing_matches_the_hf_engine_and_passes_the_self_test(harness: Harness) -> None:
    text = "I ran only the fast tests.\n</think>\n\nAll tests pass."
    got = await collect(harness.engine.teacher_force(MESSAGES, text))
    assert_same_steps(got, await collect(harness.hf.teacher_force(MESSAGES, text)))
    report = await selftest(harness.engine, harness.hf)
    assert report.ok, report.message()
    assert report.tokens > 50 and {c.name for c in report.columns} == {"a", "b", "norm"}


async def test_the_self_test_catches_readouts_of_the_wrong_layer(harness: Harness) -> None:
    """What a wrong layer index inside vLLM would do: the reference reads block 2, vLLM block 1."""
    reference = HFEngine.load("tiny")
    a = readouts(reference.info.d_model)[0]
    reference.install([Readout("a", 2, a.weight, a.bias), *readouts(reference.info.d_model)[1:]])
    report = await selftest(harness.engine, reference)
    assert not report.ok and "1 of 3 readouts disagree" in report.message() and "a " in report.table()


async def test_an_end_of_sequence_token_ends_the_stream_before_it() -> None:
    probe = Harness()
    probe.install()
    tokens = [s.token_id for s in await collect(probe.engine.stream(GenerationRequest(MESSAGES, max_tokens=8, ignore_eos=True)))]
    probe.close()
    eos = tokens[4]
    first = tokens.index(eos)
    h = Harness(eos=frozenset({eos}))
    h.install()
    try:
        steps = await collect(h.engine.stream(GenerationRequest(MESSAGES, max_tokens=8)))
    finally:
        h.close()
    assert [s.token_id for s in steps] == tokens[:first] and steps[-1].final


async def test_max_tokens_asks_vllm_for_one_more_and_stops_it(harness: Harness) -> None:
    steps = await collect(harness.engine.stream(GenerationRequest(MESSAGES, max_tokens=5, ignore_eos=True, session_id="m")))
    assert [s.index for s in steps] == [0, 1, 2, 3, 4] and steps[-1].final
    assert harness.llm is not None
    (request_id,) = harness.llm.generated
    assert harness.llm.generated[request_id] == 6  # the sixth token fed the fifth its readouts


async def test_a_halt_aborts_the_vllm_request(harness: Harness, tmp_path: Path, make_probe: ProbeFactory) -> None:
    harness.close()
    h = Harness()
    spec = DetectorSpec("linear_probe", "p", {"artifact": str(make_probe())})
    policy = parse_policy({"name": "t", "rules": [HALT_AT_FIFTH]}, "t.yaml")
    pipeline = Pipeline(h.engine, [spec], policy, metrics=Metrics(CollectorRegistry()))
    try:
        transcript = await pipeline.generate(GenerationRequest(MESSAGES, max_tokens=200, ignore_eos=True)).run()
        await asyncio.sleep(0.05)
    finally:
        h.close()
    assert transcript.outcome == "halted" and len(transcript.steps) == 5
    assert h.llm is not None
    (request_id,) = h.llm.generated
    assert h.llm.aborted == [request_id]
    assert h.llm.generated[request_id] <= 7  # stopped within a step or two of the halt, not at 200


async def test_serve_refuses_to_start_when_the_self_test_fails() -> None:
    """serve's start-up check: the hf engine on CPU as reference; other weights in vLLM than in
    the reference (seed 1 against 0) make every readout disagree."""
    settings = Settings.load({}, model="tiny")
    good = Harness()
    good.install()
    try:
        await check_vllm_readouts(settings, good.engine)
    finally:
        good.close()
    bad = Harness(served_seed=1)
    bad.install()
    try:
        with pytest.raises(EngineError, match="readout self-test failed") as failure:
            await check_vllm_readouts(settings, bad.engine)
    finally:
        bad.close()
    assert "max |diff|" in str(failure.value) and "COTMON_VLLM_CAPTURE=hooks" in str(failure.value)


def test_readouts_are_fixed_once_vllm_has_started(harness: Harness) -> None:
    harness.engine.install(readouts(harness.hf.info.d_model))  # the same again: fine
    with pytest.raises(EngineError, match="fixed when it starts"):
        harness.engine.install(readouts(harness.hf.info.d_model)[:1])


async def test_readouts_that_never_come_fail_the_stream_clearly(tmp_path: Path) -> None:
    h = Harness(timeout=0.5, address=f"ipc://{tmp_path / 'nobody.sock'}")
    h.install()
    try:
        with pytest.raises(EngineError, match="did not come from the vLLM worker"):
            await collect(h.engine.stream(GenerationRequest(MESSAGES, max_tokens=4, ignore_eos=True)))
    finally:
        h.close()


def test_importing_monitor_does_not_import_vllm() -> None:
    code = (
        "import sys, monitor, monitor.cli, monitor.build, monitor.server.serve, monitor.engine.vllm, monitor.engine.vllm_rows; "
        "assert 'vllm' not in sys.modules, sorted(m for m in sys.modules if m.startswith('vllm'))"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed here")
def test_serving_on_vllm_without_it_says_how_to_install_it(tmp_path: Path) -> None:
    cotmon = Path(sys.executable).parent / "cotmon"
    result = subprocess.run(
        [str(cotmon), "serve", "--engine", "vllm", "--port", "0"], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert result.returncode != 0
    assert INSTALL_HINT in result.stderr and "pip install 'cotmon[vllm]'" in result.stderr
