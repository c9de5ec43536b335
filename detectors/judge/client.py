"""One LLM-judge call: any OpenAI-compatible chat-completions endpoint, structured output, bounded retries.

`ask_judge` either returns a `JudgeVerdict` or raises `JudgeUnavailable` with a short reason
(``timeout``, ``connection``, ``http_<status>``, ``unparseable``, ``response_too_large``) that
callers use as a metric label. Neither the verdict's errors nor the exceptions ever carry the CoT
text. The judge's answer is untrusted too: `AnswerBounds` caps what is read and what is kept; the
answer is read by `detectors.judge.verdicts` and its quotes checked by `detectors.judge.quotes`.
"""

from __future__ import annotations

import asyncio
import json
import time
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from detectors.judge.prompts import DEFAULT_CATEGORIES, build_messages, neutralise, new_nonce, response_schema
from detectors.judge.quotes import verify_quotes
from detectors.judge.verdicts import DEFAULT_BOUNDS, AnswerBounds, CategoryVerdict, parse_verdict


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
