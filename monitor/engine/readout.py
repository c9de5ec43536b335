"""Fused on-device readouts: every readout of a layer in one matrix, computed in a forward hook.

Probe directions and watched SAE encoder columns are all linear maps of the residual stream.
At start-up they are compiled per layer into ``W[d_model, n]`` plus a bias and an optional
JumpReLU threshold, on the model's device, in fp32. The hook computes ``h @ W + b`` for every
position of every forward; only the ``n`` numbers per token ever leave the device. What is not
linear (TopK SAE features, full encodes for explanations) comes as `DeviceReadout` functions
that run in the same hook on the same hidden states.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

from monitor.types import AnyReadout, DeviceReadout, Readout


class ReadoutError(ValueError):
    """Readouts that cannot be compiled for this model."""


DeviceFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class LayerReadout:
    """All readouts of one layer: the linear columns fused, then any device functions."""

    layer: int
    weight: torch.Tensor | None  # [n, d_model] fp32 on the model's device (rows: F.linear's layout); None: no linear column
    bias: torch.Tensor | None  # [n] fp32
    threshold: torch.Tensor | None  # [n] fp32, -inf where a column has none; None if no column has one
    functions: tuple[DeviceFn, ...] = ()  # DeviceReadout functions, output columns after the linear ones


class ReadoutPlan:
    """Readouts compiled into one fused matrix per layer; `names` orders the output columns.

    Linear `Readout`s of a layer become one matrix; `DeviceReadout`s of the layer run after it,
    on the same hidden states, and their columns follow in the order given.
    """

    def __init__(self, readouts: Sequence[AnyReadout], *, d_model: int, n_layers: int, device: torch.device | str = "cpu"):
        seen: set[str] = set()
        for r in readouts:
            for name in _names(r):
                if name in seen:
                    raise ReadoutError(f"two readouts are named {name!r}")
                seen.add(name)
            if not 0 <= r.layer < n_layers:
                raise ReadoutError(
                    f"readout {_names(r)[0]!r}: layer {r.layer} does not exist (model has layers 0..{n_layers - 1})"
                )
            if isinstance(r, Readout) and tuple(r.weight.shape) != (d_model,):
                raise ReadoutError(f"readout {r.name!r}: weight has shape {tuple(r.weight.shape)}, model needs ({d_model},)")
        self.d_model = d_model
        dev = torch.device(device)
        by_layer: dict[int, list[AnyReadout]] = {}
        for r in readouts:
            by_layer.setdefault(r.layer, []).append(r)
        layers, names = [], []
        for layer in sorted(by_layer):
            linear = [r for r in by_layer[layer] if isinstance(r, Readout)]
            device_side = [r for r in by_layer[layer] if isinstance(r, DeviceReadout)]
            layers.append(_fuse(layer, linear, tuple(r.build(dev) for r in device_side), dev))
            names += [r.name for r in linear] + [n for r in device_side for n in r.names]
        self.layers: tuple[LayerReadout, ...] = tuple(layers)
        self.names: tuple[str, ...] = tuple(names)

    def __len__(self) -> int:
        return len(self.names)

    def apply(self, hidden: torch.Tensor, layer_index: int) -> torch.Tensor:
        """Readout values of `self.layers[layer_index]` for hidden states [..., d_model] -> [..., n]."""
        lr = self.layers[layer_index]
        h = hidden.float()
        parts = []
        if lr.weight is not None:
            values = F.linear(h, lr.weight, lr.bias)  # one fused op: h @ W + b
            if lr.threshold is not None:
                values = torch.where(values > lr.threshold, values, torch.zeros_like(values))
            parts.append(values)
        parts += [fn(h) for fn in lr.functions]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)


def _names(r: AnyReadout) -> tuple[str, ...]:
    return (r.name,) if isinstance(r, Readout) else r.names


def _fuse(layer: int, readouts: list[Readout], functions: tuple[DeviceFn, ...], device: torch.device) -> LayerReadout:
    if not readouts:
        return LayerReadout(layer, None, None, None, functions)
    weight = torch.stack([torch.as_tensor(r.weight, dtype=torch.float32) for r in readouts], dim=0)
    bias = torch.tensor([r.bias for r in readouts], dtype=torch.float32)
    threshold = None
    if any(r.threshold is not None for r in readouts):
        threshold = torch.tensor([-math.inf if r.threshold is None else r.threshold for r in readouts], dtype=torch.float32).to(
            device
        )
    return LayerReadout(layer, weight.to(device).contiguous(), bias.to(device), threshold, functions)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a transformers causal LM (`model.model.layers` and its kin)."""
    for path in ("model.layers", "model.language_model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers"):
        obj: Any = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList):
            return obj
    n_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == n_layers:
            return module
    raise ReadoutError(f"cannot find the decoder layers of {type(model).__name__}")


