"""Where a GGUF model's dequantised cache is found: a read-only prebuilt folder first, when whole."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from monitor.engine import models
from monitor.engine.models import MANIFEST, dequantised, sha256_of

DIGEST = "ab" * 32


def write_cache(folder: Path, digest: str = DIGEST) -> Path:
    """A whole cache: one weights file and the manifest that lists it."""
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"weights")
    files = {"model.safetensors": sha256_of(folder / "model.safetensors")}
    (folder / MANIFEST).write_text(json.dumps({"gguf": "m.gguf", "gguf_sha256": digest, "files": files}))
    return folder


@pytest.fixture
def no_dequantising(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Records the folders the GGUF would be dequantised into, instead of loading it."""
    built: list[Path] = []

    def record(gguf: Path, out: Path) -> None:
        built.append(out)
        (out / "model.safetensors").write_bytes(b"rebuilt")

    monkeypatch.setattr(models, "_dequantise", record)
    return built


def test_a_whole_prebuilt_cache_is_used_and_nothing_is_written(tmp_path: Path, no_dequantising: list[Path]) -> None:
    prebuilt = tmp_path / "image" / "models"
    cache = write_cache(prebuilt / f"m-{DIGEST[:16]}")
    found = dequantised(tmp_path / "m.gguf", DIGEST, tmp_path / "data" / "models", [prebuilt])
    assert found == cache and not no_dequantising
    assert not (tmp_path / "data").exists()


def test_a_prebuilt_cache_that_is_not_whole_is_passed_over(tmp_path: Path, no_dequantising: list[Path]) -> None:
    prebuilt = tmp_path / "image" / "models"
    (write_cache(prebuilt / f"m-{DIGEST[:16]}") / "model.safetensors").write_bytes(b"changed")
    models_dir = tmp_path / "data" / "models"
    found = dequantised(tmp_path / "m.gguf", DIGEST, models_dir, [prebuilt])
    assert found == models_dir / f"m-{DIGEST[:16]}" and len(no_dequantising) == 1
    assert (found / "model.safetensors").read_bytes() == b"rebuilt"


def test_a_prebuilt_cache_of_another_file_is_passed_over(tmp_path: Path, no_dequantising: list[Path]) -> None:
    prebuilt = tmp_path / "image" / "models"
    write_cache(prebuilt / f"m-{DIGEST[:16]}", digest="cd" * 32)
    found = dequantised(tmp_path / "m.gguf", DIGEST, tmp_path / "data" / "models", [prebuilt])
    assert found.parent == tmp_path / "data" / "models" and len(no_dequantising) == 1
