"""The vLLM worker's readouts without vLLM: which rows of a flattened batch belong to which
session (mixed prefill chunks and decodes, requests that asked nothing), the fused readouts on
exactly those rows against a NumPy reference, and the wire format to the serving process."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from vllm_fakes import CachedRequestState, InputBatch, SamplingParams, SchedulerOutput

from monitor.engine.readout import ReadoutPlan
from monitor.engine.vllm_rows import (
    RowSlice,
    StepReadouts,
    Wanted,
    decode_batch,
    encode_batch,
    plan_rows,
    readout_rows,
    row_index,
    wanted_of,
)
from monitor.types import Readout

D = 16


def test_rows_of_a_mixed_batch_map_to_their_sessions() -> None:
    # decode of A (1 row at 57) | chunk of B's prefill (rows at 0..9, readouts asked from 6)
    # | C, which asked nothing | chunk of D's prefill past its chat prompt (10..15, asked from 12)
    req_ids = ["A", "B", "C", "D"]
    scheduled = {"A": 1, "B": 10, "C": 3, "D": 6}
    computed = [57, 0, 40, 10]
    wanted = {"A": Wanted("sa", 50), "B": Wanted("sb", 6), "D": Wanted("sd", 12)}
    slices = plan_rows(req_ids, scheduled, computed, wanted)
    assert slices == [RowSlice("sa", 0, 1, 57), RowSlice("sb", 7, 4, 6), RowSlice("sd", 16, 4, 12)]
    assert row_index(slices) == [0, 7, 8, 9, 10, 16, 17, 18, 19]


def test_a_prefill_chunk_before_the_asked_position_ships_nothing() -> None:
    assert plan_rows(["B"], {"B": 8}, [0], {"B": Wanted("sb", 8)}) == []
    assert plan_rows(["B"], {"B": 8}, [8], {"B": Wanted("sb", 8)}) == [RowSlice("sb", 0, 8, 8)]


def test_the_ask_is_read_from_extra_args_and_checked() -> None:
    assert wanted_of({"cotmon": {"key": "k", "from": 3}}) == Wanted("k", 3)
    assert wanted_of(None) is None and wanted_of({"other": 1}) is None
    with pytest.raises(ValueError, match="'from': int >= 0"):
        wanted_of({"cotmon": {"key": "k", "from": -1}})


def readouts() -> list[Readout]:
    rng = np.random.default_rng(0)
    w = [rng.standard_normal(D).astype(np.float32) for _ in range(3)]
    return [Readout("a", 1, w[0], 0.25), Readout("b", 3, w[1], -0.5, threshold=0.0), Readout("c", 1, w[2])]


def test_readouts_on_the_chosen_rows_match_a_numpy_reference() -> None:
    rng = np.random.default_rng(1)
    hidden = {1: rng.standard_normal((12, D)).astype(np.float32), 3: rng.standard_normal((12, D)).astype(np.float32)}
    plan = ReadoutPlan(readouts(), d_model=D, n_layers=4)
    chosen = [0, 7, 8, 11]
    got = readout_rows(plan, {k: torch.from_numpy(v) for k, v in hidden.items()}, torch.tensor(chosen)).numpy()
    r = {x.name: x for x in readouts()}
    ref = np.stack(
        [
            hidden[1][chosen] @ r["a"].weight + 0.25,
            hidden[1][chosen] @ r["c"].weight,
            np.maximum(hidden[3][chosen] @ r["b"].weight - 0.5, 0.0),  # JumpReLU at 0
        ],
        axis=1,
    )
    assert plan.names == ("a", "c", "b")
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_a_batch_crosses_the_wire_intact() -> None:
    slices = [RowSlice("s1", 0, 2, 40), RowSlice("s2", 5, 1, 7)]
    values = np.arange(9, dtype=np.float32).reshape(3, 3)
    out = decode_batch(encode_batch(slices, values))
    assert [(r.key, r.position) for r in out] == [("s1", 40), ("s2", 7)]
    np.testing.assert_array_equal(out[0].values, values[:2])
    np.testing.assert_array_equal(out[1].values, values[2:])


def test_a_malformed_batch_is_refused() -> None:
    header, data = encode_batch([RowSlice("s", 0, 2, 0)], np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match="holds 3 values"):
        decode_batch([header, data[:12]])
    with pytest.raises(ValueError, match="2 frames"):
        decode_batch([header])
    with pytest.raises(ValueError, match="slices have 2 rows"):
        encode_batch([RowSlice("s", 0, 2, 0)], np.zeros((3, 3), np.float32))


def test_on_step_reads_vllms_own_objects_and_ships_the_asked_rows() -> None:
    """The worker's glue: the runner's InputBatch order, its computed-token counts and each
    request's SamplingParams.extra_args decide what is shipped."""
    shipped: list[tuple[list[RowSlice], np.ndarray]] = []
    steps = StepReadouts(ReadoutPlan(readouts(), d_model=D, n_layers=4), lambda s, v: shipped.append((list(s), v.numpy())))
    asked = SamplingParams(extra_args={"cotmon": {"key": "gen", "from": 30}})
    forced = SamplingParams(extra_args={"cotmon": {"key": "forced", "from": 4}})
    requests = {
        "r1-ab12cd34": CachedRequestState("r1-ab12cd34", [0] * 30, asked, 31, [5, 6]),
        "r2-0f0f0f0f": CachedRequestState("r2-0f0f0f0f", [0] * 9, forced, 0, []),
        "r3-11111111": CachedRequestState("r3-11111111", [0] * 5, SamplingParams(), 2, []),
    }
    batch = InputBatch(["r2-0f0f0f0f", "r1-ab12cd34", "r3-11111111"], np.array([0, 31, 2], dtype=np.int32))
    output = SchedulerOutput([], None, {"r2-0f0f0f0f": 9, "r1-ab12cd34": 1, "r3-11111111": 3}, 13)
    hidden = {layer: torch.randn(16, D) for layer in (1, 3)}  # 13 rows and CUDA-graph padding
    slices = steps.on_step(output, batch, requests, hidden)
    assert slices == [RowSlice("forced", 4, 5, 4), RowSlice("gen", 9, 1, 31)]
    (sent, values) = shipped[0]
    assert sent == slices and values.shape == (6, 3)
    expected = readout_rows(steps.plan, hidden, torch.tensor([4, 5, 6, 7, 8, 9])).numpy()
    np.testing.assert_array_equal(values, expected)


def test_finished_requests_are_forgotten() -> None:
    steps = StepReadouts(ReadoutPlan(readouts(), d_model=D, n_layers=4), lambda s, v: None)
    params = SamplingParams(extra_args={"cotmon": {"key": "k", "from": 0}})
    batch = InputBatch(["r"], np.array([0]))
    hidden = {layer: torch.zeros(1, D) for layer in (1, 3)}
    steps.on_step(SchedulerOutput([], None, {"r": 1}, 1), batch, {"r": CachedRequestState("r", [1], params, 0, [])}, hidden)
    assert "r" in steps._wanted
    steps.on_step(SchedulerOutput([], None, {}, 0, finished_req_ids={"r"}), InputBatch([], np.array([])), {}, hidden)
    assert "r" not in steps._wanted
