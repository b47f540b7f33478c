"""Pytest fixtures for the fakes. Register them for the whole suite with
`pytest_plugins = ["tests.fakes.fixtures"]` in the top-level `tests/conftest.py`.

One server per test session (starting uvicorn costs tens of milliseconds); the function-scoped
fixtures reset the script and the recorded requests before each test.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.fakes.gtts_server import FakeGtts
from tests.fakes.openai_server import FakeOpenAi


@pytest.fixture(scope="session")
def fake_openai_server() -> Iterator[FakeOpenAi]:
    with FakeOpenAi() as server:
        yield server


@pytest.fixture
def fake_openai(fake_openai_server: FakeOpenAi) -> FakeOpenAi:
    """The scripted OpenAI-compatible server, with no rules and no recorded requests."""
    fake_openai_server.reset()
    return fake_openai_server


@pytest.fixture(scope="session")
def fake_gtts_server() -> Iterator[FakeGtts]:
    with FakeGtts() as server:
        yield server


@pytest.fixture
def fake_gtts(fake_gtts_server: FakeGtts) -> Iterator[FakeGtts]:
    """The fake Google TTS endpoint, with gTTS pointed at it for this test."""
    fake_gtts_server.status = None
    fake_gtts_server.no_audio = False
    fake_gtts_server.delay_s = 0.0
    fake_gtts_server.requests.clear()
    with fake_gtts_server.pointed_at():
        yield fake_gtts_server
