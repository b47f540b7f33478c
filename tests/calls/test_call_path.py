"""Simulated Twilio calls through the real /twilio/media endpoint: real VAD, STT and TTS, and
scripted LLM replies from the fake OpenAI-compatible server."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from pipeline.conversation import Engines
from pipeline.engines import EngineError
from telephony.simulator import CallerTurn, SimulatedCaller
from tests.callkit import reply_requests, serving
from tests.fakes.openai_server import FakeOpenAi, Rule
from voicebot.settings import Settings

pytestmark = pytest.mark.slow

LONG_REPLY = (
    "Our prices depend on the day. Lunch is fifteen dollars for two courses. Dinner is "
    "thirty dollars for three courses. Drinks are extra, and there is a special on Sundays."
)


async def test_multi_turn_call_is_heard_answered_and_remembered(
    settings: Settings, engines: Engines, fake_openai: FakeOpenAi, fixtures_dir
) -> None:
    fake_openai.script(
        Rule(when="open", reply="We open at nine tomorrow morning."),
        Rule(when="table", reply="Sure, a table for two tonight. What time?"),
        default_reply="Okay.",
    )
    async with serving(settings, engines) as served:
        caller, result = await served.call(fixtures_dir, "open_hours.wav", "book_table.wav")

    said = [(u.role, u.text) for u in served.utterances(caller.call_sid)]
    caller_lines = [text.lower() for role, text in said if role == "caller"]
    assert len(caller_lines) == 2
    assert "open tomorrow" in caller_lines[0]
    assert "table for two" in caller_lines[1]
    bot_lines = [text for role, text in said if role == "bot"]
    assert bot_lines == [settings.greeting, "We open at nine tomorrow morning.",
                         "Sure, a table for two tonight. What time?"]
    # The second turn's request carries the first exchange: the bot remembers within the
    # call. (A pause inside the first utterance may have started a speculative request for
    # it too, so the second turn's request is found by its words, not by its position.)
    second = next(r.messages for r in reply_requests(fake_openai)
                  if "table" in r.messages[-1]["content"].lower())
    assert [m["role"] for m in second] == ["system", "assistant", "user", "assistant", "user"]
    assert second[1]["content"] == settings.greeting
    assert second[3]["content"] == "We open at nine tomorrow morning."
    assert all(turn.latency_ms is not None for turn in result.turns)
    assert result.greeting_latency_ms is not None and result.greeting_latency_ms < 100
    assert result.clears == []
    metrics = served.metrics(caller.call_sid)
    assert len(metrics) == 2 and all(m.v2v_ms and m.overhead_ms is not None for m in metrics)
    # Own overhead: everything but model time and the endpointing wait.
    assert all(m.overhead_ms < 20 for m in metrics)
    assert (await served.ended(caller.call_sid)).reason == "stop"


async def test_barge_in_sends_clear_within_half_a_second_and_keeps_only_what_was_heard(
    settings: Settings, engines: Engines, fake_openai: FakeOpenAi, fixtures_dir
) -> None:
    """Real time (pace 1): pacing and clear timing bugs only show there."""
    fake_openai.script(Rule(when="open", reply=LONG_REPLY), default_reply="Of course.")
    async with serving(settings, engines) as served:
        caller = SimulatedCaller(served.media_url, pace=1.0)
        result = await caller.run([
            CallerTurn(wav=str(fixtures_dir / "open_hours.wav")),
            CallerTurn(wav=str(fixtures_dir / "prices.wav"), barge_in_after_ms=1500),
        ])
        await served.ended(caller.call_sid)

    interrupting = result.turns[1]
    # The interruption's `clear` is the first after the caller starts talking over the bot.
    # (Others may come: the turn's end repeating it within milliseconds, or, on a loaded
    # machine now and then, a turn cut in two at its pause, its second half stopping the
    # bot's answer to the first, in either exchange.)
    after = [c for c in result.clears if c > interrupting.speech_started_at]
    server_side = served.call_events(caller.call_sid, "barge_in")[0].detail["clear_ms"]
    bot = [u for u in served.utterances(caller.call_sid) if u.role == "bot"]
    cut = bot[1]
    # The server decides within 0.5 s of the VAD's onset (245–373 ms on an idle machine,
    # up to ~475 ms with the models busy). The caller's clock also counts how long the VAD
    # takes to be sure of speech: "Ac-" (130 ms, then a dip) is caught at once or, with
    # some alignments of the 32 ms windows, only at "-tually", 0.3 s later (measured
    # 0.31–0.48 s, and 0.64–0.65 s in about one run of four).
    assert 0 < server_side < 500, f"server decided after {server_side} ms"
    if after:
        clear_after_s = after[0] - interrupting.speech_started_at
        assert 0 < clear_after_s < 0.8, (
            f"clear after {clear_after_s:.3f} s (server: {server_side} ms)")
    else:
        # On a loaded machine the caller may start just as a sentence has played and before
        # the next is synthesized: nothing is playing, so no `clear`; the next sentence is
        # held and never plays. The caller heard whole sentences only, none after they began.
        assert cut.text.endswith("."), (result.clears, cut.text)
    assert cut.interrupted
    assert cut.generated_text == LONG_REPLY
    assert cut.text and LONG_REPLY.startswith(cut.text) and len(cut.text) < len(LONG_REPLY)
    # About 1.5 s was heard: the first sentence, maybe a little more; never the whole reply.
    assert cut.text.startswith("Our prices depend on the day.")
    # History keeps only the heard part, and the caller's new question got its own answer.
    last = reply_requests(fake_openai)[-1].messages
    said = [m["content"] for m in last if m["role"] == "assistant"]
    assert any(text.startswith(cut.text) for text in said)
    assert not any("Sunday" in text for text in said)
    assert bot[-1].text == "Of course." and not bot[-1].interrupted
    assert served.call_events(caller.call_sid, "barge_in")


async def test_a_click_while_the_bot_speaks_does_not_interrupt(
    settings: Settings, engines: Engines, fake_openai: FakeOpenAi, fixtures_dir
) -> None:
    fake_openai.script(Rule(when="open", reply=LONG_REPLY))
    async with serving(settings, engines) as served:
        # Real time, as Twilio streams: at twice real time the barge-in policy's wall-clock
        # bounds (verdict timeout, decide-within) see half the audio they are set for.
        caller = SimulatedCaller(served.media_url, pace=1.0)
        result = await caller.run([
            CallerTurn(wav=str(fixtures_dir / "open_hours.wav")),
            CallerTurn(wav=str(fixtures_dir / "click.wav"), barge_in_after_ms=800),
        ])
        await served.ended(caller.call_sid)
    bot = [u for u in served.utterances(caller.call_sid) if u.role == "bot"]
    assert bot[-1].text == LONG_REPLY and not bot[-1].interrupted
    # A click is no interruption: on an idle machine the bot does not even pause. When the
    # click's partial transcript comes later than the verdict timeout (a loaded machine, as
    # in a full test run now and then), the policy pauses to be safe (pipeline/backchannel.py,
    # rule 4); then the bot must have resumed at once, as a false interruption.
    paused = served.call_events(caller.call_sid, "barge_in")
    assert len(paused) == len(result.clears) <= 1
    assert all(e.detail["class"] == "false_interruption" and e.detail["resume_ms"] < 1000
               for e in paused), ([e.detail for e in paused],
                                  [(u.role, u.text) for u in served.utterances(caller.call_sid)],
                                  [e.detail for e in served.call_events(caller.call_sid, "turn_end")])


async def test_dtmf_digits_reach_the_conversation(
    settings: Settings, engines: Engines, fake_openai: FakeOpenAi
) -> None:
    fake_openai.script(Rule(when="pressed 1", reply="You chose sales."))
    async with serving(settings, engines) as served:
        caller = SimulatedCaller(served.media_url, pace=4.0)
        await caller.run([CallerTurn(digit="1")])
        await served.ended(caller.call_sid)
    assert "pressed 1" in reply_requests(fake_openai)[-1].last_user_message
    assert served.call_events(caller.call_sid, "dtmf")[0].detail == {"digit": "1"}
    bot = [u.text for u in served.utterances(caller.call_sid) if u.role == "bot"]
    assert bot[-1] == "You chose sales."


async def test_llm_failure_mid_call_plays_an_apology_and_the_call_goes_on(
    settings: Settings, engines: Engines, fake_openai: FakeOpenAi, fixtures_dir
) -> None:
    fake_openai.script(
        Rule(when="open", status=500),
        Rule(when="table", reply="Booked for two."),
    )
    async with serving(settings, engines) as served:
        # At three times real time, the caller's 700 ms of quiet that ends a reply is 233 ms
        # of wall time: a hiccup of the loaded test process in the middle of the apology made
        # it speak over the rest (twice in four CI runs on 2026-12-06, stored "Sorry, I").
        caller, result = await served.call(fixtures_dir, "open_hours.wav", "book_table.wav",
                                           quiet_after_reply_ms=2000.0)
    assert all(t.latency_ms is not None for t in result.turns)  # never dead air
    bot = [u.text for u in served.utterances(caller.call_sid) if u.role == "bot"]
    assert bot[1] == settings.apology
    assert bot[2] == "Booked for two."
    errors = served.call_events(caller.call_sid, "error")
    assert errors and errors[0].detail["stage"] == "llm"


async def test_slow_llm_times_out_into_an_apology(
    settings: Settings, engines: Engines, fake_openai: FakeOpenAi, fixtures_dir
) -> None:
    fake_openai.script(Rule(when="open", reply="Too late.", first_token_delay_s=5.0))
    async with serving(settings, engines) as served:
        caller = SimulatedCaller(served.media_url, pace=3.0)
        result = await caller.run([CallerTurn(wav=str(fixtures_dir / "open_hours.wav"))])
        await served.ended(caller.call_sid)
    assert result.turns[0].latency_ms is not None
    assert result.turns[0].latency_ms < 4000  # the 2 s LLM timeout, then the apology
    bot = [u.text for u in served.utterances(caller.call_sid) if u.role == "bot"]
    assert bot[-1] == settings.apology


async def test_malformed_messages_are_ignored_and_the_call_continues(
    settings: Settings, engines: Engines, fake_openai: FakeOpenAi, fixtures_dir
) -> None:
    fake_openai.script(Rule(when="open", reply="Nine o'clock."))
    junk: list[str | bytes] = [
        b"\x00\x01binary",
        "{not json",
        '{"event": "teleport"}',
        '{"event": "media", "streamSid": "MZwrong", "media": {"payload": "////"}}',
        '{"event": "media", "streamSid": "MZ1", "media": {"payload": "%%%"}}',
        '{"event": "start", "start": {"callSid": "CA2", "streamSid": "MZ2"}}',  # second start
        '{"event": "media", "streamSid": "MZ1", "media": {"payload": "' + "A" * 40_000 + '"}}',
        "[]",
    ]
    async with serving(settings, engines) as served:
        caller = SimulatedCaller(served.media_url, pace=3.0)
        result = await caller.run([CallerTurn(wav=str(fixtures_dir / "open_hours.wav"),
                                              raw=junk)])
        ended = await served.ended(caller.call_sid)
    assert ended.reason == "stop"
    assert result.turns[0].latency_ms is not None
    bot = [u.text for u in served.utterances(caller.call_sid) if u.role == "bot"]
    assert bot[-1] == "Nine o'clock."


async def test_caller_hang_up_mid_reply_ends_the_call_and_cancels_its_tasks(
    settings: Settings, engines: Engines, fake_openai: FakeOpenAi, fixtures_dir
) -> None:
    fake_openai.script(Rule(when="open", reply=LONG_REPLY))
    async with serving(settings, engines) as served:
        caller = SimulatedCaller(served.media_url, pace=2.0)
        await caller.run([CallerTurn(wav=str(fixtures_dir / "open_hours.wav"))],
                         hang_up_early_ms=700)
        ended = await served.ended(caller.call_sid)
        assert ended.reason == "disconnect"
        await asyncio.sleep(0.1)
        leftovers = [t for t in asyncio.all_tasks() if caller.call_sid in t.get_name()]
        assert leftovers == []
        assert served.app.state.services.active_calls == 0
    bot = [u for u in served.utterances(caller.call_sid) if u.role == "bot"]
    assert bot[-1].interrupted and bot[-1].text != LONG_REPLY


async def test_two_calls_at_once_do_not_disturb_each_other(
    settings: Settings, engines: Engines, fake_openai: FakeOpenAi, fixtures_dir
) -> None:
    fake_openai.script(Rule(when="open", reply="Nine."), Rule(when="table", reply="Booked."))
    async with serving(settings, engines) as served:
        good = SimulatedCaller(served.media_url, pace=2.0)
        noisy = SimulatedCaller(served.media_url, pace=2.0)
        junk: list[str | bytes] = ["{bad", b"\x00" * 10] * 50
        results = await asyncio.gather(
            good.run([CallerTurn(wav=str(fixtures_dir / "open_hours.wav"))]),
            noisy.run([CallerTurn(wav=str(fixtures_dir / "book_table.wav"), raw=junk)]),
        )
        await served.ended(good.call_sid)
        await served.ended(noisy.call_sid)
    assert all(r.turns[0].latency_ms is not None for r in results)
    assert [u.text for u in served.utterances(good.call_sid) if u.role == "bot"][-1] == "Nine."
    assert [u.text for u in served.utterances(noisy.call_sid) if u.role == "bot"][-1] == "Booked."


async def test_signed_upgrade_is_accepted_and_unsigned_refused(
    settings: Settings, engines: Engines, fake_openai: FakeOpenAi, fixtures_dir
) -> None:
    import websockets

    fake_openai.script(Rule(when="open", reply="Nine."))
    signed = settings.model_copy(update={"twilio_auth_token": "test-token-123"})
    async with serving(signed, engines) as served:
        with pytest.raises(websockets.exceptions.InvalidStatus):
            await SimulatedCaller(served.media_url, pace=4.0).run([])
        caller = SimulatedCaller(served.media_url, pace=4.0, auth_token="test-token-123")
        result = await caller.run([CallerTurn(wav=str(fixtures_dir / "open_hours.wav"))])
        await served.ended(caller.call_sid)
    assert result.turns[0].latency_ms is not None


class _FailOnce:
    """Wraps an engine; its first call after `arm()` raises EngineError (an honest double)."""

    def __init__(self, inner, stage: str) -> None:  # type: ignore[no-untyped-def]
        self.inner, self.stage, self.armed, self.name = inner, stage, False, "fail-once"

    def arm(self) -> None:
        self.armed = True

    def _check(self) -> None:
        if self.armed:
            self.armed = False
            raise EngineError(self.stage, "injected failure")

    def transcribe(self, audio):  # type: ignore[no-untyped-def]
        self._check()
        return self.inner.transcribe(audio)

    async def synthesize(self, text: str):  # type: ignore[no-untyped-def]
        self._check()
        async for clip in self.inner.synthesize(text):
            yield clip


@pytest.mark.parametrize("stage", ["stt", "tts"])
async def test_stt_or_tts_failure_mid_call_plays_an_apology_and_the_call_goes_on(
    settings: Settings, engines: Engines, fake_openai: FakeOpenAi, fixtures_dir, stage: str
) -> None:
    fake_openai.script(Rule(when="open", reply="We open at nine."),
                       Rule(when="table", reply="Booked for two."))
    # No speculative transcription: a failed speculative attempt is (rightly) just dropped.
    settings = settings.model_copy(update={"speculative_stt_ms": 0})
    async with serving(settings, engines) as served:
        # The greeting and apology are cached at startup; fail the next live use.
        failing = _FailOnce(engines.stt if stage == "stt" else engines.tts, stage)
        served.app.state.services.engines = dataclasses.replace(
            engines, **{stage: failing})
        failing.arm()
        caller, result = await served.call(fixtures_dir, "open_hours.wav", "book_table.wav")
    assert all(t.latency_ms is not None for t in result.turns)  # never dead air
    bot = [u.text for u in served.utterances(caller.call_sid) if u.role == "bot"]
    assert settings.apology in bot
    assert bot[-1] == "Booked for two."
    errors = served.call_events(caller.call_sid, "error")
    assert errors and errors[0].detail["stage"] == stage
