"""Running simulated calls against the real app in tests."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from starlette.applications import Starlette

from pipeline.conversation import Engines
from pipeline.events import CallEnded, CallEvent, PipelineEvent, TurnMetrics, UtteranceDone
from telephony.simulator import CallerTurn, SimulatedCaller, SimulationResult
from tests.fakes.openai_server import FakeOpenAi, RecordedRequest
from voicebot.app import create_app
from voicebot.local_server import running_server
from voicebot.settings import Settings


@dataclass
class Served:
    app: Starlette
    base_url: str
    events: list[PipelineEvent] = field(default_factory=list)
    _arrived: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def add(self, event: PipelineEvent) -> None:
        async with self._arrived:
            self.events.append(event)
            self._arrived.notify_all()

    async def wait_for(self, predicate: Callable[[PipelineEvent], bool],
                       wait_s: float = 30.0) -> PipelineEvent:
        """The first event (seen or to come) matching `predicate`."""
        async with asyncio.timeout(wait_s), self._arrived:
            while True:
                for event in self.events:
                    if predicate(event):
                        return event
                await self._arrived.wait()

    @property
    def media_url(self) -> str:
        return self.base_url.replace("http://", "ws://") + "/twilio/media"

    def utterances(self, call_sid: str) -> list[UtteranceDone]:
        return [e for e in self.events if isinstance(e, UtteranceDone) and e.call_sid == call_sid]

    def metrics(self, call_sid: str) -> list[TurnMetrics]:
        return [e for e in self.events if isinstance(e, TurnMetrics) and e.call_sid == call_sid]

    def call_events(self, call_sid: str, type_: str) -> list[CallEvent]:
        return [e for e in self.events
                if isinstance(e, CallEvent) and e.call_sid == call_sid and e.type == type_]

    async def call(self, fixtures_dir: Path, *wavs: str, pace: float = 3.0,
                   **caller: Any) -> tuple[SimulatedCaller, SimulationResult]:
        """One simulated call saying the fixture WAVs `wavs` in turn, until it has ended."""
        simulated = SimulatedCaller(self.media_url, pace=pace, **caller)
        result = await simulated.run([CallerTurn(wav=str(fixtures_dir / w)) for w in wavs])
        await self.ended(simulated.call_sid)
        return simulated, result

    async def ended(self, call_sid: str, wait_s: float = 10.0) -> CallEnded:
        event = await self.wait_for(
            lambda e: isinstance(e, CallEnded) and e.call_sid == call_sid, wait_s)
        await self.app.state.services.bus.drain()
        assert isinstance(event, CallEnded)
        return event


def reply_requests(fake: FakeOpenAi) -> list[RecordedRequest]:
    """The LLM requests that made replies (not the post-call or rolling summaries)."""
    return [r for r in fake.chat_requests
            if not r.messages[0]["content"].startswith(("You keep the memory",
                                                        "You keep short notes"))]


@contextlib.asynccontextmanager
async def serving(settings: Settings, engines: Engines) -> AsyncIterator[Served]:
    app = create_app(settings, engines=engines)
    async with running_server(app) as base:
        served = Served(app, base)

        app.state.services.bus.subscribe("test", served.add)
        yield served
