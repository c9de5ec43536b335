"""One LLM-judge call: any OpenAI-compatible chat-completions endpoint, structured output, bounded retries.

`ask_judge` either returns a `JudgeVerdict` or raises `JudgeUnavailable` with a short reason
(``timeout``, ``connection``, ``http_<status>``, ``unparseable``, ``response_too_large``) that
callers use as a metric label. Neither the verdict's errors nor the exceptions ever carry the CoT
text. The judge's answer is untrusted too: `AnswerBounds` caps what is read and what is kept.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import time
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from detectors.judge.prompts import DEFAULT_CATEGORIES, build_messages, neutralise, new_nonce, response_schema


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
class JudgeConfig:
    """Where and how to ask the judge."""

    url: str
    """Base URL of the OpenAI-compatible API, ending in /v1."""
    model: str
    api_key: str | None = None
    """Sent as a bearer token; the caller reads it from the environment (COTMON_JUDGE_API_KEY)."""
    timeout_s: float = 20.0
    """Bound on the whole call, retries included."""
    max_retries: int = 2
    """Extra attempts after an unparseable answer, a 5xx or 429, or a connection error."""
    categories: Mapping[str, str] = field(default_factory=lambda: dict(DEFAULT_CATEGORIES))
    """Category name -> definition given to the judge."""
    max_tokens: int = 512
    bounds: AnswerBounds = DEFAULT_BOUNDS


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


@dataclass(frozen=True)
class JudgeVerdict:
    verdicts: tuple[CategoryVerdict, ...]
    """One per category the judge answered for (categories it skipped are absent)."""
    attempts: int
    """HTTP requests it took, the successful one included."""
    dropped_quotes: int = 0
    """Quotes the judge gave that are not in the CoT."""


class JudgeUnavailable(Exception):
    """The judge gave no usable verdict within the time and retries allowed."""

    def __init__(self, reason: str, attempts: int):
        super().__init__(f"LLM judge unavailable: {reason} after {attempts} attempt(s)")
        self.reason = reason
        """``timeout``, ``connection``, ``http_<status>``, ``unparseable`` or ``response_too_large``."""
        self.attempts = attempts


_BACKOFF_S = 0.05
"""First pause between attempts; doubled each time."""


@dataclass
class _Tally:
    attempts: int = 0


class _TooLarge(Exception):
    """The response body passed `AnswerBounds.response_bytes`."""


async def ask_judge(client: httpx.AsyncClient, config: JudgeConfig, cot: str, nonce: str | None = None) -> JudgeVerdict:
    """Ask the judge about one CoT and return its verdicts, quotes verified against the CoT.

    Args:
        client: the HTTP client to send through (its own timeout is overridden by config.timeout_s).
        config: endpoint, model, key, time and retry bounds, categories.
        cot: the reasoning text to judge (untrusted); quotes are verified against it as given,
            not against the neutralised text the judge saw.
        nonce: the data-marker nonce; a fresh random one when None (tests pin it).

    Raises:
        JudgeUnavailable: on timeout, connection failure, an HTTP error, an answer over
            ``config.bounds.response_bytes``, or no parseable answer.
    """
    nonce = nonce or new_nonce()
    categories = list(config.categories)
    body: dict[str, Any] = {
        "model": config.model,
        "messages": build_messages(neutralise(cot, nonce), config.categories, nonce),
        "temperature": 0,
        "max_tokens": config.max_tokens,
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "cot_verdict", "strict": True, "schema": response_schema(categories)},
        },
    }
    tally = _Tally()
    try:
        async with asyncio.timeout(config.timeout_s):
            verdicts = await _ask(client, config, body, categories, tally, time.monotonic() + config.timeout_s)
    except TimeoutError:
        raise JudgeUnavailable("timeout", tally.attempts) from None
    kept, dropped = verify_quotes(verdicts, cot)
    return JudgeVerdict(kept, tally.attempts, dropped)


async def _ask(
    client: httpx.AsyncClient,
    config: JudgeConfig,
    body: dict[str, Any],
    categories: Sequence[str],
    tally: _Tally,
    deadline: float,
) -> tuple[CategoryVerdict, ...]:
    url = config.url.rstrip("/") + "/chat/completions"
    headers = {"Accept-Encoding": "identity"}  # a compressed body is still decoded, within the bound
    if config.api_key:
        headers["Authorization"] = f"Bearer {config.api_key}"
    retries = 0
    while True:
        tally.attempts += 1
        pause = _BACKOFF_S * 2**retries
        try:
            timeout = max(deadline - time.monotonic(), 0.001)
            async with client.stream("POST", url, json=body, headers=headers, timeout=timeout) as response:
                payload = await _read_body(response, config.bounds.response_bytes)
        except httpx.TimeoutException:
            raise JudgeUnavailable("timeout", tally.attempts) from None
        except _TooLarge:  # leaving the stream closed the connection: the rest is never read
            raise JudgeUnavailable("response_too_large", tally.attempts) from None
        except httpx.RequestError:  # refused, reset, closed mid-answer, undecodable body
            reason = "connection"
        else:
            status = response.status_code
            if status == 400 and "response_format" in body and _rejects_structured_output(payload):
                # A server without structured output: ask again in plain JSON mode (once; not a retry).
                body = {k: v for k, v in body.items() if k != "response_format"}
                continue
            if status == 200:
                try:
                    return parse_verdict(_content(payload), categories, config.bounds)
                except ValueError:
                    reason = "unparseable"
            else:
                reason = f"http_{status}"
                if status < 500 and status != 429:
                    raise JudgeUnavailable(reason, tally.attempts)
                pause = max(pause, _retry_after(response))
        if retries >= config.max_retries or time.monotonic() + pause >= deadline:
            raise JudgeUnavailable(reason, tally.attempts)
        retries += 1
        await asyncio.sleep(pause)


async def _read_body(response: httpx.Response, limit: int) -> bytes:
    """The body, decoded, read chunk by chunk; `_TooLarge` as soon as it passes `limit` bytes.

    gzip and deflate are inflated here, never more than the bound at a time, so a small
    compressed bomb cannot expand in memory either; other encodings are a decoding error.
    """
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _TooLarge
    encoding = response.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("identity", "", "gzip", "x-gzip", "deflate"):
        raise httpx.DecodingError(f"unsupported content-encoding {encoding!r}", request=response.request)
    inflate = zlib.decompressobj(zlib.MAX_WBITS | 32) if encoding not in ("identity", "") else None  # gzip or zlib
    body = bytearray()
    async for chunk in response.aiter_raw():
        if inflate is not None:
            try:
                chunk = inflate.decompress(chunk, limit - len(body) + 1)
            except zlib.error as exc:
                raise httpx.DecodingError(f"bad {encoding} body", request=response.request) from exc
        body += chunk
        if len(body) > limit:
            raise _TooLarge
    return bytes(body)


def _rejects_structured_output(payload: bytes) -> bool:
    text = payload.decode("utf-8", "replace").lower()
    return any(word in text for word in ("response_format", "json_schema", "guided", "structured output"))


def _retry_after(response: httpx.Response) -> float:
    try:
        return max(float(response.headers.get("retry-after", "")), 0.0)
    except ValueError:
        return 0.0


def _content(payload: bytes) -> str:
    """``choices[0].message.content`` (not ``reasoning_content``); ValueError when there is none."""
    try:
        content = json.loads(payload)["choices"][0]["message"]["content"]
    except (ValueError, LookupError, TypeError):
        raise ValueError("not a chat completion") from None
    if isinstance(content, list):  # content parts, as some servers send them
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    if not isinstance(content, str) or not content.strip():
        raise ValueError("empty answer")
    return content


# -- parsing -------------------------------------------------------------------------------------------

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


# -- quotes --------------------------------------------------------------------------------------------

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
