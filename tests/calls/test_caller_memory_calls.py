"""A second call from the same number gets the first call's summary in its context."""

from __future__ import annotations

import pytest

from pipeline.conversation import Engines
from telephony.simulator import CallerTurn, SimulatedCaller
from tests.callkit import reply_requests, serving
from tests.fakes.openai_server import FakeOpenAi, Rule
from voicebot.settings import Settings

pytestmark = pytest.mark.slow

SUMMARY = "Jane asked when the restaurant opens and booked a table for two tonight."


async def test_a_returning_caller_is_remembered(
    settings: Settings, engines: Engines, fake_openai: FakeOpenAi, fixtures_dir
) -> None:
    fake_openai.script(
        Rule(when="Updated memory", reply=SUMMARY),  # the post-call summary request
        Rule(when="open", reply="We open at nine."),
        Rule(when="table", reply="Welcome back. Booked again."),
    )
    async with serving(settings, engines) as served:
        first = SimulatedCaller(served.media_url, pace=3.0, from_number="+15550102030")
        await first.run([CallerTurn(wav=str(fixtures_dir / "open_hours.wav"))])
        await served.ended(first.call_sid)
        await served.app.state.services.caller_memory.wait_idle()

        other = SimulatedCaller(served.media_url, pace=3.0, from_number="+15559999999")
        await other.run([CallerTurn(wav=str(fixtures_dir / "book_table.wav"))])
        await served.ended(other.call_sid)
        other_system = reply_requests(fake_openai)[-1].messages[0]["content"]

        second = SimulatedCaller(served.media_url, pace=3.0, from_number="+15550102030")
        await second.run([CallerTurn(wav=str(fixtures_dir / "book_table.wav"))])
        await served.ended(second.call_sid)

    summary_requests = [r for r in fake_openai.chat_requests
                        if "Updated memory" in r.last_user_message]
    assert summary_requests and "open tomorrow" in summary_requests[0].last_user_message.lower()
    # The summary request never carries the caller's number.
    assert "5550102030" not in summary_requests[0].last_user_message
    system = reply_requests(fake_openai)[-1].messages[0]["content"]
    assert SUMMARY in system
    assert SUMMARY not in other_system  # a different number knows nothing of Jane
