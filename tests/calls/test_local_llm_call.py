"""One call on the fully embedded stack: the local SmolLM2 model through llama.cpp."""

from __future__ import annotations

import anyio
import pytest

from pipeline.conversation import Engines
from pipeline.factory import build_vad_factory
from pipeline.llm_local import LlamaCppLlm
from pipeline.stt import WhisperStt
from pipeline.tts_piper import PiperTts
from telephony.simulator import CallerTurn, SimulatedCaller
from tests.callkit import serving
from voicebot.settings import load_settings

pytestmark = pytest.mark.slow


async def test_the_embedded_local_llm_answers_a_call(
    stt: WhisperStt, tts: PiperTts, fixtures_dir, tmp_path
) -> None:
    settings = load_settings(database_url=f"sqlite:///{tmp_path}/local.db")
    assert settings.resolved_llm_provider == "local"
    llm = LlamaCppLlm.from_settings(settings)
    await anyio.to_thread.run_sync(llm.warm_up, settings.system_prompt)
    engines = Engines(stt=stt, llm=llm, tts=tts, vad=build_vad_factory(settings),
                      stt_limiter=anyio.CapacityLimiter(1))
    try:
        async with serving(settings, engines) as served:
            caller = SimulatedCaller(served.media_url, pace=2.0)
            result = await caller.run([CallerTurn(wav=str(fixtures_dir / "open_hours.wav"))])
            await served.ended(caller.call_sid)
    finally:
        await anyio.to_thread.run_sync(llm.close)
    assert result.turns[0].latency_ms is not None
    bot = [u for u in served.utterances(caller.call_sid) if u.role == "bot"]
    reply = bot[-1]
    assert reply.text and reply.text != settings.apology
    assert not served.call_events(caller.call_sid, "error")
    assert len(result.received_audio) > 8000  # more than a second of speech came back
