"""Call control on simulated calls: the bot ends calls, transfers them, handles silence, a
keypad menu, and answering machines; hang-ups and transfers go through (fake) Twilio REST."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from twilio.request_validator import RequestValidator

from pipeline.call_control import CALL_TOOLS
from pipeline.conversation import Engines
from pipeline.events import CallEvent, UtteranceDone
from telephony.simulator import CallerTurn, SimulatedCaller
from tests.callkit import reply_requests, serving
from tests.fakes.openai_server import FakeOpenAi, Rule, ToolCall
from tests.fakes.twilio_server import FakeTwilio
from voicebot.settings import Settings

pytestmark = pytest.mark.slow


@pytest.fixture
def twilio() -> Iterator[FakeTwilio]:
    with FakeTwilio() as fake:
        yield fake


def with_twilio(settings: Settings, fake: FakeTwilio, **more: object) -> Settings:
    return settings.model_copy(update={
        "twilio_account_sid": fake.account_sid, "twilio_auth_token": fake.auth_token,
        "twilio_api_base": fake.url, **more})


def twilio_caller(served, fake: FakeTwilio, call_sid: str, pace: float = 3.0,
                  signed_url: str | None = None) -> SimulatedCaller:
    caller = SimulatedCaller(served.media_url, pace=pace, auth_token=fake.auth_token,
                             signed_url=signed_url)
    caller.call_sid = caller.result.call_sid = call_sid
    return caller


def bot_lines(served, call_sid: str) -> list[UtteranceDone]:
    return [u for u in served.utterances(call_sid) if u.role == "bot"]


async def test_caller_says_goodbye_and_the_bot_ends_the_call(
    settings: Settings, engines: Engines, fake_openai: FakeOpenAi, fixtures_dir
) -> None:
    fake_openai.script(Rule(when="goodbye", reply="Goodbye, have a lovely evening!"))
    async with serving(settings, engines) as served:
        caller = SimulatedCaller(served.media_url, pace=3.0)
        result = await caller.run([CallerTurn(wav=str(fixtures_dir / "goodbye.wav")),
                                   CallerTurn(silence_ms=10_000)])
        ended = await served.ended(caller.call_sid)
    assert result.closed_by_server
    assert ended.reason == "bot_caller_goodbye"
    last = bot_lines(served, caller.call_sid)[-1]
    assert last.text == "Goodbye, have a lovely evening!" and not last.interrupted


async def test_llm_end_call_tool_hangs_up_through_rest_after_the_goodbye_is_heard(
    settings: Settings, engines: Engines, fake_openai: FakeOpenAi, fixtures_dir,
    twilio: FakeTwilio, monkeypatch
) -> None:
    monkeypatch.setattr(engines.llm, "tools", CALL_TOOLS)
    fake_openai.script(Rule(when="open", reply="Nine o'clock. Bye now!",
                            tool_call=ToolCall("end_call", {})))
    sid = twilio.add_call()
    async with serving(with_twilio(settings, twilio), engines) as served:
        caller = twilio_caller(served, twilio, sid)
        await caller.run([CallerTurn(wav=str(fixtures_dir / "open_hours.wav")),
                          CallerTurn(silence_ms=10_000)])
        ended = await served.ended(sid)
    assert fake_openai.chat_requests[0].body["tools"] == CALL_TOOLS
    hang_ups = [r for r in twilio.of("POST", f"/Calls/{sid}.json")
                if r.form.get("Status") == "completed"]
    assert len(hang_ups) == 1
    assert ended.reason == "bot_llm"
    last = bot_lines(served, sid)[-1]
    assert last.text == "Nine o'clock. Bye now!" and not last.interrupted


async def test_caller_asks_for_a_human_and_is_transferred(
    settings: Settings, engines: Engines, fake_openai: FakeOpenAi, fixtures_dir,
    twilio: FakeTwilio
) -> None:
    sid = twilio.add_call()
    configured = with_twilio(settings, twilio, transfer_number="+15550009999")
    async with serving(configured, engines) as served:
        caller = twilio_caller(served, twilio, sid)
        await caller.run([CallerTurn(wav=str(fixtures_dir / "human.wav")),
                          CallerTurn(silence_ms=10_000)])
        ended = await served.ended(sid)
    redirects = [r for r in twilio.of("POST", f"/Calls/{sid}.json") if "Twiml" in r.form]
    assert len(redirects) == 1
    twiml = str(redirects[0].form["Twiml"])
    assert "<Dial" in twiml and "+15550009999" in twiml
    assert ended.reason == "transfer"
    assert bot_lines(served, sid)[-1].text == configured.transfer_message
    assert served.call_events(sid, "transfer")[0].detail == {"number": "+15550009999"}
    assert not reply_requests(fake_openai)  # the phrase fallback needed no LLM round trip


async def test_a_silent_caller_is_reprompted_then_hung_up(
    settings: Settings, engines: Engines, fake_openai: FakeOpenAi
) -> None:
    quick = settings.model_copy(update={"idle_reprompt_s": 1.0, "idle_hangup_s": 1.5})
    async with serving(quick, engines) as served:
        caller = SimulatedCaller(served.media_url, pace=4.0)
        result = await caller.run([CallerTurn(silence_ms=20_000)])
        ended = await served.ended(caller.call_sid)
    assert result.closed_by_server
    assert ended.reason == "bot_idle"
    assert [u.text for u in bot_lines(served, caller.call_sid)] == [
        quick.greeting, quick.reprompt, quick.goodbye]


async def test_keypad_menu_answers_and_hangs_up_without_the_llm(
    settings: Settings, engines: Engines, fake_openai: FakeOpenAi
) -> None:
    menu = settings.model_copy(update={"dtmf_menu": "1:say We are open nine to five.; 9:hangup"})
    async with serving(menu, engines) as served:
        caller = SimulatedCaller(served.media_url, pace=4.0)
        await caller.run([CallerTurn(digit="1"), CallerTurn(digit="9"),
                          CallerTurn(silence_ms=10_000)])
        ended = await served.ended(caller.call_sid)
    assert [u.text for u in bot_lines(served, caller.call_sid)][1:] == [
        "We are open nine to five.", menu.goodbye]
    assert ended.reason == "bot_dtmf"
    assert not reply_requests(fake_openai)


async def test_answering_machine_gets_the_message_and_a_hang_up(
    settings: Settings, engines: Engines, fake_openai: FakeOpenAi, twilio: FakeTwilio
) -> None:
    sid = twilio.add_call()
    configured = with_twilio(settings, twilio, public_url="https://bot.example.com",
                             machine_message="Hi, this is the clinic. Please call us back.")
    async with serving(configured, engines) as served:
        caller = twilio_caller(served, twilio, sid,
                               signed_url="wss://bot.example.com/twilio/media")
        params = {"CallSid": sid, "AnsweredBy": "machine_end_beep",
                  "MachineDetectionDuration": "2100"}
        signature = RequestValidator(twilio.auth_token).compute_signature(
            "https://bot.example.com/twilio/amd", params)
        caller_task = caller.run([CallerTurn(silence_ms=1500)])
        async with httpx.AsyncClient(base_url=served.base_url) as http:
            answer = await http.post("/twilio/amd", data=params,
                                     headers={"X-Twilio-Signature": signature})
        await caller_task
        await served.ended(sid)
    assert answer.status_code < 300
    redirect = next(r for r in twilio.of("POST", f"/Calls/{sid}.json") if "Twiml" in r.form)
    twiml = str(redirect.form["Twiml"])
    assert "Please call us back." in twiml and "<Hangup" in twiml
    amd = [e for e in served.events if isinstance(e, CallEvent) and e.type == "amd"]
    assert amd and amd[0].detail["answered_by"] == "machine_end_beep"
