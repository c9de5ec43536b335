"""The judge's answer read tolerantly into per-category verdicts, within `AnswerBounds`.

A broken or hostile judge may send anything: every value is checked, clamped or cut.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class AnswerBounds:
    """How much of the judge's answer is read and kept: a broken or hostile judge may send anything."""

    response_bytes: int = 256 * 1024
    """Bytes of one response body read at most (after decompression); a longer body is not read on
    and fails the call as ``response_too_large``, without a retry."""
    quotes: int = 8
    """Quotes kept per verdict (the prompt asks for up to 3); later ones are ignored."""
    quote_chars: int = 500
    """Characters kept of each quote: its start, which is verbatim in the CoT if the whole is."""
    rationale_chars: int = 1000
    """Characters kept of each rationale; a longer one is cut and ends in an ellipsis."""


DEFAULT_BOUNDS = AnswerBounds()


@dataclass(frozen=True)
class CategoryVerdict:
    category: str
    score: float
    """In [0, 1]; after `verify_quotes`, scaled by the share of the judge's quotes found in the CoT."""
    rationale: str
    quotes: tuple[str, ...]
    """Passages of the CoT; after `verify_quotes`, each one occurs verbatim in it."""
    unverified_quotes: int = 0
    """Quotes the judge gave for this verdict that `verify_quotes` did not find in the CoT."""


_MAX_CANDIDATES = 200
"""JSON values tried per answer: bounds the work on long garbage full of braces."""


def parse_verdict(text: str, categories: Sequence[str], bounds: AnswerBounds = DEFAULT_BOUNDS) -> tuple[CategoryVerdict, ...]:
    """Read the judge's verdicts out of its answer, tolerantly.

    Accepts the schema's ``{"verdicts": [...]}``, a bare list of verdicts, or a mapping
    ``{category: {score, rationale, quotes}}`` (or ``{category: score}``), alone or wrapped in
    code fences or prose, after a ``<think>...</think>`` prefix. The first JSON value that yields
    a verdict wins. Scores are clamped to [0, 1] and numeric strings coerced; unknown categories
    are dropped, the first verdict of a repeated category kept, missing categories left absent.
    Quotes and rationales are cut to `bounds` (count and length).

    Raises:
        ValueError: no verdict for any known category (an empty verdict list included: the judge
            was asked for one per category, and an empty answer is what an injected judge gives).
    """
    _, think, answer = text.rpartition("</think>")
    known = {_key(c): c for c in categories}
    for value in _json_values(answer if think else text):
        verdicts = _verdicts(value, known, bounds)
        if verdicts:
            return verdicts
    raise ValueError("no usable verdict in the judge's answer")


def _json_values(text: str) -> Iterator[Any]:
    """Every JSON object or array in the text, in order, skipping over the inside of parsed ones."""
    decoder = json.JSONDecoder()
    i, tried = 0, 0
    while tried < _MAX_CANDIDATES:
        starts = [p for p in (text.find("{", i), text.find("[", i)) if p >= 0]
        if not starts:
            return
        start = min(starts)
        tried += 1
        try:
            value, end = decoder.raw_decode(text, start)
        except ValueError:
            i = start + 1
            continue
        yield value
        i = end


def _key(category: str) -> str:
    return re.sub(r"[\s-]+", "_", category.strip().lower())


def _verdicts(value: Any, known: Mapping[str, str], bounds: AnswerBounds) -> tuple[CategoryVerdict, ...]:
    if isinstance(value, dict) and "verdicts" in value:
        value = value["verdicts"]
    items: list[tuple[Any, Any]] = []
    if isinstance(value, list):
        items = [(v.get("category"), v) for v in value if isinstance(v, dict)]
    elif isinstance(value, dict):
        items = list(value.items())
    found: dict[str, CategoryVerdict] = {}
    for name, raw in items:
        category = known.get(_key(name)) if isinstance(name, str) else None
        verdict = _verdict(category, raw, bounds) if category and category not in found else None
        if verdict is not None:
            found[verdict.category] = verdict
    return tuple(found.values())


def _verdict(category: str, raw: Any, bounds: AnswerBounds) -> CategoryVerdict | None:
    fields = raw if isinstance(raw, dict) else {"score": raw}
    score = _score(fields.get("score"))
    if score is None:
        return None
    quotes = fields.get("quotes") or []
    if isinstance(quotes, str):
        quotes = [quotes]
    quotes = [q[: bounds.quote_chars] for q in quotes if isinstance(q, str)] if isinstance(quotes, list) else []
    rationale = fields.get("rationale")
    rationale = rationale if isinstance(rationale, str) else ""
    if len(rationale) > bounds.rationale_chars:
        rationale = rationale[: bounds.rationale_chars - 1] + "…"
    return CategoryVerdict(category=category, score=score, rationale=rationale, quotes=tuple(quotes[: bounds.quotes]))


def _score(raw: Any) -> float | None:
    if isinstance(raw, bool):
        return None
    if isinstance(raw, str):
        text = raw.strip()
        try:
            raw = float(text.removesuffix("%")) / 100 if text.endswith("%") else float(text)
        except ValueError:
            return None
    if not isinstance(raw, int | float) or not math.isfinite(raw):
        return None
    return min(max(float(raw), 0.0), 1.0)
