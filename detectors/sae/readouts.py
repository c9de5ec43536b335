"""Watched SAE features as engine readouts.

ReLU, JumpReLU and gated features depend only on their own pre-activation, so each is one
linear column of the fused readout matrix (gated: two), with b_dec and a constant input scale
folded into the column and its bias:

    pre_i = (s*x - b_dec) @ W[:, i] + b_i = x @ (s*W[:, i]) + (b_i - b_dec @ W[:, i])

TopK features are not sliceable (whether feature i is on depends on the k-th largest
pre-activation of all features), and per-token input norms are not linear: both run as one
`DeviceReadout` function with the exact encode on the model's device. The same function can
also return the top features of every token, for explanations.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch

from detectors.sae.model import SAE, SAEError
from monitor.types import AnyReadout, DeviceReadout, Readout

GATE, MAG = "gate", "mag"


def column_name(prefix: str, index: int, part: str = "") -> str:
    """Readout name of watched feature `index` (gated SAEs have a gate and a magnitude column)."""
    return f"{prefix}/{index}" + (f".{part}" if part else "")


def top_names(prefix: str, top: int) -> tuple[str, ...]:
    """Readout names of the top-`top` features of a token: index and activation per rank."""
    return tuple(name for j in range(top) for name in (f"{prefix}/top{j}", f"{prefix}/top{j}.act"))


def watched_readouts(sae: SAE, prefix: str, indices: Sequence[int], top: int = 0) -> list[AnyReadout]:
    """Readouts that give the activation of each watched feature (and the `top` features) per token."""
    if top and sae.d_sae > 2**24:
        raise SAEError(f"{sae.info.source}: top features are read out as float32 indices, exact only below 2**24 features")
    out: list[AnyReadout] = []
    sliced = list(indices) if sae.sliceable() else []
    encoded = [] if sae.sliceable() else list(indices)
    if sliced:
        out += _columns(sae, prefix, sliced)
    if encoded or top:  # one full encode per token feeds both the watched features and the top ones
        names = tuple(column_name(prefix, i) for i in encoded) + top_names(prefix, top)
        out.append(DeviceReadout(names, sae.info.layer, _encoder_fn(sae, encoded, top)))
    return out


def watched_values(sae: SAE, prefix: str, indices: Sequence[int], readouts: Mapping[str, float]) -> dict[int, float]:
    """Activation of each watched feature from a step's readouts (gated: gate x magnitude)."""
    values: dict[int, float] = {}
    for i in indices:
        if sae.arch == "gated" and sae.sliceable():
            gate, mag = readouts.get(column_name(prefix, i, GATE)), readouts.get(column_name(prefix, i, MAG))
            if gate is not None and mag is not None:
                values[i] = mag if gate > 0 else 0.0
        elif (value := readouts.get(column_name(prefix, i))) is not None:
            values[i] = value
    return values


def _columns(sae: SAE, prefix: str, indices: Sequence[int]) -> list[AnyReadout]:
    idx = torch.tensor(list(indices), dtype=torch.long)
    W = sae.W_enc[:, idx].double() * sae.input_scale  # [d_in, n]
    shift = (sae.b_dec.double() @ W) if sae.apply_b_dec else torch.zeros(len(indices), dtype=torch.float64)
    layer = sae.info.layer
    out: list[AnyReadout] = []
    for j, i in enumerate(indices):
        w = W[:, j]
        if sae.arch == "gated":
            assert sae.r_mag is not None and sae.b_mag is not None
            gain = float(torch.exp(sae.r_mag[i].double()))
            out.append(Readout(column_name(prefix, i, GATE), layer, _f32(w), float(sae.b_enc[i]) - float(shift[j])))
            out.append(
                Readout(column_name(prefix, i, MAG), layer, _f32(w * gain), float(sae.b_mag[i]) - gain * float(shift[j]), 0.0)
            )
            continue
        threshold = 0.0 if sae.threshold is None else max(0.0, float(sae.threshold[i]))
        out.append(Readout(column_name(prefix, i), layer, _f32(w), float(sae.b_enc[i]) - float(shift[j]), threshold))
    return out


def _f32(t: torch.Tensor) -> np.ndarray:
    return t.float().numpy().astype(np.float32)


def _encoder_fn(sae: SAE, indices: list[int], top: int) -> Callable[[object], Callable[[torch.Tensor], torch.Tensor]]:
    """A `DeviceReadout.build`: moves the encoder to the device once, returns the per-forward function."""

    def build(device: object) -> Callable[[torch.Tensor], torch.Tensor]:
        dev = torch.device(str(device))
        on_device = _to(sae, dev)
        idx = torch.tensor(indices, dtype=torch.long, device=dev)

        def fn(hidden: torch.Tensor) -> torch.Tensor:
            acts = on_device.encode(hidden)
            watched = acts.index_select(-1, idx)
            if not top:
                return watched
            values, index = torch.topk(acts, top, dim=-1)
            ranked = torch.stack([index.to(values.dtype), values], dim=-1).flatten(-2)  # idx0, act0, idx1, act1, ...
            return torch.cat([watched, ranked], dim=-1)

        return fn

    return build


def _to(sae: SAE, device: torch.device) -> SAE:
    def move(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.to(device)

    return dataclasses.replace(
        sae,
        W_enc=sae.W_enc.to(device),
        b_enc=sae.b_enc.to(device),
        b_dec=sae.b_dec.to(device),
        threshold=move(sae.threshold),
        r_mag=move(sae.r_mag),
        b_mag=move(sae.b_mag),
    )
