"""Fakes shipped with cotmon, for its own tests and for users testing their detectors/policies.

`ScriptedEngine` plays back fixed readout values token by token through the real Engine
protocol, so a policy or detector can be exercised without a model. It records how many steps
were pulled from it, which is how tests check that a halt stopped generation. `ScriptedDetector`
is a detector kind that turns those readout values into scores, so a pipeline runs with scores
chosen in advance (register it under any kind name). `ServerThread`
serves an app on a loopback port for tests that use real HTTP clients. `ScriptedJudge` is an
OpenAI-compatible chat-completions server with scripted answers (good, garbage, errors, delays,
dropped connections) that records what it was sent, for testing an LLM judge through real HTTP.
"""

from __future__ import annotations

import asyncio
import json
import math
import threading
import time
from collections import deque
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

import numpy as np

from monitor.detector import DetectorContext
from monitor.types import (
    AnyReadout,
    ChatMessage,
    Detection,
    DetectorSpec,
    Evidence,
    Flag,
    GenerationRequest,
    ModelInfo,
    Readout,
    TraceStep,
)

if TYPE_CHECKING:
    from starlette.requests import Request
    from starlette.types import ASGIApp, Receive, Scope, Send

SCRIPTED_MODEL = ModelInfo(model_id="scripted", revision="0", d_model=8, n_layers=2)


class ScriptedEngine:
    """An engine whose tokens and readout values are given in advance.

    Args:
        tokens: (text, channel) per step.
        readouts: one mapping of readout name -> value per step; names not installed are dropped.
        info: the ModelInfo detectors will see.
    """

    def __init__(
        self,
        tokens: Sequence[tuple[str, str]],
        readouts: Sequence[Mapping[str, float]] | None = None,
        info: ModelInfo = SCRIPTED_MODEL,
    ):
        self.info = info
        self.context_length: int | None = None
        self.tokens = list(tokens)
        self.values = list(readouts) if readouts is not None else [{} for _ in tokens]
        if len(self.values) != len(self.tokens):
            raise ValueError("ScriptedEngine needs one readout mapping per token")
        self.installed: tuple[AnyReadout, ...] = ()
        self.pulled = 0
        """Steps handed out so far, over all streams."""

    def install(self, readouts: Sequence[AnyReadout]) -> None:
        self.installed = tuple(readouts)

    async def _play(self, session_id: str) -> AsyncGenerator[TraceStep, None]:
        names = {n for r in self.installed for n in ((r.name,) if isinstance(r, Readout) else r.names)}
        last = len(self.tokens) - 1
        for i, ((text, channel), values) in enumerate(zip(self.tokens, self.values, strict=True)):
            self.pulled += 1
            readouts = {k: v for k, v in values.items() if k in names}
            yield TraceStep(session_id, i, i, text, "answer" if channel == "answer" else "reasoning", readouts, i == last)

    def prompt_opens_reasoning(self, messages: Sequence[ChatMessage]) -> bool:
        return True

    def prompt_tokens(self, messages: Sequence[ChatMessage]) -> int:
        return sum(len(m.content.split()) for m in messages)

    def text_tokens(self, text: str) -> int:
        return len(text.split())

    def stream(self, request: GenerationRequest) -> AsyncGenerator[TraceStep, None]:
        return self._play(request.session_id)

    def teacher_force(
        self, messages: Sequence[ChatMessage], assistant_text: str, session_id: str = ""
    ) -> AsyncGenerator[TraceStep, None]:
        return self._play(session_id)

    def force_tokens(
        self, messages: Sequence[ChatMessage], token_ids: Sequence[int], session_id: str = "", *, stepwise: bool = False
    ) -> AsyncGenerator[TraceStep, None]:
        """Plays the script again (its token ids are the step indices)."""
        return self._play(session_id)


