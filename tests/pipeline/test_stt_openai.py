"""STT through an OpenAI-compatible transcription endpoint (the scripted fake on loopback)."""

from __future__ import annotations

import io
import socket
import time
import wave
from collections.abc import Iterator

import numpy as np
import pytest

from pipeline.engines import EngineError
from pipeline.stt_openai import OpenAiStt, wav_bytes
from tests.fakes.openai_server import FakeOpenAi
from voicebot.settings import load_settings


def speechish(seconds: float = 1.0) -> np.ndarray:
    t = np.arange(int(16000 * seconds)) / 16000
    return (0.2 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)


def test_audio_goes_out_as_a_16khz_mono_wav() -> None:
    data = wav_bytes(speechish(0.5))
    with wave.open(io.BytesIO(data)) as wav:
        assert (wav.getframerate(), wav.getnchannels(), wav.getsampwidth()) == (16000, 1, 2)
        assert wav.getnframes() == 8000


def test_a_transcript_comes_back_from_the_endpoint(fake_openai: FakeOpenAi) -> None:
    fake_openai.transcription.text = "  What time do you\nopen tomorrow?  "
    stt = OpenAiStt(fake_openai.base_url, "whisper-1", "sk-test", timeout_s=5)
    try:
        assert stt.transcribe(speechish()) == "What time do you open tomorrow?"
    finally:
        stt.close()
    request = fake_openai.requests[-1]
    assert request.path == "/v1/audio/transcriptions"
    assert request.headers.get("authorization") == "Bearer sk-test"


def test_settings_choose_the_endpoint_model_and_key(fake_openai: FakeOpenAi) -> None:
    settings = load_settings(stt_base_url=fake_openai.base_url, stt_model="embedded",
                             stt_api_key="sk-stt", llm_api_key="sk-llm")
    stt = OpenAiStt.from_settings(settings)
    try:
        assert stt.url == fake_openai.base_url + "/audio/transcriptions"
        assert stt.model == "whisper-1"  # "embedded" names the local model, not a remote one
    finally:
        stt.close()


def test_silence_is_not_sent(fake_openai: FakeOpenAi) -> None:
    stt = OpenAiStt(fake_openai.base_url)
    assert stt.transcribe(np.zeros(0, dtype=np.float32)) == ""
    assert fake_openai.requests == []
    stt.close()


def test_an_http_error_is_an_stt_engine_error(fake_openai: FakeOpenAi) -> None:
    fake_openai.transcription.status = 503
    stt = OpenAiStt(fake_openai.base_url, timeout_s=5)
    with pytest.raises(EngineError) as failed:
        stt.transcribe(speechish())
    stt.close()
    assert failed.value.stage == "stt" and "503" in failed.value.reason


@pytest.fixture
def silent_server() -> Iterator[str]:
    """A server that accepts connections and never answers."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        yield f"http://127.0.0.1:{server.getsockname()[1]}/v1"


def test_a_server_that_does_not_answer_times_out_as_an_stt_error(silent_server: str) -> None:
    stt = OpenAiStt(silent_server, timeout_s=0.3)
    started = time.monotonic()
    with pytest.raises(EngineError) as failed:
        stt.transcribe(speechish())
    stt.close()
    assert failed.value.stage == "stt" and "timed out" in failed.value.reason
    assert time.monotonic() - started < 2
