"""Reading an SAE's files, and taking its tensors out of them checked (name, shape, finite values).

Every error names the file and the problem.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from detectors.sae.model import SAEError

Tensors = dict[str, torch.Tensor]


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise SAEError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SAEError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise SAEError(f"{path}: expected a JSON object")
    return data


def read_safetensors(path: Path) -> Tensors:
    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise SAEError(f"{path}: file not found") from None
    except (SafetensorError, OSError, ValueError) as exc:
        raise SAEError(f"{path}: not a readable safetensors file ({exc})") from None


def read_npz(path: Path) -> Tensors:
    try:
        with np.load(path, allow_pickle=False) as data:
            return {key: torch.from_numpy(np.asarray(data[key])) for key in data.files}
    except FileNotFoundError:
        raise SAEError(f"{path}: file not found") from None
    except (ValueError, OSError, zipfile.BadZipFile) as exc:
        raise SAEError(f"{path}: not a readable .npz file ({exc})") from None


def read_pickle(path: Path) -> Tensors:
    """A torch checkpoint, loaded with weights_only=True: tensors and plain containers, never code."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise SAEError(f"{path}: file not found") from None
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, ... for files it refuses
        raise SAEError(f"{path}: not a loadable weights-only torch checkpoint ({type(exc).__name__}: {exc})") from None
    if isinstance(data, Mapping) and isinstance(data.get("state_dict"), Mapping):
        data = data["state_dict"]
    if not isinstance(data, Mapping):
        raise SAEError(f"{path}: expected a state dict (a mapping of tensor names to tensors)")
    return {str(k): v for k, v in data.items() if isinstance(v, torch.Tensor)}


def take_tensor(tensors: Tensors, name: str, shape: tuple[int, ...], path: Path) -> torch.Tensor:
    if name not in tensors:
        raise SAEError(f"{path}: missing tensor {name!r} (has: {', '.join(sorted(tensors)) or 'none'})")
    t = tensors[name]
    if tuple(t.shape) != shape:
        raise SAEError(f"{path}: tensor {name!r} has shape {tuple(t.shape)}, expected {shape}")
    t = t.float()
    if not torch.isfinite(t).all():
        raise SAEError(f"{path}: tensor {name!r} has non-finite values")
    return t


def take_encoder(tensors: Tensors, name: str, path: Path, transposed: bool) -> torch.Tensor:
    """The encoder matrix as [d_in, d_sae]; `transposed` when the file stores [d_sae, d_in]."""
    if name not in tensors:
        raise SAEError(f"{path}: missing tensor {name!r} (has: {', '.join(sorted(tensors)) or 'none'})")
    t = tensors[name]
    if t.ndim != 2:
        raise SAEError(f"{path}: tensor {name!r} has shape {tuple(t.shape)}, expected a matrix")
    t = take_tensor(tensors, name, tuple(t.shape), path)
    return t.T.contiguous() if transposed else t
