"""The canonical in-memory SAE every on-disk format is converted to, and its encode.

Row-vector convention (SAELens): for a residual-stream vector x [d_in],

    x'  = input_norm(x) * input_scale            # per-token norm (rare), constant dataset scale
    x_c = x' - b_dec   if apply_b_dec  else  x'
    pre = x_c @ W_enc + b_enc                    # [d_sae]

    relu      f = ReLU(pre)
    jumprelu  f = ReLU(pre) * 1[pre > threshold]
    gated     f = 1[x_c @ W_enc + b_gate > 0] * ReLU(x_c @ (W_enc * exp(r_mag)) + b_mag)
    topk      f = ReLU of the k largest entries of pre, 0 elsewhere

Only the encoder is kept: monitoring never decodes, and W_dec would double the memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch

from monitor.detector import DetectorError

Arch = Literal["relu", "jumprelu", "gated", "topk"]
InputNorm = Literal["none", "constant_norm_rescale", "layer_norm"]
ARCHS: tuple[Arch, ...] = ("relu", "jumprelu", "gated", "topk")
INPUT_NORMS: tuple[InputNorm, ...] = ("none", "constant_norm_rescale", "layer_norm")
LAYER_NORM_EPS = 1e-5


class SAEError(DetectorError):
    """An SAE file that is malformed, or that does not fit the model or the watch list."""


@dataclass(frozen=True)
class SAEInfo:
    """Where an SAE came from and what it reads."""

    source: str
    """The file or folder it was loaded from; errors name it."""
    format: str
    """On-disk format: saelens, gemma_scope, gemma_scope_2, sparsify, goodfire, llama_scope_r1."""
    layer: int
    """Decoder block whose output it reads (`blocks.L.hook_resid_post`)."""
    hook: str = ""
    """The hook name as the file gives it."""
    model_name: str = ""
    """The model it was trained on, as the file names it ('' when unknown)."""
    neuronpedia: str = ""
    """Neuronpedia `modelId/sourceId`, when known (cfg metadata or the detector's args)."""


@dataclass(frozen=True)
class SAE:
    """One SAE encoder in canonical form (float32 tensors on the host)."""

    info: SAEInfo
    arch: Arch
    W_enc: torch.Tensor  # [d_in, d_sae]
    b_enc: torch.Tensor  # [d_sae]; for gated: b_gate
    b_dec: torch.Tensor  # [d_in]
    apply_b_dec: bool
    threshold: torch.Tensor | None = None  # [d_sae], jumprelu
    k: int | None = None  # topk
    r_mag: torch.Tensor | None = None  # [d_sae], gated
    b_mag: torch.Tensor | None = None  # [d_sae], gated
    input_scale: float = 1.0
    input_norm: InputNorm = "none"
    labels: dict[int, str] = field(default_factory=dict)

    @property
    def d_in(self) -> int:
        return int(self.W_enc.shape[0])

    @property
    def d_sae(self) -> int:
        return int(self.W_enc.shape[1])

    def sliceable(self) -> bool:
        """Whether a watched feature is exactly one linear column (plus threshold): not TopK, no per-token norm."""
        return self.arch != "topk" and self.input_norm == "none"

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Feature activations [..., d_sae] for residual-stream vectors [..., d_in] (float32)."""
        x_c = self.centred(x)
        dots = x_c @ self.W_enc
        if self.arch == "gated":  # x_c @ (W_enc * exp(r_mag)) = dots * exp(r_mag), without a copy of W_enc
            assert self.r_mag is not None and self.b_mag is not None
            mag = torch.relu(dots * torch.exp(self.r_mag) + self.b_mag)
            return torch.where(dots + self.b_enc > 0, mag, torch.zeros_like(mag))
        pre = dots + self.b_enc
        return activate(pre, self.arch, self.threshold, self.k)

    def centred(self, x: torch.Tensor) -> torch.Tensor:
        """x_c: the input after normalisation, scaling and the optional b_dec subtraction."""
        x = normalise(x.float(), self.input_norm) * self.input_scale
        return x - self.b_dec if self.apply_b_dec else x


def normalise(x: torch.Tensor, mode: InputNorm) -> torch.Tensor:
    """SAELens' per-token input normalisation (`normalize_activations`)."""
    if mode == "constant_norm_rescale":
        return x * (math.sqrt(x.shape[-1]) / x.norm(dim=-1, keepdim=True))
    if mode == "layer_norm":
        x = x - x.mean(dim=-1, keepdim=True)
        return x / (x.std(dim=-1, keepdim=True) + LAYER_NORM_EPS)
    return x


def activate(pre: torch.Tensor, arch: Arch, threshold: torch.Tensor | None, k: int | None) -> torch.Tensor:
    """Activation function of a non-gated SAE applied to pre-activations [..., n]."""
    if arch == "relu":
        return torch.relu(pre)
    if arch == "jumprelu":
        assert threshold is not None
        return torch.where(pre > threshold, torch.relu(pre), torch.zeros_like(pre))
    assert k is not None
    values, indices = torch.topk(pre, k, dim=-1)
    return torch.zeros_like(pre).scatter(-1, indices, torch.relu(values))
