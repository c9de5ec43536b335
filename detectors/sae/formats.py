"""Loaders from published SAE formats into the canonical `SAE` (see ../shared notes on formats).

| format          | files                                         | encoder           | b_dec subtracted |
|-----------------|-----------------------------------------------|-------------------|------------------|
| saelens         | cfg.json + sae_weights.safetensors            | W_enc [d_in,d_sae]| cfg (default yes)|
| gemma_scope     | params.npz (W_enc, b_enc, b_dec, threshold)   | W_enc             | no               |
| gemma_scope_2   | config.json + params.safetensors (lowercase)  | w_enc             | no               |
| sparsify        | cfg.json + sae.safetensors                    | encoder.weight.T  | always           |
| goodfire        | *.pt / *.pth (torch pickle, weights_only)     | encoder_linear.weight.T, or tied W | no |
| llama_scope_r1  | config.json + sae_weights.safetensors         | encoder.weight.T  | no               |

Every error names the file and the problem.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from detectors.sae.files import Tensors, read_json, read_npz, read_pickle, read_safetensors, take_encoder, take_tensor
from detectors.sae.model import ARCHS, INPUT_NORMS, SAE, Arch, InputNorm, SAEError, SAEInfo


class Overrides:
    """What a user may state about an SAE that its files do not say (detector args / CLI options)."""

    def __init__(
        self,
        layer: int | None = None,
        k: int | None = None,
        input_scale: float | None = None,
        neuronpedia: str | None = None,
    ):
        self.layer, self.k, self.input_scale, self.neuronpedia = layer, k, input_scale, neuronpedia


# -- layers ----------------------------------------------------------------------------------------


def layer_of_hook(hook: str, source: Path) -> int | None:
    """Decoder block read by a hook name; None when the name does not say."""
    if m := re.fullmatch(r"blocks\.(\d+)\.hook_resid_post", hook):
        return int(m.group(1))
    if m := re.fullmatch(r"blocks\.(\d+)\.hook_resid_pre", hook):
        if int(m.group(1)) == 0:
            raise SAEError(f"{source}: hook {hook!r} reads the embeddings; cotmon reads decoder-block outputs only")
        return int(m.group(1)) - 1
    if re.fullmatch(r"blocks\.\d+\..+", hook):
        raise SAEError(f"{source}: hook {hook!r} is not the residual stream; cotmon reads hook_resid_post/pre only")
    if m := re.fullmatch(r"(?:model\.)?layers\.(\d+)(?:\.output)?", hook):
        return int(m.group(1))
    return None


def _layer(candidates: list[int | None], overrides: Overrides, path: Path) -> int:
    if overrides.layer is not None:
        return overrides.layer
    for layer in candidates:
        if layer is not None:
            return layer
    raise SAEError(f"{path}: cannot tell which layer this SAE reads; give it (args.layer / --layer)")


def _layer_in_path(path: Path) -> int | None:
    """A layer named in the path: `layer_20`, else `L19R` / `-l19.pth` (never Gemma Scope's `average_l0_71`)."""
    for part in reversed(path.parts):
        if m := re.fullmatch(r"layer_(\d+)", part):
            return int(m.group(1))
    for part in reversed(path.parts):
        if re.fullmatch(r"average_l0_\d+", part):
            continue
        if m := re.search(r"(?:^|[_-])[Ll](\d+)[Rr]?(?:$|[._-])", part):
            return int(m.group(1))
    return None


# -- formats ---------------------------------------------------------------------------------------


def _load_saelens(folder: Path, ov: Overrides) -> SAE:
    cfg_path, weights_path = folder / "cfg.json", folder / "sae_weights.safetensors"
    cfg = read_json(cfg_path)
    meta = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
    assert isinstance(meta, dict)
    flat = {**meta, **cfg}  # pre-6.0 configs are flat; v6 keeps hook and model under metadata
    arch_name = flat.get("architecture")
    activation = flat.get("activation_fn_str", flat.get("activation_fn"))
    if arch_name is None:
        arch_name = "topk" if activation == "topk" else "standard"
    arch = {"standard": "relu", "jumprelu": "jumprelu", "gated": "gated", "topk": "topk"}.get(str(arch_name))
    if arch is None:
        raise SAEError(f"{cfg_path}: field 'architecture' is {arch_name!r}; supported: standard, jumprelu, gated, topk")
    for key in ("d_in", "d_sae"):
        if not isinstance(cfg.get(key), int) or cfg[key] < 1:
            raise SAEError(f"{cfg_path}: field {key!r} must be a positive integer, got {cfg.get(key)!r}")
    d_in, d_sae = int(cfg["d_in"]), int(cfg["d_sae"])
    norm = cfg.get("normalize_activations", "none")
    if norm is True:
        norm = "expected_average_only_in"
    elif norm in (False, None):
        norm = "none"
    tensors = read_safetensors(weights_path)
    scale = 1.0
    input_norm: InputNorm = "none"
    if norm == "expected_average_only_in":
        factor = ov.input_scale if ov.input_scale is not None else cfg.get("norm_scaling_factor")
        if not isinstance(factor, int | float) or isinstance(factor, bool) or factor <= 0:
            raise SAEError(
                f"{cfg_path}: normalize_activations is 'expected_average_only_in' but no norm_scaling_factor is "
                "given; set args.input_scale (the release's norm_scaling_factor in SAELens' pretrained_saes.yaml)"
            )
        scale = float(factor)
    elif norm in INPUT_NORMS:
        input_norm = norm
    else:
        raise SAEError(
            f"{cfg_path}: field 'normalize_activations' is {norm!r}; supported: none, expected_average_only_in, "
            "constant_norm_rescale, layer_norm"
        )
    W_enc = take_tensor(tensors, "W_enc", (d_in, d_sae), weights_path)
    b_dec = take_tensor(tensors, "b_dec", (d_in,), weights_path)
    threshold = r_mag = b_mag = None
    k = None
    if arch == "gated":
        b_enc = take_tensor(tensors, "b_gate", (d_sae,), weights_path)
        r_mag = take_tensor(tensors, "r_mag", (d_sae,), weights_path)
        b_mag = take_tensor(tensors, "b_mag", (d_sae,), weights_path)
    else:
        b_enc = take_tensor(tensors, "b_enc", (d_sae,), weights_path)
    if arch == "jumprelu":
        if "threshold" in tensors:
            threshold = take_tensor(tensors, "threshold", (d_sae,), weights_path)
        else:
            threshold = torch.exp(take_tensor(tensors, "log_threshold", (d_sae,), weights_path))
    if arch == "topk":
        kwargs = flat.get("activation_fn_kwargs") if isinstance(flat.get("activation_fn_kwargs"), dict) else {}
        assert isinstance(kwargs, dict)
        k = _k(ov.k if ov.k is not None else flat.get("k", kwargs.get("k", 100)), d_sae, cfg_path)
        if flat.get("rescale_acts_by_decoder_norm"):
            # Rank and report pre * ||W_dec_i||: fold the norms into the encoder (exact).
            norms = take_tensor(tensors, "W_dec", (d_sae, d_in), weights_path).norm(dim=-1)
            W_enc, b_enc = W_enc * norms, b_enc * norms
    if "scaling_factor" in tensors:
        factor_t = take_tensor(tensors, "scaling_factor", (d_sae,), weights_path)
        if not torch.all(factor_t == 1):
            raise SAEError(f"{weights_path}: a legacy 'scaling_factor' other than ones is not supported")
    hook = str(flat.get("hook_name", flat.get("hook_point", "")))
    hook_layer = flat.get("hook_layer") if isinstance(flat.get("hook_layer"), int) else None
    layer = _layer([layer_of_hook(hook, cfg_path), hook_layer], ov, cfg_path)
    apply_b_dec = bool(cfg.get("apply_b_dec_to_input", True))
    info = SAEInfo(str(folder), "saelens", layer, hook, str(flat.get("model_name", "")), _np_id(ov, flat.get("neuronpedia_id")))
    return SAE(info, arch, W_enc, b_enc, b_dec, apply_b_dec, threshold, k, r_mag, b_mag, scale, input_norm)


def _k(value: Any, d_sae: int, source: Path) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= d_sae:
        raise SAEError(f"{source}: k must be an integer in 1..{d_sae}, got {value!r}")
    return value


def _np_id(ov: Overrides, found: Any) -> str:
    return ov.neuronpedia or (str(found) if found else "")


def _jumprelu_params(tensors: Tensors, path: Path, lower: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    names = ("w_enc", "b_enc", "b_dec", "threshold") if lower else ("W_enc", "b_enc", "b_dec", "threshold")
    W_enc = take_encoder(tensors, names[0], path, transposed=False)
    d_in, d_sae = W_enc.shape
    return (
        W_enc,
        take_tensor(tensors, names[1], (d_sae,), path),
        take_tensor(tensors, names[2], (d_in,), path),
        take_tensor(tensors, names[3], (d_sae,), path),
    )


def _load_gemma_scope(file: Path, ov: Overrides) -> SAE:
    tensors = read_npz(file)
    W_enc, b_enc, b_dec, threshold = _jumprelu_params(tensors, file, lower=False)
    layer = _layer([_layer_in_path(file.parent)], ov, file)
    info = SAEInfo(str(file), "gemma_scope", layer, "", "", _np_id(ov, None))
    return SAE(info, "jumprelu", W_enc, b_enc, b_dec, False, threshold)


def _load_gemma_scope_2(folder: Path, ov: Overrides) -> SAE:
    cfg_path, weights_path = folder / "config.json", folder / "params.safetensors"
    cfg = read_json(cfg_path)
    if cfg.get("architecture", "jump_relu") != "jump_relu":
        raise SAEError(f"{cfg_path}: field 'architecture' is {cfg.get('architecture')!r}; expected 'jump_relu'")
    tensors = read_safetensors(weights_path)
    if "affine_skip_connection" in tensors:
        raise SAEError(f"{weights_path}: a transcoder (affine_skip_connection), not a residual-stream SAE")
    W_enc, b_enc, b_dec, threshold = _jumprelu_params(tensors, weights_path, lower=True)
    hook = str(cfg.get("hf_hook_point_in", ""))
    layer = _layer([layer_of_hook(hook, cfg_path), _layer_in_path(folder)], ov, cfg_path)
    info = SAEInfo(str(folder), "gemma_scope_2", layer, hook, str(cfg.get("model_name", "")), _np_id(ov, None))
    return SAE(info, "jumprelu", W_enc, b_enc, b_dec, False, threshold)


def _load_sparsify(folder: Path, ov: Overrides) -> SAE:
    cfg_path, weights_path = folder / "cfg.json", folder / "sae.safetensors"
    cfg = read_json(cfg_path)
    if cfg.get("activation", "topk") != "topk":
        raise SAEError(f"{cfg_path}: field 'activation' is {cfg.get('activation')!r}; supported: topk")
    for key in ("transcode", "skip_connection"):
        if cfg.get(key):
            raise SAEError(f"{cfg_path}: field {key!r} is set; cotmon reads residual-stream SAEs, not transcoders")
    tensors = read_safetensors(weights_path)
    W_enc = take_encoder(tensors, "encoder.weight", weights_path, transposed=True)
    d_in, d_sae = W_enc.shape
    if isinstance(cfg.get("d_in"), int) and cfg["d_in"] != d_in:
        raise SAEError(f"{weights_path}: tensor 'encoder.weight' reads {d_in} inputs but {cfg_path.name} says d_in {cfg['d_in']}")
    b_enc = take_tensor(tensors, "encoder.bias", (d_sae,), weights_path)
    b_dec = take_tensor(tensors, "b_dec", (d_in,), weights_path)
    k = _k(ov.k if ov.k is not None else cfg.get("k", 32), d_sae, cfg_path)
    layer = _layer([layer_of_hook(folder.name, cfg_path)], ov, cfg_path)
    info = SAEInfo(str(folder), "sparsify", layer, folder.name, "", _np_id(ov, None))
    return SAE(info, "topk", W_enc, b_enc, b_dec, True, k=k)


def _load_goodfire(file: Path, ov: Overrides) -> SAE:
    tensors = read_pickle(file)
    layer = _layer([_layer_in_path(file)], ov, file)
    info = SAEInfo(str(file), "goodfire", layer, f"blocks.{layer}.hook_resid_post", "", _np_id(ov, None))
    if "W" in tensors:  # DeepSeek-R1 SAEs: tied weights, BatchTopK, applied per token here
        W = take_encoder(tensors, "W", file, transposed=False)
        d_in, d_sae = W.shape
        if ov.k is None:
            raise SAEError(f"{file}: a tied TopK checkpoint does not record k; give it (args.k: 64 for logic, 128 for math)")
        b_enc, b_dec = take_tensor(tensors, "b_enc", (d_sae,), file), take_tensor(tensors, "b_dec", (d_in,), file)
        return SAE(info, "topk", W, b_enc, b_dec, False, k=_k(ov.k, d_sae, file))
    W_enc = take_encoder(tensors, "encoder_linear.weight", file, transposed=True)
    d_in, d_sae = W_enc.shape
    b_enc = take_tensor(tensors, "encoder_linear.bias", (d_sae,), file)
    b_dec = take_tensor(tensors, "decoder_linear.bias", (d_in,), file)
    return SAE(info, "relu", W_enc, b_enc, b_dec, False)


def _load_llama_scope_r1(folder: Path, ov: Overrides) -> SAE:
    cfg_path, weights_path = folder / "config.json", folder / "sae_weights.safetensors"
    cfg = read_json(cfg_path)
    tensors = read_safetensors(weights_path)
    W_enc = take_encoder(tensors, "encoder.weight", weights_path, transposed=True)
    d_in, d_sae = W_enc.shape
    if isinstance(cfg.get("d_model"), int) and cfg["d_model"] != d_in:
        raise SAEError(
            f"{weights_path}: tensor 'encoder.weight' reads {d_in} inputs but {cfg_path.name} says d_model {cfg['d_model']}"
        )
    b_enc = take_tensor(tensors, "encoder.bias", (d_sae,), weights_path)
    b_dec = take_tensor(tensors, "decoder.bias", (d_in,), weights_path)
    threshold = torch.exp(take_tensor(tensors, "log_jumprelu_threshold", (d_sae,), weights_path))
    scale = ov.input_scale
    norms = cfg.get("dataset_average_activation_norm")
    if scale is None and isinstance(norms, dict) and isinstance(norms.get("in"), int | float) and norms["in"] > 0:
        scale = math.sqrt(d_in) / float(norms["in"])
    if scale is None:
        raise SAEError(
            f"{cfg_path}: Llama Scope SAEs scale their input by a dataset norm factor that the folder does not record; "
            "set args.input_scale (norm_scaling_factor in SAELens' pretrained_saes.yaml, e.g. 3.8187 for L19)"
        )
    hook = str(cfg.get("hook_point_in", ""))
    layer = _layer([layer_of_hook(hook, cfg_path), _layer_in_path(folder)], ov, cfg_path)
    info = SAEInfo(str(folder), "llama_scope_r1", layer, hook, "deepseek-ai/DeepSeek-R1-Distill-Llama-8B", _np_id(ov, None))
    return SAE(info, "jumprelu", W_enc, b_enc, b_dec, False, threshold, input_scale=scale)


Loader = Callable[[Path, Overrides], SAE]
FORMATS: dict[str, Loader] = {
    "saelens": _load_saelens,
    "gemma_scope": _load_gemma_scope,
    "gemma_scope_2": _load_gemma_scope_2,
    "sparsify": _load_sparsify,
    "goodfire": _load_goodfire,
    "llama_scope_r1": _load_llama_scope_r1,
}


def detect_format(path: Path) -> tuple[str, Path]:
    """(format, the path its loader takes) for a folder or file, by the files present."""
    if not path.exists():
        raise SAEError(f"{path}: no such file or folder")
    if path.is_file():
        if path.suffix == ".npz":
            return "gemma_scope", path
        if path.suffix in (".pt", ".pth"):
            return "goodfire", path
        if path.name in ("sae_weights.safetensors", "sae.safetensors", "params.safetensors", "cfg.json", "config.json"):
            return detect_format(path.parent)
        raise SAEError(f"{path}: not a known SAE file (.npz, .pt/.pth, or a folder with cfg.json/config.json)")
    has = {p.name for p in path.iterdir()}
    if {"cfg.json", "sae_weights.safetensors"} <= has:
        return "saelens", path
    if {"cfg.json", "sae.safetensors"} <= has:
        return "sparsify", path
    if {"config.json", "params.safetensors"} <= has:
        return "gemma_scope_2", path
    if {"config.json", "sae_weights.safetensors"} <= has:
        return "llama_scope_r1", path
    if "params.npz" in has:
        return "gemma_scope", path / "params.npz"
    pickles = sorted(p for p in path.iterdir() if p.suffix in (".pt", ".pth"))
    if len(pickles) == 1:
        return "goodfire", pickles[0]
    raise SAEError(
        f"{path}: not a known SAE folder (expected cfg.json + sae_weights.safetensors, cfg.json + sae.safetensors, "
        "config.json + params.safetensors, config.json + sae_weights.safetensors, params.npz, or one .pt/.pth)"
    )


def load_sae(path: str | Path, fmt: str = "auto", overrides: Overrides | None = None) -> SAE:
    """Load any supported SAE into canonical form; `fmt` forces a format."""
    ov = overrides or Overrides()
    p = Path(path)
    if fmt == "auto":
        fmt, p = detect_format(p)
    elif fmt not in FORMATS:
        raise SAEError(f"{path}: unknown SAE format {fmt!r} (known: auto, {', '.join(FORMATS)})")
    elif fmt == "gemma_scope" and p.is_dir():
        p = p / "params.npz"
    sae = FORMATS[fmt](p, ov)
    assert sae.arch in ARCHS
    return sae


__all__ = ["FORMATS", "Arch", "Overrides", "detect_format", "layer_of_hook", "load_sae"]
