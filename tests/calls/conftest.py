"""Engines for simulated calls: real Silero VAD, real faster-whisper, real Piper, and the LLM
behind the scripted OpenAI-compatible server on loopback."""

from __future__ import annotations

import anyio
import pytest

from pipeline.conversation import Engines
from pipeline.factory import build_vad_factory
from pipeline.llm_openai import OpenAiLlm
from pipeline.stt import WhisperStt
from pipeline.tts_piper import PiperTts
from tests.fakes.openai_server import FakeOpenAi
from voicebot.settings import Settings, load_settings


@pytest.fixture(scope="session")
def stt() -> WhisperStt:
    return WhisperStt()


@pytest.fixture(scope="session")
def tts() -> PiperTts:
    return PiperTts()


@pytest.fixture
def settings(fake_openai: FakeOpenAi, tmp_path) -> Settings:
    return load_settings(
        llm_base_url=fake_openai.base_url, llm_model="scripted", llm_timeout_s=2.0,
        database_url=f"sqlite:///{tmp_path}/calls.db", public_url=None,
    )


@pytest.fixture
def engines(settings: Settings, stt: WhisperStt, tts: PiperTts) -> Engines:
    return Engines(
        stt=stt, llm=OpenAiLlm.from_settings(settings), tts=tts,
        vad=build_vad_factory(settings), stt_limiter=anyio.CapacityLimiter(1),
    )
