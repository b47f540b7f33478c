"""Speech to text through an OpenAI-compatible transcription endpoint.

`POST {STT_BASE_URL}/audio/transcriptions` (multipart: `file` = a 16 kHz mono 16-bit WAV,
`model`, `response_format=json`, `language`) answers `{"text": "..."}`. OpenAI serves it
(`whisper-1`, `gpt-4o-mini-transcribe`), and so do self-hosted faster-whisper servers
(speaches, faster-whisper-server, whisper.cpp's server), which is how the heavy model moves off
the call servers. Blocking, like `WhisperStt`: the conversation runs it in a worker thread.
"""

from __future__ import annotations

import io
import logging
import wave

import httpx
import numpy as np

from pipeline.engines import EngineError

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000
OPENAI_BASE_URL = "https://api.openai.com/v1"
DEFAULT_MODEL = "whisper-1"


def wav_bytes(audio: np.ndarray, rate: int = SAMPLE_RATE) -> bytes:
    """Float samples in [-1, 1] (or int16) as a mono 16-bit PCM WAV file."""
    if audio.dtype != np.int16:
        audio = np.clip(audio * 32767.0, -32768, 32767).astype(np.int16)
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(rate)
        wav.writeframes(audio.tobytes())
    return buffer.getvalue()


class OpenAiStt:
    """Transcribes one utterance with an OpenAI-compatible `/audio/transcriptions` endpoint."""

    name = "openai-stt"

    def __init__(
        self,
        base_url: str = OPENAI_BASE_URL,
        model: str = DEFAULT_MODEL,
        api_key: str | None = None,
        *,
        timeout_s: float = 6.0,
        language: str | None = "en",
        max_connections: int = 16,
    ) -> None:
        self.url = base_url.rstrip("/") + "/audio/transcriptions"
        self.model = model
        self.language = language
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        # One pooled client for the process: the TLS handshake is paid once, not per utterance.
        self._client = httpx.Client(
            headers=headers, timeout=httpx.Timeout(timeout_s),
            limits=httpx.Limits(max_connections=max_connections),
        )

    @classmethod
    def from_settings(cls, settings: object) -> OpenAiStt:
        """From `STT_BASE_URL`, `STT_MODEL`, `STT_API_KEY` (else `LLM_API_KEY`), `STT_TIMEOUT_S`."""
        model = getattr(settings, "stt_model", "") or ""
        key = getattr(settings, "stt_api_key", None) or getattr(settings, "llm_api_key", None)
        return cls(
            getattr(settings, "stt_base_url", None) or OPENAI_BASE_URL,
            model if model not in ("", "embedded") else DEFAULT_MODEL,
            key,
            timeout_s=float(getattr(settings, "stt_timeout_s", 6.0)),
        )

    def transcribe(self, audio: np.ndarray) -> str:
        if audio.size == 0:
            return ""
        data = {"model": self.model, "response_format": "json"}
        if self.language:
            data["language"] = self.language
        files = {"file": ("utterance.wav", wav_bytes(audio), "audio/wav")}
        try:
            response = self._client.post(self.url, data=data, files=files)
        except httpx.TimeoutException as exc:
            raise EngineError("stt", f"transcription timed out ({type(exc).__name__})") from exc
        except httpx.HTTPError as exc:
            raise EngineError("stt", f"transcription request failed ({type(exc).__name__})") from exc
        if response.status_code != 200:
            raise EngineError("stt", f"transcription endpoint answered HTTP {response.status_code}")
        try:
            text = response.json()["text"]
        except (ValueError, KeyError, TypeError) as exc:
            raise EngineError("stt", "transcription endpoint answered without 'text'") from exc
        return " ".join(str(text).split())

    def close(self) -> None:
        self._client.close()