class ScriptedDetector:
    """A detector kind whose score at each token is sigmoid(the readout named after the detector).

    With a `ScriptedEngine` whose readouts include the detector's name, the scores are fixed in
    advance. Also an explainer: a flag's evidence quotes the flagged span.

    Spec args: `category` of its detections [deception]; `threshold`, its calibrated threshold
    [none]; `emit_late_at`, a token index at which it hands in a late detection (category `late`,
    score 0.99) through the context's `emit`, as a slow detector (the judge) does.
    """

    known_args = ("category", "threshold", "emit_late_at")

    def __init__(self, spec: DetectorSpec, context: DetectorContext):
        self.spec, self.context = spec, context
        self.category = str(spec.args.get("category", "deception"))
        self.texts: list[str] = []

    @classmethod
    def prepare(cls, spec: DetectorSpec, context: DetectorContext) -> Callable[[DetectorContext], ScriptedDetector]:
        return lambda stream: cls(spec, stream)

    def readouts(self) -> Sequence[Readout]:
        return [Readout(self.spec.name, 0, np.zeros(self.context.model.d_model, np.float32))]

    def calibrated_threshold(self) -> float | None:
        threshold = self.spec.args.get("threshold")
        return None if threshold is None else float(threshold)

    async def observe(self, step: TraceStep) -> Sequence[Detection]:
        self.texts.append(step.text)
        if step.index == self.spec.args.get("emit_late_at") and self.context.emit is not None:
            self.context.emit([Detection(self.spec.name, "late", 0.99, 0, step.index + 1)])
        if self.spec.name not in step.readouts:
            return []
        score = 1.0 / (1.0 + math.exp(-step.readouts[self.spec.name]))
        return [Detection(self.spec.name, self.category, score, step.index, step.index + 1)]

    def explain(self, flag: Flag, start: int, end: int) -> Sequence[Evidence]:
        quote = "".join(self.texts[start:end])
        return [Evidence(f"{self.spec.name} direction", f"tokens {start}..{end}", (quote, self.texts[end - 1]))]


class ServerThread:
    """Runs an ASGI app with uvicorn on a free loopback port in a background thread.

    Use as a context manager; `base_url` is ``http://127.0.0.1:PORT``. Meant for tests that drive
    cotmon with real HTTP clients (the official `openai` client, httpx).
    """

    def __init__(self, app: Any, host: str = "127.0.0.1"):
        import uvicorn

        self._server = uvicorn.Server(uvicorn.Config(app, host=host, port=0, log_level="warning", access_log=False))
        self._thread = threading.Thread(target=self._server.run, name="cotmon-test-server", daemon=True)
        self.base_url = ""

    def __enter__(self) -> ServerThread:
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)
        host, port = self._server.servers[0].sockets[0].getsockname()[:2]
        self.base_url = f"http://{host}:{port}"
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=30)


@dataclass(frozen=True)
class JudgeReply:
    """One scripted answer of `ScriptedJudge`."""

    content: str = ""
    """The assistant message's content; for a status other than 200, the error message."""
    status: int = 200
    delay_s: float = 0.0
    """Seconds to wait before answering (to exercise timeouts); cut short when the client leaves."""
    drop: bool = False
    """An outage: send the status line, then close the connection without the answer."""
    padding_bytes: int = 0
    """A judge that will not stop: this many bytes of whitespace streamed after the answer, which
    still parses. `ScriptedJudge.streamed` says how much went out before the client left."""


JudgeScript = Sequence[JudgeReply | str] | Callable[[dict[str, Any]], JudgeReply | str]


