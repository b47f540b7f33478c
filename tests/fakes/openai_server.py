"""A scripted OpenAI-compatible HTTP server on loopback, for deterministic LLM/TTS/STT tests.

Replies come from a script of `Rule`s: the first rule whose `when` occurs in the last user
message answers (a rule with no `when` matches anything), else `default_reply`. Rules can also
fail on purpose: an HTTP status, a delay before the first token, slow tokens, an empty reply, or
a hang. Chat completions stream as Server-Sent Events in OpenAI's chunk format (text deltas and
tool-call deltas) or answer in one JSON body; the same handler serves the OpenAI (`/v1/...`),
DeepSeek (`/chat/completions`) and Azure (`/openai/deployments/{name}/...`) paths. Every request
is recorded with its body, and whether the client went away before the reply was complete.

Usage::

    with FakeOpenAi([Rule(when="hours", reply="We open at nine.")]) as fake:
        llm = OpenAiLlm.from_settings(load_settings(llm_base_url=fake.base_url))
        ...
        assert fake.chat_requests[-1].last_user_message == "What are your hours?"
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Self

import numpy as np
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tests.fakes.loopback import LoopbackServer

SPEECH_RATE = 24000  # OpenAI's `pcm` response format: 24 kHz, 16-bit signed LE, mono


@dataclass(frozen=True)
class ToolCall:
    """A function call the fake model makes; `arguments` is sent as a JSON string."""

    name: str
    arguments: dict[str, Any] = field(default_factory=dict)
    id: str = "call_fake_1"


@dataclass
class Rule:
    """One scripted answer. `when` is matched case-insensitively against the last user message;
    `times` limits how often the rule fires (None: always)."""

    reply: str = ""
    when: str | None = None
    tool_call: ToolCall | None = None
    status: int | None = None  # answer with this HTTP error instead
    hang: bool = False  # never send headers; hold the request until the client leaves
    first_token_delay_s: float = 0.0  # headers and the role chunk go out, then this wait
    token_delay_s: float = 0.0  # between streamed tokens
    times: int | None = None

    def matches(self, text: str) -> bool:
        return (self.times is None or self.times > 0) and (
            self.when is None or self.when.lower() in text.lower()
        )


@dataclass
class SpeechReply:
    """How `/audio/speech` answers: `audio` (24 kHz int16) or a tone of `ms_per_char` per input
    character, sent in chunks of `chunk_bytes` (odd by default, to test re-alignment)."""

    audio: np.ndarray | None = None
    status: int | None = None
    chunk_bytes: int = 4801
    chunk_delay_s: float = 0.0
    ms_per_char: float = 60.0


@dataclass
class TranscriptionReply:
    text: str = ""
    status: int | None = None


@dataclass
class RecordedRequest:
    """A request the fake received. `finished` is set when the fake is done with it;
    `disconnected` tells whether the client left before the reply was complete."""

    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: dict[str, Any]
    finished: threading.Event = field(default_factory=threading.Event)
    disconnected: bool = False

    @property
    def messages(self) -> list[dict[str, Any]]:
        return list(self.body.get("messages", []))

    @property
    def last_user_message(self) -> str:
        users = [m for m in self.messages if m.get("role") == "user"]
        return str(users[-1].get("content", "")) if users else ""

    async def wait_finished(self, within_s: float = 5.0) -> bool:
        return await asyncio.to_thread(self.finished.wait, within_s)


def tone(duration_s: float, rate: int = SPEECH_RATE, freq: float = 440.0) -> np.ndarray:
    """A sine tone as int16 samples: stand-in speech audio."""
    t = np.arange(int(duration_s * rate)) / rate
    return (np.sin(2 * np.pi * freq * t) * 8000).astype(np.int16)


class FakeOpenAi:
    """The scripted server; a context manager. `base_url` is what an OpenAI client takes."""

    def __init__(self, rules: list[Rule] | None = None, default_reply: str = "OK.") -> None:
        self.rules: list[Rule] = list(rules or [])
        self.default_reply = default_reply
        self.speech = SpeechReply()
        self.transcription = TranscriptionReply()
        self.requests: list[RecordedRequest] = []
        self._lock = threading.Lock()
        routes = [
            Route("/{prefix:path}/chat/completions", self._chat, methods=["POST"]),
            Route("/chat/completions", self._chat, methods=["POST"]),
            Route("/{prefix:path}/audio/speech", self._speech, methods=["POST"]),
            Route("/{prefix:path}/audio/transcriptions", self._transcription, methods=["POST"]),
        ]
        self._server = LoopbackServer(Starlette(routes=routes))
        self.url = self._server.url
        self.base_url = f"{self.url}/v1"

    # -- lifecycle and script -------------------------------------------------------------------

    def start(self) -> Self:
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def script(self, *rules: Rule, default_reply: str | None = None) -> None:
        """Replace the rules (and optionally the default reply)."""
        self.rules = list(rules)
        if default_reply is not None:
            self.default_reply = default_reply

    def reset(self) -> None:
        """Forget rules, recorded requests and speech/transcription settings."""
        self.script(default_reply="OK.")
        self.speech = SpeechReply()
        self.transcription = TranscriptionReply()
        self.requests.clear()

    @property
    def chat_requests(self) -> list[RecordedRequest]:
        return [r for r in self.requests if r.path.endswith("/chat/completions")]

    # -- handlers -------------------------------------------------------------------------------

    async def _record(self, request: Request) -> RecordedRequest:
        if request.headers.get("content-type", "").startswith("multipart/"):
            form = await request.form()
            body: dict[str, Any] = {}
            for key, value in form.multi_items():
                body[key] = value if isinstance(value, str) else {"size": len(await value.read())}
        else:
            raw = await request.body()
            body = json.loads(raw) if raw else {}
        recorded = RecordedRequest(
            path=request.url.path,
            query=dict(request.query_params),
            headers={k.lower(): v for k, v in request.headers.items()},
            body=body,
        )
        self.requests.append(recorded)
        return recorded

    def _pick(self, recorded: RecordedRequest) -> Rule:
        with self._lock:
            for rule in self.rules:
                if rule.matches(recorded.last_user_message):
                    if rule.times is not None:
                        rule.times -= 1
                    return rule
        return Rule(reply=self.default_reply)

    async def _chat(self, request: Request) -> Response:
        recorded = await self._record(request)
        rule = self._pick(recorded)
        if rule.hang:
            return await _hold_until_disconnect(request, recorded)
        if rule.status is not None:
            recorded.finished.set()
            return _error(rule.status)
        model = str(recorded.body.get("model", "fake-model"))
        if not recorded.body.get("stream"):
            await asyncio.sleep(rule.first_token_delay_s)
            recorded.finished.set()
            return JSONResponse(_completion(model, rule))
        return StreamingResponse(
            _tracked(_chunks(model, rule), recorded), media_type="text/event-stream"
        )

    async def _speech(self, request: Request) -> Response:
        recorded = await self._record(request)
        script = self.speech
        if script.status is not None:
            recorded.finished.set()
            return _error(script.status)
        audio = script.audio
        if audio is None:
            text = str(recorded.body.get("input", ""))
            audio = tone(len(text) * script.ms_per_char / 1000)
        pcm = audio.astype("<i2").tobytes()

        async def body() -> AsyncIterator[bytes]:
            for start in range(0, len(pcm), script.chunk_bytes):
                if script.chunk_delay_s:
                    await asyncio.sleep(script.chunk_delay_s)
                yield pcm[start : start + script.chunk_bytes]

        return StreamingResponse(_tracked(body(), recorded), media_type="application/octet-stream")

    async def _transcription(self, request: Request) -> Response:
        recorded = await self._record(request)
        recorded.finished.set()
        if self.transcription.status is not None:
            return _error(self.transcription.status)
        return JSONResponse({"text": self.transcription.text})


async def _hold_until_disconnect(request: Request, recorded: RecordedRequest) -> Response:
    # The body is already read, so the next ASGI message is the client going away.
    try:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        recorded.disconnected = True
    finally:
        recorded.finished.set()
    return Response(status_code=499)


async def _tracked(body: AsyncIterator[bytes | str], recorded: RecordedRequest) -> AsyncIterator:
    # Starlette cancels the body iterator when the client disconnects mid-stream.
    complete = False
    try:
        async for part in body:
            yield part
        complete = True
    finally:
        recorded.disconnected = not complete
        recorded.finished.set()


def _error(status: int) -> JSONResponse:
    return JSONResponse(
        {"error": {"message": f"scripted failure {status}", "type": "server_error"}},
        status_code=status,
    )


def _tokens(text: str) -> list[str]:
    return re.findall(r"\s*\S+", text)


def _envelope(model: str, delta: dict[str, Any], finish: str | None = None) -> str:
    chunk = {
        "id": "chatcmpl-fake",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    return f"data: {json.dumps(chunk)}\n\n"


async def _chunks(model: str, rule: Rule) -> AsyncIterator[str]:
    yield _envelope(model, {"role": "assistant", "content": ""})
    await asyncio.sleep(rule.first_token_delay_s)
    for index, token in enumerate(_tokens(rule.reply)):
        if index and rule.token_delay_s:
            await asyncio.sleep(rule.token_delay_s)
        yield _envelope(model, {"content": token})
    if rule.tool_call:
        call = rule.tool_call
        head = {"index": 0, "id": call.id, "type": "function"}
        yield _envelope(
            model, {"tool_calls": [{**head, "function": {"name": call.name, "arguments": ""}}]}
        )
        arguments = json.dumps(call.arguments)
        # Arguments arrive in fragments, as they do from the real API.
        for start in range(0, len(arguments), 8):
            fragment = {"index": 0, "function": {"arguments": arguments[start : start + 8]}}
            yield _envelope(model, {"tool_calls": [fragment]})
    yield _envelope(model, {}, "tool_calls" if rule.tool_call else "stop")
    yield "data: [DONE]\n\n"


def _completion(model: str, rule: Rule) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": rule.reply or None}
    if rule.tool_call:
        call = rule.tool_call
        message["tool_calls"] = [
            {
                "id": call.id,
                "type": "function",
                "function": {"name": call.name, "arguments": json.dumps(call.arguments)},
            }
        ]
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": message,
                "finish_reason": "tool_calls" if rule.tool_call else "stop",
            }
        ],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }
