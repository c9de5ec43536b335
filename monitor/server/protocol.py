"""Wire models of the OpenAI-compatible API, and OpenAI-style errors.

Requests are validated with pydantic (unknown fields are accepted and ignored, as OpenAI's own
clients send many); responses are built as plain dicts in the OpenAI shapes, plus the
`reasoning` / `reasoning_content` fields and a `cotmon` object.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from monitor.types import ChatMessage, Flag, Transcript


class APIError(Exception):
    """An error the API answers with: HTTP status plus an OpenAI-style error body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(
    message: str, type: str = "invalid_request_error", param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


PART_TYPES = ("text", "image_url", "input_audio", "file", "refusal")
"""Content part types of OpenAI's chat API; cotmon reads `text` (and an assistant's `refusal`)."""


class ContentPart(BaseModel):
    """One part of a message's content; its type is checked in `chat_messages`."""

    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None
    refusal: str | None = None


def _string_or_parts(value: Any) -> Any:
    if value is not None and not isinstance(value, str | list):
        raise ValueError("must be a string or a list of content parts")
    return value


class MessageIn(BaseModel):
    """A chat message as clients send it; content may be a string or content parts."""

    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Annotated[str | list[ContentPart] | None, BeforeValidator(_string_or_parts)] = None
    tool_calls: list[Any] | None = None
    function_call: Any = None


def whole_text(value: str, field: str) -> str:
    """`value` if it is valid Unicode text; a 400 naming `field` for a lone surrogate (JSON allows
    "\\ud800", which no tokenizer, log or database can encode)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise APIError(
            400,
            f"{field}: not valid Unicode text (a lone surrogate \\u{ord(value[exc.start]):04x} at character {exc.start})",
            param=field,
        ) from None
    return value


def chat_messages(messages: list[MessageIn]) -> list[ChatMessage]:
    """Check `messages` the way OpenAI's API does and turn them into ChatMessages.

    Raises APIError (400, naming the field as OpenAI does, e.g. `messages[0].content`): content
    missing where the role requires it, an assistant message with neither content nor tool calls,
    a content part of unknown type, one cotmon cannot read (an image on a text model), a text part
    without its text.
    """
    chats = []
    for i, message in enumerate(messages):
        field = f"messages[{i}].content"
        if message.content is None:
            if message.role != "assistant":
                raise APIError(400, f"{field}: a {message.role} message requires 'content'", param=field)
            if not message.tool_calls and message.function_call is None:
                raise APIError(400, f"{field}: an assistant message requires 'content' or 'tool_calls'", param=field)
        chats.append(ChatMessage("system" if message.role == "developer" else message.role, _text(message, field)))
    return chats


def _text(message: MessageIn, field: str) -> str:
    if not isinstance(message.content, list):
        return whole_text(message.content or "", field)
    texts = []
    for j, part in enumerate(message.content):
        where = f"{field}[{j}]"
        readable = "refusal" if message.role == "assistant" and part.type == "refusal" else "text"
        if part.type not in PART_TYPES:
            raise APIError(
                400,
                f"{where}.type: unknown content part type {part.type!r}; expected one of {', '.join(PART_TYPES)}",
                param=f"{where}.type",
            )
        if part.type != readable:
            raise APIError(
                400, f"{where}.type: {part.type!r} parts are not supported: this model reads text only", param=f"{where}.type"
            )
        text = getattr(part, readable)
        if text is None:
            raise APIError(400, f"{where}.{readable}: a {readable} part requires {readable!r}", param=f"{where}.{readable}")
        texts.append(whole_text(text, f"{where}.{readable}"))
    return "".join(texts)


_UNION_TAGS = frozenset({"str", "int", "float", "bool", "none", "dict"})
"""Names pydantic puts in a location for the member of a union that failed; not fields."""


def openai_param(loc: Sequence[int | str]) -> str | None:
    """A validation error's location as OpenAI names a field: ('messages', 0, 'role') -> messages[0].role."""
    param = ""
    for part in loc:
        if isinstance(part, int):
            param += f"[{part}]"
        elif part.isidentifier() and part not in _UNION_TAGS:  # 'list[ContentPart]', 'function-after[...]': union tags
            param += f".{part}" if param else part
    return param or None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """POST /v1/chat/completions."""

    model_config = ConfigDict(extra="allow")
    model: str = Field(min_length=1)
    messages: list[MessageIn] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)
    n: int | None = Field(None, ge=1, le=1, description="Only 1 is supported.")
    ignore_eos: bool = Field(False, description="vLLM extension: keep generating past end-of-sequence tokens.")
    max_reasoning_tokens: int | None = Field(
        None, ge=1, description="cotmon extension: reasoning budget; when spent, the think block is closed."
    )


class MonitorTranscriptRequest(BaseModel):
    """POST /v1/monitor/transcripts: score a transcript produced elsewhere (watch mode).

    Give either `completion` (the assistant's text exactly as generated, think tags included)
    or `reasoning` and `answer`.
    """

    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    messages: list[MessageIn] = Field(min_length=1)
    completion: str | None = None
    reasoning: str | None = None
    answer: str | None = None
    label: str | None = Field(
        None,
        max_length=128,
        pattern=r"^[A-Za-z0-9_.:-]+$",
        description="The caller's own name for this transcript (e.g. its trace id), stored and filterable as `label`; "
        "the session id is assigned by the server.",
    )
    session_id: str | None = Field(None, description="Refused: session ids are assigned by the server; use `label`.")


def flags_json(flags: tuple[Flag, ...] | list[Flag]) -> list[dict[str, Any]]:
    return [f.to_dict() for f in flags]


def cotmon_object(t: Transcript) -> dict[str, Any]:
    """The `cotmon` object of a response's last chunk."""
    return {"session_id": t.session_id, "outcome": t.outcome, "flags": flags_json(t.flags)}


def finish_reason(t: Transcript, max_tokens: int) -> str:
    if t.outcome == "halted":
        return "content_filter"
    return "length" if len(t.steps) >= max_tokens else "stop"


def usage(prompt_tokens: int, t: Transcript) -> dict[str, Any]:
    reasoning = sum(1 for s in t.steps if s.channel == "reasoning")
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": len(t.steps),
        "total_tokens": prompt_tokens + len(t.steps),
        "completion_tokens_details": {"reasoning_tokens": reasoning},
    }


def chunk(
    completion_id: str, model: str, created: int, delta: dict[str, Any], finish: str | None = None, **extra: Any
) -> dict[str, Any]:
    return {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
        **extra,
    }


def completion(
    completion_id: str, model: str, t: Transcript, text: tuple[str, str], max_tokens: int, prompt_tokens: int
) -> dict[str, Any]:
    """A non-streamed chat completion; `text` is (reasoning, content) with the think tags removed."""
    reasoning, content = text[0] or None, text[1]
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": int(t.started_at or time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content, "reasoning": reasoning, "reasoning_content": reasoning},
                "finish_reason": finish_reason(t, max_tokens),
                "logprobs": None,
            }
        ],
        "usage": usage(prompt_tokens, t),
        "cotmon": cotmon_object(t),
    }
