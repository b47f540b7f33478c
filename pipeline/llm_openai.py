"""Chat replies from OpenAI, DeepSeek, Azure OpenAI or any OpenAI-compatible server.

All four speak the chat-completions protocol, so one engine drives them through the `openai`
package; only the client differs (base URL, Azure's deployment paths and `api-version`). Replies
stream as text deltas so the first sentence can be spoken while the rest is still generated.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Sequence
from typing import Any

import openai
from openai import AsyncAzureOpenAI, AsyncOpenAI

from pipeline.engines import ChatMessage, EngineError, ToolRequest
from voicebot.settings import Settings, SettingsError

# provider -> (base URL, default model); None: the client's own default (api.openai.com).
PROVIDER_DEFAULTS: dict[str, tuple[str | None, str | None]] = {
    "openai": (None, "gpt-4o-mini"),
    "deepseek": ("https://api.deepseek.com", "deepseek-chat"),
    "azure": (None, None),
    "compatible": (None, None),
}

# A ceiling for the HTTP client; `stream()` enforces the tighter per-call deadlines itself.
HTTP_TIMEOUT_S = 60.0


def chat_payload(messages: Sequence[ChatMessage]) -> list[dict[str, Any]]:
    """The request's `messages` list. The one place that maps our messages to the wire, so
    tool calls and tool results can be added here when call control needs them."""
    return [{"role": m.role, "content": m.content} for m in messages]


def _reason(exc: Exception) -> str:
    if isinstance(exc, openai.APIStatusError):
        return f"HTTP {exc.status_code} from the API"
    if isinstance(exc, openai.APIConnectionError):
        return f"cannot reach the API ({exc.__class__.__name__})"
    return f"{exc.__class__.__name__}: {exc}"


class OpenAiLlm:
    """A `LanguageModel` over the chat-completions API (OpenAI, DeepSeek, Azure, compatible).

    `stream()` must produce its first token within `timeout_s` of the request and then never
    stall longer than `timeout_s` between chunks, or it raises `EngineError("llm", ...)`; HTTP
    errors, connection errors and empty replies raise the same. Cancelling the iteration (or
    closing the generator with `aclose()`) closes the HTTP stream, so the server stops
    generating. Retries are off: on a live call an apology now beats a reply after backoff.
    """

    def __init__(
        self,
        client: AsyncOpenAI,
        model: str,
        *,
        timeout_s: float = 8.0,
        max_tokens: int = 120,
        temperature: float = 0.5,
        complete_timeout_s: float = 30.0,
        name: str | None = None,
        tools: list[dict[str, Any]] | None = None,
    ) -> None:
        self.client = client
        self.model = model
        self.timeout_s = timeout_s
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.complete_timeout_s = complete_timeout_s
        self.name = name or f"openai:{model}"
        self.tools = tools  # function definitions offered on replies (call control)

    @classmethod
    def from_settings(cls, settings: Settings) -> OpenAiLlm:
        """Build the client for `settings.resolved_llm_provider` (not "local").

        Raises `SettingsError` naming the missing key: Azure needs LLM_BASE_URL (the resource
        endpoint) and LLM_MODEL (the deployment); "compatible" needs LLM_BASE_URL and LLM_MODEL.
        An unset LLM_API_KEY falls back to the client's own environment variable
        (OPENAI_API_KEY, AZURE_OPENAI_API_KEY) except for "compatible" servers, which get a
        placeholder because most of them ignore it.
        """
        provider = settings.resolved_llm_provider
        if provider == "local":
            raise ValueError("the local provider is served by LlamaCppLlm, not OpenAiLlm")
        default_base, default_model = PROVIDER_DEFAULTS[provider]
        base_url = settings.llm_base_url or default_base
        model = settings.llm_model or default_model
        missing = [
            key
            for key, value, needed in (
                ("LLM_BASE_URL", base_url, provider in ("azure", "compatible")),
                ("LLM_MODEL", model, True),
            )
            if needed and not value
        ]
        if missing:
            raise SettingsError(
                missing, [f"{key}: required when LLM_PROVIDER={provider}" for key in missing]
            )
        assert model is not None
        api_key = settings.llm_api_key or ("unused" if provider == "compatible" else None)
        common: dict[str, Any] = {"api_key": api_key, "max_retries": 0, "timeout": HTTP_TIMEOUT_S}
        try:
            if provider == "azure":
                client: AsyncOpenAI = AsyncAzureOpenAI(
                    azure_endpoint=str(base_url), api_version=settings.llm_api_version, **common
                )
            else:
                client = AsyncOpenAI(base_url=base_url, **common)
        except openai.OpenAIError:
            # The client refuses to start without a key (none given, none in its env var).
            raise SettingsError(
                ["LLM_API_KEY"], [f"LLM_API_KEY: required when LLM_PROVIDER={provider}"]
            ) from None
        return cls(
            client,
            model,
            timeout_s=settings.llm_timeout_s,
            max_tokens=settings.llm_max_tokens,
            name=f"{provider}:{model}",
        )

    def _request(self, messages: Sequence[ChatMessage], max_tokens: int | None,
                 tools: bool = False) -> dict[str, Any]:
        request: dict[str, Any] = {
            "model": self.model,
            "messages": chat_payload(messages),
            "max_tokens": max_tokens or self.max_tokens,
            "temperature": self.temperature,
        }
        if tools and self.tools:
            request["tools"] = self.tools
        return request

    async def stream(
        self, messages: Sequence[ChatMessage], *, max_tokens: int | None = None
    ) -> AsyncIterator[str | ToolRequest]:
        """Yield the reply as text deltas, then any tool calls the model made as
        `ToolRequest`s; see the class docstring for deadlines and errors."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        try:
            async with asyncio.timeout_at(deadline):
                response = await self.client.chat.completions.create(
                    **self._request(messages, max_tokens, tools=True), stream=True
                )
        except TimeoutError:
            raise EngineError("llm", f"no reply within {self.timeout_s:g} s") from None
        except openai.OpenAIError as exc:
            raise EngineError("llm", _reason(exc)) from exc

        # `async with` closes the HTTP response however we leave: done, error, cancelled.
        async with response:
            chunks = aiter(response)
            got_text = False
            calls: dict[int, dict[str, str]] = {}  # tool calls arrive in fragments, by index
            while True:
                # The deadline wraps only the wait for the next chunk, never our consumer's
                # work between chunks (a timeout spanning a `yield` would cancel the consumer).
                try:
                    async with asyncio.timeout_at(deadline):
                        chunk = await anext(chunks)
                except StopAsyncIteration:
                    break
                except TimeoutError:
                    stage = "more text" if got_text else "a first token"
                    raise EngineError("llm", f"waited {self.timeout_s:g} s for {stage}") from None
                except (openai.OpenAIError, ValueError) as exc:
                    raise EngineError("llm", _reason(exc)) from exc
                delta = chunk.choices[0].delta if chunk.choices else None
                text = delta.content if delta is not None else None
                if text:
                    got_text = True
                    yield text
                for call in (delta.tool_calls or []) if delta is not None else []:
                    got_text = True
                    slot = calls.setdefault(call.index, {"name": "", "arguments": ""})
                    if call.function is not None:
                        slot["name"] += call.function.name or ""
                        slot["arguments"] += call.function.arguments or ""
                if got_text:
                    deadline = loop.time() + self.timeout_s
        if not got_text:
            raise EngineError("llm", "empty reply")
        for slot in calls.values():
            try:
                arguments = json.loads(slot["arguments"] or "{}")
            except ValueError:
                arguments = {}
            yield ToolRequest(slot["name"], arguments if isinstance(arguments, dict) else {})

    async def complete(
        self,
        messages: Sequence[ChatMessage],
        *,
        max_tokens: int | None = None,
        timeout_s: float | None = None,
    ) -> str:
        """The whole reply at once (call summaries); `complete_timeout_s` by default."""
        try:
            async with asyncio.timeout(timeout_s or self.complete_timeout_s):
                response = await self.client.chat.completions.create(
                    **self._request(messages, max_tokens), stream=False
                )
        except TimeoutError:
            raise EngineError("llm", "no reply in time") from None
        except openai.OpenAIError as exc:
            raise EngineError("llm", _reason(exc)) from exc
        text = (response.choices[0].message.content or "").strip() if response.choices else ""
        if not text:
            raise EngineError("llm", "empty reply")
        return text

    async def aclose(self) -> None:
        """Close the HTTP client (app shutdown)."""
        await self.client.close()
