"""Quote checking: a verdict keeps only the quotes that occur verbatim in the CoT, and its score the
share of them it can support."""

from __future__ import annotations

import re
from collections.abc import Sequence

from detectors.judge.verdicts import CategoryVerdict

_QUOTE_EDGES = " \t\r\n\"'`“”‘’„«»"
_ELLIPSIS = re.compile(r"^(?:\.\.\.|…)+|(?:\.\.\.|…)+$")


def verify_quotes(verdicts: Sequence[CategoryVerdict], cot: str) -> tuple[tuple[CategoryVerdict, ...], int]:
    """Keep the quotes that occur verbatim in the CoT and discount the scores they were meant to support.

    A quote is first stripped of surrounding whitespace and quote marks and of a leading or
    trailing ellipsis. Where the judge reflowed whitespace (a newline given as a space), the
    CoT's own text is kept instead, so every kept quote is a substring of the CoT. Duplicates
    within a verdict are kept once and not counted as dropped.

    A verdict's score is multiplied by the share of its quotes that were found: a verdict whose
    quotes are all fabricated is unsupported and scores 0, one with 1 of 2 found keeps half its
    score. A verdict without quotes keeps its score (the judge may give none). Verifying again
    changes nothing, since every kept quote is found.

    Returns:
        The verdicts so trimmed and scaled, and how many quotes were dropped over all of them.
    """
    dropped = 0
    kept: list[CategoryVerdict] = []
    for verdict in verdicts:
        quotes: list[str] = []
        missing = 0
        for quote in verdict.quotes:
            found = _find(_trim(quote), cot)
            if found is None:
                missing += 1
            elif found not in quotes:
                quotes.append(found)
        share = 1 - missing / len(verdict.quotes) if verdict.quotes else 1.0
        score = verdict.score * share
        kept.append(
            CategoryVerdict(verdict.category, score, verdict.rationale, tuple(quotes), verdict.unverified_quotes + missing)
        )
        dropped += missing
    return tuple(kept), dropped


def _trim(quote: str) -> str:
    previous = None
    while previous != quote:
        previous, quote = quote, _ELLIPSIS.sub("", quote.strip(_QUOTE_EDGES))
    return quote


def _find(quote: str, cot: str) -> str | None:
    if not quote:
        return None
    if quote in cot:
        return quote
    words = quote.split()
    match = re.search(r"\s+".join(map(re.escape, words)), cot) if words else None
    return match.group(0) if match else None
