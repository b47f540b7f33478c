"""Helpers for the viewer's tests: the app with the viewer mounted, engines for call-free
tests, scripted pipeline events, and headless Chromium."""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
from starlette.applications import Starlette

from pipeline.conversation import Engines
from pipeline.events import (
    CallEnded,
    CallEvent,
    CallStarted,
    PipelineEvent,
    TurnMetrics,
    UtteranceDone,
)
from voicebot.app import create_app
from voicebot.settings import Settings
from web.auth import ViewerAuth
from web.live import LiveFeed
from web.routes import web_routes

BUILD = Path(__file__).resolve().parents[2] / "build"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--autoplay-policy=no-user-gesture-required",
]


def chromium_path() -> str:
    return os.environ.get("VOICEBOT_CHROMIUM", "/usr/bin/chromium")


def with_viewer(app: Starlette) -> Starlette:
    """The viewer's routes, login middleware and live feed on an app from `create_app`,
    each only if the app factory does not provide it already."""
    paths = {getattr(route, "path", None) for route in app.router.routes}
    if "/talk" not in paths:
        app.router.routes.extend(web_routes())
    if not any(m.cls is ViewerAuth for m in app.user_middleware):
        app.add_middleware(ViewerAuth)
    inner = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[Any]:
        async with inner(app) as state:
            feed: LiveFeed | None = None
            if getattr(app.state, "live", None) is None:
                settings = app.state.services.settings
                feed = LiveFeed(settings.redis_url, namespace=settings.redis_namespace)
                app.state.live = feed
                app.state.services.bus.subscribe("live", feed.handle)
                await feed.start()
            try:
                yield state
            finally:
                if feed is not None:
                    await feed.stop()

    app.router.lifespan_context = lifespan
    return app


def viewer_app(settings: Settings, engines: Engines, listen_host: str | None = None) -> Starlette:
    app = with_viewer(create_app(settings, engines=engines))
    if listen_host is not None:
        app.state.listen_host = listen_host
    return app


class _Unused:
    """A test double that is honest about it: these tests place no call, so any use fails."""

    def __init__(self, role: str) -> None:
        self._role = role

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"the {self._role} engine is not available in this test")

    def __call__(self, *args: object, **kwargs: object) -> Any:
        raise AssertionError(f"the {self._role} engine is not available in this test")


def idle_engines(settings: Settings) -> Engines:
    """Engines for tests that place no call; the fixed phrases are cached, so warm-up needs
    no TTS."""
    return Engines(
        stt=_Unused("stt"), llm=_Unused("llm"), tts=_Unused("tts"),  # type: ignore[arg-type]
        vad=_Unused("vad"), stt_limiter=anyio.CapacityLimiter(1),  # type: ignore[arg-type]
        phrase_cache={settings.greeting: b"", settings.apology: b""},
    )


T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)

LONG_REPLY = (
    "Our prices depend on the day. Lunch is fifteen dollars for two courses. Dinner is "
    "thirty dollars for three courses."
)


def scripted_call(call_sid: str, t0: datetime = T0, number: str = "+15550101234"
                  ) -> list[PipelineEvent]:
    """What a two-turn call with a barge-in, a DTMF digit and an STT error emits."""

    def at(seconds: float) -> datetime:
        return t0 + timedelta(seconds=seconds)

    return [
        CallStarted(call_sid, "MZ" + call_sid, number, "+18005550000", "inbound", at(0)),
        UtteranceDone(call_sid, 0, "bot", "Hello! How can I help?", at(0.1), at(2.0)),
        UtteranceDone(call_sid, 1, "caller", "Are you open tomorrow?", at(2.5), at(4.0)),
        TurnMetrics(call_sid, 1, endpoint_ms=500, stt_ms=180, stt_wait_ms=120,
                    llm_first_token_ms=90, llm_first_sentence_ms=260, tts_first_chunk_ms=55,
                    v2v_ms=950, overhead_ms=15),
        UtteranceDone(call_sid, 1, "bot", "Our prices depend on the day.", at(5.0), at(7.1),
                      generated_text=LONG_REPLY, interrupted=True),
        CallEvent(call_sid, "barge_in", {"clear_ms": 42.5}, at(6.9)),
        UtteranceDone(call_sid, 2, "caller", "How much is lunch?", at(6.8), at(8.0)),
        TurnMetrics(call_sid, 2, endpoint_ms=500, stt_wait_ms=100, llm_first_sentence_ms=300,
                    tts_first_chunk_ms=60, v2v_ms=1000, overhead_ms=40),
        UtteranceDone(call_sid, 2, "bot", "Lunch is fifteen dollars.", at(9.0), at(11.0),
                      generated_text="Lunch is fifteen dollars."),
        CallEvent(call_sid, "dtmf", {"digit": "5"}, at(12.0)),
        CallEvent(call_sid, "error", {"stage": "stt", "reason": "timed out"}, at(13.0)),
        CallEnded(call_sid, at(15.0), "stop"),
    ]


def call_free_settings(tmp_path: Path, **ui: object) -> Settings:
    """Settings on a temporary SQLite file; `ui` sets the viewer's settings (UI_PASSWORD...)
    whether or not the settings class declares them yet."""
    from voicebot.settings import load_settings

    settings = load_settings(database_url=f"sqlite:///{tmp_path}/viewer.db",
                             db_spool_dir=str(tmp_path / "spool"), public_url=None)
    return settings.model_copy(update=ui)
