"""Speech from network services: gTTS (Google Translate's voice) and OpenAI's speech API.

Both need internet in production; the tests point them at loopback fakes. gTTS returns a whole
MP3 per request, decoded in-process; OpenAI streams raw PCM, re-chunked into clips as it
arrives so playback can start before the sentence is fully synthesized.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
from collections.abc import AsyncIterator

import httpx2  # the openai package's HTTP client; raw errors surface while streaming a body
import numpy as np
import openai
from gtts import gTTS
from gtts.lang import tts_langs
from gtts.tts import gTTSError
from openai import AsyncOpenAI

from media.audiofile import AudioFileError, decode_mp3
from pipeline.engines import AudioClip, EngineError
from voicebot.settings import Settings, SettingsError

# OpenAI's `pcm` response format: 24 kHz, signed 16-bit little-endian, mono.
OPENAI_PCM_RATE = 24000
OPENAI_DEFAULT_VOICE = "alloy"


class GttsTts:
    """A `TextToSpeech` on gTTS (Google Translate's TTS endpoint), the original design's choice.

    gTTS is synchronous (requests), so each sentence is fetched and decoded in a worker thread;
    the MP3 is decoded in-process (miniaudio) and yielded as one clip. gTTS sets no HTTP timeout,
    so on a hung connection `timeout_s` returns control to the call (raising `EngineError`)
    while the worker thread stays blocked until the socket gives up.
    """

    name = "gtts"

    def __init__(self, lang: str = "en", *, tld: str = "com", timeout_s: float = 6.0) -> None:
        if lang not in tts_langs():
            raise SettingsError(["TTS_VOICE"], [f"TTS_VOICE: gTTS has no language {lang!r}"])
        self.lang = lang
        self.tld = tld
        self.timeout_s = timeout_s

    @classmethod
    def from_settings(cls, settings: Settings) -> GttsTts:
        """TTS_VOICE is the gTTS language (default "en")."""
        return cls(settings.tts_voice or "en", timeout_s=settings.tts_timeout_s)

    def _fetch(self, text: str) -> tuple[np.ndarray, int]:
        buffer = io.BytesIO()
        # lang_check=False: the language was checked once in __init__.
        gTTS(text, lang=self.lang, tld=self.tld, lang_check=False).write_to_fp(buffer)
        return decode_mp3(buffer.getvalue())

    async def synthesize(self, text: str) -> AsyncIterator[AudioClip]:
        """Yield the sentence as one clip (MP3's own rate); nothing for blank text."""
        if not text.strip():
            return
        try:
            async with asyncio.timeout(self.timeout_s):
                samples, rate = await asyncio.to_thread(self._fetch, text)
        except TimeoutError:
            raise EngineError("tts", f"gTTS gave no audio within {self.timeout_s:g} s") from None
        except (gTTSError, AudioFileError, AssertionError) as exc:
            # gTTS asserts on text it tokenizes to nothing (e.g. only punctuation).
            raise EngineError("tts", f"gTTS: {exc}") from exc
        if len(samples) == 0:
            raise EngineError("tts", "gTTS returned no audio")
        yield AudioClip(samples, rate)


class OpenAiTts:
    """A `TextToSpeech` on OpenAI's `audio/speech` API, streamed as 24 kHz PCM.

    Bytes are yielded as clips of at least `clip_ms` as they arrive (the last one may be
    shorter); an odd byte at a chunk boundary waits for its partner. The first bytes must come
    within `timeout_s` and the stream must not stall longer than that, else `EngineError`, as
    for HTTP and connection errors. Cancelling the iteration closes the HTTP response.
    """

    def __init__(
        self,
        client: AsyncOpenAI,
        *,
        model: str = "gpt-4o-mini-tts",
        voice: str = OPENAI_DEFAULT_VOICE,
        timeout_s: float = 6.0,
        clip_ms: int = 100,
    ) -> None:
        self.client = client
        self.model = model
        self.voice = voice
        self.timeout_s = timeout_s
        self.clip_bytes = OPENAI_PCM_RATE * 2 * clip_ms // 1000
        self.name = f"openai-tts:{model}"

    @classmethod
    def from_settings(
        cls, settings: Settings, *, base_url: str | None = None, api_key: str | None = None
    ) -> OpenAiTts:
        """TTS_MODEL and TTS_VOICE choose the model and voice. The endpoint and key are the
        LLM's when LLM_PROVIDER is "openai" or "compatible" (one OpenAI account or one local
        OpenAI-compatible server), else api.openai.com with OPENAI_API_KEY from the
        environment (a compatible server gets a placeholder key); `base_url` / `api_key`
        override both."""
        provider = settings.resolved_llm_provider
        shared = provider in ("openai", "compatible")
        base_url = base_url or (settings.llm_base_url if shared else None)
        api_key = api_key or (settings.llm_api_key if shared else None)
        if api_key is None and provider == "compatible" and base_url:
            api_key = "unused"  # most local OpenAI-compatible servers ignore the key
        try:
            client = AsyncOpenAI(api_key=api_key, base_url=base_url, max_retries=0, timeout=60.0)
        except openai.OpenAIError:
            raise SettingsError(
                ["LLM_API_KEY"], ["LLM_API_KEY: OpenAI TTS needs an OpenAI key (or OPENAI_API_KEY)"]
            ) from None
        return cls(
            client,
            model=settings.tts_model,
            voice=settings.tts_voice or OPENAI_DEFAULT_VOICE,
            timeout_s=settings.tts_timeout_s,
        )

    async def synthesize(self, text: str) -> AsyncIterator[AudioClip]:
        """Yield 24 kHz clips of the sentence as the PCM streams in; nothing for blank text."""
        if not text.strip():
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        pending = bytearray()
        async with contextlib.AsyncExitStack() as stack:
            try:
                async with asyncio.timeout_at(deadline):
                    response = await stack.enter_async_context(
                        self.client.audio.speech.with_streaming_response.create(
                            model=self.model, voice=self.voice, input=text, response_format="pcm"
                        )
                    )
                chunks = aiter(response.iter_bytes())
                while True:
                    # The deadline covers the wait for bytes only, never the consumer's work.
                    async with asyncio.timeout_at(deadline):
                        chunk = await anext(chunks, None)
                    if chunk is None:
                        break
                    deadline = loop.time() + self.timeout_s
                    pending += chunk
                    if len(pending) >= self.clip_bytes:
                        yield _clip(pending)
            except TimeoutError:
                raise EngineError("tts", f"no audio within {self.timeout_s:g} s") from None
            except openai.OpenAIError as exc:
                status = getattr(exc, "status_code", None)
                reason = f"HTTP {status} from the API" if status else exc.__class__.__name__
                raise EngineError("tts", f"OpenAI speech: {reason}") from exc
            except httpx2.HTTPError as exc:
                raise EngineError("tts", f"OpenAI speech: {exc.__class__.__name__}") from exc
        if len(pending) >= 2:
            yield _clip(pending)


def _clip(pending: bytearray) -> AudioClip:
    """Take every whole sample out of `pending` (an odd trailing byte stays) as a clip."""
    usable = len(pending) - len(pending) % 2
    samples = np.frombuffer(bytes(pending[:usable]), dtype="<i2").astype(np.int16)
    del pending[:usable]
    return AudioClip(samples, OPENAI_PCM_RATE)
