"""A simulated call leaves a complete, ordered transcript with metrics in the database."""

from __future__ import annotations

import httpx
import pytest

from pipeline.conversation import Engines
from telephony.simulator import CallerTurn, SimulatedCaller
from tests.callkit import serving
from tests.fakes.openai_server import FakeOpenAi, Rule
from voicebot.settings import Settings

pytestmark = pytest.mark.slow


async def test_simulated_call_is_stored_with_transcript_metrics_and_events(
    settings: Settings, engines: Engines, fake_openai: FakeOpenAi, fixtures_dir
) -> None:
    fake_openai.script(
        Rule(when="open", reply="We open at nine."),
        Rule(when="pressed 2", reply="Two it is."),
        Rule(when="table", reply="Booked for two."),
    )
    async with serving(settings, engines) as served:
        caller = SimulatedCaller(served.media_url, pace=3.0, from_number="+15550001111")
        await caller.run([
            CallerTurn(wav=str(fixtures_dir / "open_hours.wav")),
            CallerTurn(digit="2"),
            CallerTurn(wav=str(fixtures_dir / "book_table.wav")),
        ])
        await served.ended(caller.call_sid)
        await served.app.state.recorder.wait_caught_up()
        async with httpx.AsyncClient(base_url=served.base_url) as http:
            listing = (await http.get("/api/calls", params={"number": "0001111"})).json()
            detail = (await http.get(f"/api/calls/{caller.call_sid}")).json()

    assert [c["call_sid"] for c in listing["calls"]] == [caller.call_sid]
    call = detail  # call fields at the top level, with utterances, metrics, events
    assert call["from_number"] == "+15550001111"
    assert call["end_reason"] == "stop" and call["ended_at"]
    roles_texts = [(u["role"], u["text"]) for u in detail["utterances"]]
    assert roles_texts[0] == ("bot", settings.greeting)
    assert roles_texts[1][0] == "caller" and "open tomorrow" in roles_texts[1][1].lower()
    assert roles_texts[2] == ("bot", "We open at nine.")
    assert roles_texts[3] == ("bot", "Two it is.")
    assert roles_texts[4][0] == "caller" and "table for two" in roles_texts[4][1].lower()
    assert roles_texts[5] == ("bot", "Booked for two.")
    starts = [u["started_at"] for u in detail["utterances"]]
    assert starts == sorted(starts)
    metrics = detail["metrics"]
    assert len(metrics) == 3
    assert all(m["v2v_ms"] > 0 and m["stt_ms"] is not None for m in metrics if m["turn"] != 2)
    assert any(e["type"] == "dtmf" for e in detail["events"])
