"""Fixtures for the viewer's tests. The engines for simulated calls are the same as in
`tests/calls/conftest.py` (real VAD, STT and TTS; the LLM behind the scripted fake server)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

import tests.callkit
from pipeline.conversation import Engines
from pipeline.factory import build_vad_factory
from pipeline.llm_openai import OpenAiLlm
from pipeline.stt import WhisperStt
from pipeline.tts_piper import PiperTts
from tests.fakes.openai_server import FakeOpenAi
from tests.web.viewerkit import BUILD, with_viewer
from voicebot.app import create_app
from voicebot.settings import Settings, load_settings


@pytest.fixture(scope="session")
def stt() -> WhisperStt:
    return WhisperStt()


@pytest.fixture(scope="session")
def tts() -> PiperTts:
    return PiperTts()


@pytest.fixture
def settings(fake_openai: FakeOpenAi, tmp_path: Path) -> Settings:
    return load_settings(
        llm_base_url=fake_openai.base_url, llm_model="scripted", llm_timeout_s=2.0,
        database_url=f"sqlite:///{tmp_path}/calls.db", db_spool_dir=str(tmp_path / "spool"),
        public_url=None,
    )


@pytest.fixture
def engines(settings: Settings, stt: WhisperStt, tts: PiperTts) -> Engines:
    return Engines(
        stt=stt, llm=OpenAiLlm.from_settings(settings), tts=tts,
        vad=build_vad_factory(settings), stt_limiter=anyio.CapacityLimiter(1),
    )


@pytest.fixture
def viewer_serving(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Make `tests.callkit.serving` build its app with the viewer mounted."""
    monkeypatch.setattr(tests.callkit, "create_app",
                        lambda *args, **kwargs: with_viewer(create_app(*args, **kwargs)))
    yield


@pytest.fixture(scope="session")
def build_dir() -> Path:
    BUILD.mkdir(exist_ok=True)
    return BUILD
