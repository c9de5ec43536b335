"""What the viewer shows, computed from a stored transcript: per-token scores and shades, the
judge's quotes located in the CoT, evidence grouped for reading. Plain data; the templates escape it."""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from monitor.policy import PolicyError, parse_policy
from monitor.policy.model import conditions_of
from monitor.types import Detection, EvidenceKind, Transcript

SHADES = 10
"""Shade levels above 0; CSS classes s0 (no shade) .. s10 (strongest)."""


@dataclass(frozen=True)
class TokenView:
    """One token as the viewer draws it."""

    index: int
    text: str
    score: float | None
    """Max score of the chosen detector's detections covering the token; None when none covers it."""
    shade: int
    """0 .. SHADES, proportional to the score."""
    quoted: bool
    """Part of a passage the judge quoted."""
    flagged: bool
    """A rule fired at this token."""


@dataclass(frozen=True)
class EvidenceView:
    """One distinct piece of evidence, with the strongest detection that carried it."""

    detector: str
    kind: EvidenceKind
    category: str
    label: str
    detail: str
    quotes: tuple[str, ...]
    score: float
    start: int
    end: int
    count: int
    """How many detections carried this same evidence."""


def token_scores(n_tokens: int, detections: Iterable[Detection], detector: str) -> list[float | None]:
    """Per token: the max score of `detector`'s detections whose [start, end) covers it, else None."""
    scores: list[float | None] = [None] * n_tokens
    for d in detections:
        if d.detector != detector:
            continue
        for i in range(max(d.start, 0), min(d.end, n_tokens)):
            current = scores[i]
            scores[i] = d.score if current is None else max(current, d.score)
    return scores


def shade(score: float | None) -> int:
    """The shade level of a score in [0, 1] (clamped); 0 for no score."""
    if score is None or score != score:  # NaN shades nothing
        return 0
    return round(min(max(score, 0.0), 1.0) * SHADES)


def quote_marks(texts: Sequence[str], quotes: Iterable[str]) -> list[bool]:
    """Per token text: whether it overlaps an occurrence of any quote in the concatenated text."""
    whole = "".join(texts)
    covered = [0] * (len(whole) + 1)  # difference array over characters
    for quote in {q for q in quotes if q.strip()}:
        at = whole.find(quote)
        while at >= 0:
            covered[at] += 1
            covered[at + len(quote)] -= 1
            at = whole.find(quote, at + 1)
    inside, running = [], 0
    for delta in covered[:-1]:
        running += delta
        inside.append(running > 0)
    marks, offset = [], 0
    for text in texts:
        marks.append(any(inside[offset : offset + len(text)]))
        offset += len(text)
    return marks


def rule_detectors(policy: Mapping[str, Any], rule: str) -> list[str]:
    """Detectors a stored policy's rule reads, in the order its conditions name them."""
    try:
        rules = parse_policy(dict(policy), "<stored policy>").rules
    except PolicyError:
        return []
    found = next((r for r in rules if r.name == rule), None)
    return list(dict.fromkeys(c.detector for c in conditions_of(found.when))) if found else []


def detector_names(t: Transcript) -> list[str]:
    """The session's detectors: its specs, then any other detector that left detections."""
    names = [s.name for s in t.detector_specs]
    return names + list(dict.fromkeys(d.detector for d in t.detections if d.detector not in names))


def default_detector(t: Transcript) -> str | None:
    """The detector that raised the first flag, else the first with detections, else the first one."""
    with_detections = {d.detector for d in t.detections}
    if t.flags:
        readers = rule_detectors(t.policy, t.flags[0].rule)
        for name in readers:
            if name in with_detections:
                return name
        if readers:
            return readers[0]
    names = detector_names(t)
    return next((n for n in names if n in with_detections), names[0] if names else None)


def judge_quotes(t: Transcript) -> list[str]:
    return [q for d in t.detections for e in d.evidence if e.kind == "judge" for q in e.quotes]


def token_views(t: Transcript, detector: str | None) -> tuple[list[TokenView], list[TokenView]]:
    """The reasoning tokens and the answer tokens, scored by `detector`."""
    scores = token_scores(len(t.steps), t.detections, detector) if detector else [None] * len(t.steps)
    reasoning = [s for s in t.steps if s.channel == "reasoning"]
    quoted = dict(zip((s.index for s in reasoning), quote_marks([s.text for s in reasoning], judge_quotes(t)), strict=True))
    flagged = {f.index for f in t.flags}
    views = [
        TokenView(s.index, s.text, score, shade(score), quoted.get(s.index, False), s.index in flagged)
        for s, score in zip(t.steps, scores, strict=True)
    ]
    return [v for v, s in zip(views, t.steps, strict=True) if s.channel == "reasoning"], [
        v for v, s in zip(views, t.steps, strict=True) if s.channel == "answer"
    ]


def evidence_views(t: Transcript) -> list[EvidenceView]:
    """Every distinct (detector, label, detail, quotes), with its strongest detection and a count."""
    seen: dict[tuple[str, str, str, tuple[str, ...]], EvidenceView] = {}
    for d in t.detections:
        for e in d.evidence:
            key = (d.detector, e.label, e.detail, e.quotes)
            before = seen.get(key)
            count = before.count + 1 if before else 1
            if before is None or d.score > before.score:
                span = (d.score, d.start, d.end, count)
                seen[key] = EvidenceView(d.detector, e.kind, d.category, e.label, e.detail, e.quotes, *span)
            else:
                seen[key] = dataclasses.replace(before, count=count)
    return list(seen.values())


def evidence_sections(t: Transcript, limit: int = 50) -> Iterator[tuple[str, list[EvidenceView], int]]:
    """(title, shown, hidden count) for the judge, SAE features and other evidence; empty ones skipped."""
    views = evidence_views(t)
    judge = sorted((v for v in views if v.kind in ("judge", "triage", "unavailable")), key=lambda v: (v.start, v.label))
    sae = sorted((v for v in views if v.kind == "sae"), key=lambda v: -v.score)
    other = sorted((v for v in views if v.kind in ("probe", "other")), key=lambda v: -v.score)
    for title, group in (("LLM judge", judge), ("SAE features", sae), ("Other evidence", other)):
        if group:
            yield title, group[:limit], max(0, len(group) - limit)


def utc(ts: float | None) -> str:
    """Unix time as `2026-11-30 12:00:05` (UTC)."""
    if ts is None:
        return ""
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


def score_text(score: float | None) -> str:
    return "—" if score is None else f"{score:.3f}"


def clip(text: str, chars: int) -> str:
    """At most `chars` characters of `text` on one line, with an ellipsis when cut."""
    flat = " ".join(text.split())
    return flat if len(flat) <= chars else flat[: chars - 1].rstrip() + "…"