class ScriptedJudge:
    """An OpenAI-compatible chat-completions server whose answers are scripted; records requests.

    Use as a context manager: ``with ScriptedJudge(replies) as judge: judge.base_url`` (ends in /v1).
    Serves ``POST /v1/chat/completions`` and ``GET /v1/models``.

    Args:
        replies: answers given in order (a str is a 200 answer with that content), or a function
            of the request body that returns the answer.
        default: the answer once `replies` has run out; without one, a 500.
        model: the model id listed by /v1/models (completions echo the requested model).
    """

    def __init__(self, replies: JudgeScript = (), default: JudgeReply | str | None = None, model: str = "scripted-judge"):
        self._script: deque[JudgeReply | str] | Callable[[dict[str, Any]], JudgeReply | str] = (
            replies if callable(replies) else deque(replies)
        )
        self.default = default
        self.model = model
        self.requests: list[dict[str, Any]] = []
        """JSON bodies of the chat-completion requests received, in order."""
        self.headers: list[dict[str, str]] = []
        """Their HTTP headers (lower-case names), in the same order."""
        self.streamed: list[int] = []
        """Per padded answer, in order: the bytes of padding sent before the client hung up (or all)."""
        self._closing = threading.Event()
        self._server = ServerThread(self._app())
        self.base_url = ""

    def __enter__(self) -> ScriptedJudge:
        self._server.__enter__()
        self.base_url = f"{self._server.base_url}/v1"
        return self

    def __exit__(self, *exc: object) -> None:
        self._closing.set()  # ends pending delays, so the server stops at once
        self._server.__exit__(*exc)

    def _app(self) -> Any:
        from starlette.applications import Starlette
        from starlette.routing import Route

        return Starlette(
            routes=[
                Route("/v1/chat/completions", self._chat_completions, methods=["POST"]),
                Route("/v1/models", self._models, methods=["GET"]),
            ]
        )

    def _next_reply(self, body: dict[str, Any]) -> JudgeReply:
        if callable(self._script):
            reply: JudgeReply | str = self._script(body)
        elif self._script:
            reply = self._script.popleft()
        elif self.default is not None:
            reply = self.default
        else:
            reply = JudgeReply("the scripted judge has no reply left", status=500)
        return JudgeReply(reply) if isinstance(reply, str) else reply

    async def _chat_completions(self, request: Request) -> ASGIApp:
        from starlette.responses import JSONResponse

        try:
            body = await request.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            return JSONResponse(_openai_error("the body must be a JSON object", 400), status_code=400)
        self.requests.append(body)
        self.headers.append(dict(request.headers))
        reply = self._next_reply(body)
        await self._wait(request, reply.delay_s)
        if reply.drop:
            return _drop_connection
        if reply.status != 200:
            return JSONResponse(_openai_error(reply.content, reply.status), status_code=reply.status)
        if reply.padding_bytes:
            return self._padded(self._completion(body, reply.content), reply.padding_bytes)
        return JSONResponse(self._completion(body, reply.content))

    def _padded(self, completion: dict[str, Any], padding_bytes: int) -> ASGIApp:
        """An ASGI app that streams the completion, then padding until it is all out or the client hangs up."""
        index = len(self.streamed)
        self.streamed.append(0)

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            gone = asyncio.Event()

            async def listen() -> None:  # uvicorn drops writes to a closed connection silently
                while (await receive())["type"] != "http.disconnect":
                    pass
                gone.set()

            listener = asyncio.create_task(listen())
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
            await send({"type": "http.response.body", "body": json.dumps(completion).encode(), "more_body": True})
            while (left := padding_bytes - self.streamed[index]) > 0 and not gone.is_set() and not self._closing.is_set():
                await send({"type": "http.response.body", "body": _PADDING[:left], "more_body": True})  # waits on flow control
                self.streamed[index] += min(left, len(_PADDING))
                # Once the client is gone, uvicorn takes (and drops) writes without suspending: let the
                # listener see the disconnect now, so that `streamed` counts only bytes that could arrive.
                await asyncio.sleep(0)
            if not gone.is_set():
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            listener.cancel()

        return app

    async def _models(self, request: Request) -> ASGIApp:
        from starlette.responses import JSONResponse

        return JSONResponse(
            {"object": "list", "data": [{"id": self.model, "object": "model", "created": 0, "owned_by": "cotmon"}]}
        )

    async def _wait(self, request: Request, delay_s: float) -> None:
        deadline = time.monotonic() + delay_s
        while (left := deadline - time.monotonic()) > 0 and not self._closing.is_set():
            if await request.is_disconnected():
                return
            await asyncio.sleep(min(left, 0.02))

    def _completion(self, body: dict[str, Any], content: str) -> dict[str, Any]:
        messages = body.get("messages")
        prompt = (
            sum(len(str(m.get("content", "")).split()) for m in messages if isinstance(m, dict))
            if isinstance(messages, list)
            else 0
        )
        completion = len(content.split())
        return {
            "id": f"chatcmpl-scripted-{len(self.requests)}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": str(body.get("model") or self.model),
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": content}, "logprobs": None, "finish_reason": "stop"}
            ],
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion},
        }


_PADDING = b" " * (64 << 10)


def _openai_error(message: str, status: int) -> dict[str, Any]:
    phrase = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else "error"
    return {"error": {"message": message or phrase, "type": "scripted_error", "param": None, "code": status}}


async def _drop_connection(scope: Scope, receive: Receive, send: Send) -> None:
    """An ASGI app that starts a 200 answer and returns without its body: uvicorn closes the connection."""
    headers = [(b"content-type", b"application/json"), (b"content-length", b"64")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
