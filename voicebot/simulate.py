"""`voicebot simulate`: a simulated Twilio call from WAV files, printed as a conversation."""

from __future__ import annotations

import contextlib
import statistics
from collections.abc import AsyncIterator

from pipeline.events import PipelineEvent, TurnMetrics, UtteranceDone
from telephony.simulator import CallerTurn, SimulatedCaller, SimulationResult
from voicebot.settings import Settings


@contextlib.asynccontextmanager
async def _target(settings: Settings, url: str | None,
                  events: list[PipelineEvent]) -> AsyncIterator[str]:
    if url:
        yield url
        return
    from voicebot.app import create_app
    from voicebot.local_server import running_server

    app = create_app(settings)
    async with running_server(app) as base:

        async def collect(event: PipelineEvent) -> None:
            events.append(event)

        app.state.services.bus.subscribe("simulate", collect)
        yield base.replace("http://", "ws://") + "/twilio/media"


def format_result(result: SimulationResult, events: list[PipelineEvent]) -> str:
    lines = [f"call {result.call_sid} (pace {result.pace:g}x)"]
    if result.greeting_latency_ms is not None:
        lines.append(f"  greeting: first audio {result.greeting_latency_ms:.0f} ms after start")
    for event in events:
        if isinstance(event, UtteranceDone) and event.call_sid == result.call_sid:
            who = "caller" if event.role == "caller" else "bot   "
            cut = " [interrupted]" if event.interrupted else ""
            lines.append(f"  {who}: {event.text}{cut}")
        elif isinstance(event, TurnMetrics) and event.call_sid == result.call_sid:
            lines.append(
                f"          v2v {event.v2v_ms} ms = endpoint {event.endpoint_ms} + stt wait "
                f"{event.stt_wait_ms} (stt {event.stt_ms}) + llm 1st sentence "
                f"{event.llm_first_sentence_ms} + tts {event.tts_first_chunk_ms} + overhead "
                f"{event.overhead_ms}"
            )
    for turn in result.turns:
        latency = "no reply" if turn.latency_ms is None else f"{turn.latency_ms:.0f} ms"
        lines.append(f"  turn {turn.label}: end of speech → first bot audio {latency}")
    latencies = [t.latency_ms for t in result.turns if t.latency_ms is not None]
    if latencies:
        lines.append(f"  median latency {statistics.median(latencies):.0f} ms")
    return "\n".join(lines)


async def run_simulation(settings: Settings, wavs: list[str], *, url: str | None = None,
                         pace: float = 1.0, digits: str = "") -> int:
    events: list[PipelineEvent] = []
    turns = [CallerTurn(wav=w) for w in wavs] + [CallerTurn(digit=d) for d in digits]
    async with _target(settings, url, events) as target:
        signed_url = None
        if settings.public_url:
            from urllib.parse import urlsplit

            signed_url = f"wss://{urlsplit(settings.public_url).netloc}/twilio/media"
        caller = SimulatedCaller(target, pace=pace, auth_token=settings.twilio_auth_token,
                                 signed_url=signed_url)
        result = await caller.run(turns)
        if not url:
            # Let the last events reach the collector before printing.
            import asyncio

            await asyncio.sleep(0.2)
    print(format_result(result, events))
    return 0 if all(t.latency_ms is not None for t in result.turns) else 1