def _hidden_of(output: Any) -> torch.Tensor:
    # transformers 5 decoder layers return a Tensor, 4.x a tuple whose first item is the stream.
    return output[0] if isinstance(output, tuple) else output  # type: ignore[no-any-return]


HookFn = Callable[[nn.Module, Any, Any], None]


class _LayerHooks(ABC):
    """Forward hooks on some decoder layers, registered on enter and removed on exit."""

    def __init__(self, layers: nn.ModuleList):
        self._modules = layers
        self._handles: list[RemovableHandle] = []

    @abstractmethod
    def _hooks(self) -> Iterable[tuple[int, HookFn]]:
        """(layer index, hook) pairs to register."""

    def __enter__(self) -> Self:
        for layer, hook in self._hooks():
            if not 0 <= layer < len(self._modules):
                raise ReadoutError(f"layer {layer} does not exist (model has layers 0..{len(self._modules) - 1})")
            self._handles.append(self._modules[layer].register_forward_hook(hook))
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


class ReadoutHooks(_LayerHooks):
    """Forward hooks that compute a plan's readouts on every forward of the model.

    Use as a context manager; after each forward, `collect()` returns [batch, seq, n] on the host.
    """

    def __init__(self, layers: nn.ModuleList, plan: ReadoutPlan):
        super().__init__(layers)
        self._plan = plan
        self._values: list[torch.Tensor | None] = [None] * len(plan.layers)
        self.stop = False
        """Raise `CaptureDone` once the highest hooked layer ran: a forward that wants only the
        readouts (teacher-forcing) skips the layers above it and the output head."""

    def _hooks(self) -> Iterable[tuple[int, HookFn]]:
        plan, values = self._plan, self._values
        last = max(lr.layer for lr in plan.layers)
        for i, lr in enumerate(plan.layers):

            def hook(module: nn.Module, args: Any, output: Any, i: int = i, top: bool = lr.layer == last) -> None:
                values[i] = plan.apply(_hidden_of(output), i)  # forwards run under inference_mode
                if top and self.stop:
                    raise CaptureDone

            yield lr.layer, hook

    def collect(self) -> torch.Tensor:
        """Values of the last forward, [batch, seq, n] fp32 on the host (one transfer)."""
        if not self._values:
            raise ReadoutError("no readouts are installed")
        parts = [v for v in self._values if v is not None]
        if len(parts) != len(self._values):
            raise ReadoutError("a hooked layer did not run in the last forward")
        out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
        self._values[:] = [None] * len(self._values)
        return out.cpu()


class CaptureDone(Exception):
    """Raised by an `ActivationCapture(stop=True)` once the last wanted layer ran: the layers above
    it are not computed (the caller catches it; the forward's output and KV cache are then partial)."""


class ActivationCapture(_LayerHooks):
    """Forward hooks that keep raw residual-stream activations of chosen layers (probe training)."""

    def __init__(self, layers: nn.ModuleList, wanted: Sequence[int], *, stop: bool = False):
        super().__init__(layers)
        self.wanted = tuple(wanted)
        self.stop = stop
        self.activations: dict[int, torch.Tensor] = {}

    def _hooks(self) -> Iterable[tuple[int, HookFn]]:
        last = max(self.wanted, default=-1)
        for layer in self.wanted:

            def hook(module: nn.Module, args: Any, output: Any, layer: int = layer) -> None:
                self.activations[layer] = _hidden_of(output).float().cpu()
                if self.stop and layer == last:
                    raise CaptureDone

            yield layer, hook
