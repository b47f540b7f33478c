"""A call whose media stream drops goes on: `/twilio/stream-ended` connects it again.

Real `voicebot serve` processes (the real models, the LLM behind the scripted OpenAI-compatible
fake) sharing one SQLite database, as two servers behind a load balancer share PostgreSQL. The
test plays Twilio: it follows the TwiML `/twilio/stream-ended` answers, to the server that is
still up.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import uuid
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from telephony.simulator import CallerTurn, SimulatedCaller
from tests.fakes.openai_server import FakeOpenAi, Rule, ToolCall
from tests.serverkit import ServerProcess, eventually

pytestmark = pytest.mark.slow

REPLY = "We open at nine tomorrow morning."
RESUME = "Sorry, the line dropped for a moment."
PROMPT = "You answer questions about the Corner Bistro, briefly."
REDIS_URL = os.environ.get("VOICEBOT_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def _env(tmp_path: Path, fake: FakeOpenAi, spool: str) -> dict[str, str]:
    return {
        "DATABASE_URL": f"sqlite:///{tmp_path}/calls.db",  # shared, as PostgreSQL would be
        "DB_SPOOL_DIR": str(tmp_path / spool),
        "LLM_BASE_URL": fake.base_url,
        "LLM_MODEL": "scripted",
        "LOG_LEVEL": "INFO",
        "RESUME_MESSAGE": RESUME,
    }


@pytest.fixture
async def servers(tmp_path: Path, fake_openai: FakeOpenAi
                  ) -> AsyncIterator[tuple[ServerProcess, ServerProcess]]:
    first = ServerProcess(tmp_path, _env(tmp_path, fake_openai, "spool-a"), name="a")
    second = ServerProcess(tmp_path, _env(tmp_path, fake_openai, "spool-b"), name="b")
    try:
        await first.start()
        await second.start()
        yield first, second
    finally:
        first.kill()
        second.kill()


async def _stream_ended(base_url: str, call_sid: str, query: str = "") -> str:
    async with httpx.AsyncClient(base_url=base_url, timeout=10) as http:
        response = await http.post("/twilio/stream-ended" + query,
                                   data={"CallSid": call_sid, "CallStatus": "in-progress"})
    assert response.status_code == 200
    return response.text


def _words(text: str) -> str:
    """A transcript without its punctuation (Whisper may end the same words with . or ?)."""
    return re.sub(r"[^a-z0-9 ]", "", text.lower())


def _connect(twiml: str) -> tuple[str, str, dict[str, str]]:
    connect = ET.fromstring(twiml).find("Connect")
    assert connect is not None, twiml
    stream = connect.find("Stream")
    assert stream is not None
    return (connect.get("action", ""), stream.get("url", ""),
            {p.get("name", ""): p.get("value", "") for p in stream.findall("Parameter")})


async def _call(base_url: str, call_sid: str) -> dict:  # type: ignore[type-arg]
    async with httpx.AsyncClient(base_url=base_url, timeout=10) as http:
        response = await http.get(f"/api/calls/{call_sid}")
    return response.json() if response.status_code == 200 else {}


async def _killed_after_a_reply(first: ServerProcess, second: ServerProcess,
                                caller: SimulatedCaller, turn: CallerTurn) -> None:
    """The caller talks to `first` until the bot has answered once (as stored, read through
    `second`), then `first` dies mid-call (SIGKILL: nothing more is stored, nothing freed)."""
    call = asyncio.create_task(caller.run([turn, turn]))

    async def answered_once() -> bool:
        stored = await _call(second.base_url, caller.call_sid)
        return any(u["role"] == "bot" and u["text"] == REPLY
                   for u in stored.get("utterances", []))

    await eventually(answered_once, 40)
    first.signal(signal.SIGKILL)
    assert (await asyncio.wait_for(call, 20)).closed_by_server


async def test_a_call_goes_on_after_its_server_dies(
    servers: tuple[ServerProcess, ServerProcess], fake_openai: FakeOpenAi, fixtures_dir: Path
) -> None:
    first, second = servers
    fake_openai.script(Rule(when="open", reply=REPLY), default_reply="Okay.")
    turn = CallerTurn(wav=str(fixtures_dir / "open_hours.wav"))
    caller = SimulatedCaller(first.media_url, from_number="+15550100007",
                             direction="inbound", parameters={"system_prompt": PROMPT})
    call_sid = caller.call_sid
    await _killed_after_a_reply(first, second, caller, turn)

    # Twilio asks the <Connect>'s action (through the load balancer: the server that is up).
    action, url, parameters = _connect(await _stream_ended(second.base_url, call_sid))
    assert url.endswith("/twilio/media") and action.endswith("/twilio/stream-ended?resumes=1")
    # The call's own parameters (an outbound call's system prompt) come back with it.
    assert parameters == {"from": "+15550100007", "to": "+15550100002",
                          "direction": "inbound", "resume": "1", "system_prompt": PROMPT}
    requests_before = len(fake_openai.chat_requests)

    again = SimulatedCaller(second.media_url, call_sid=call_sid, parameters=parameters,
                            from_number=parameters["from"], direction=parameters["direction"])
    result = await asyncio.wait_for(again.run([turn]), 60)
    assert not result.closed_by_server and result.turns[0].latency_ms is not None

    async def ended() -> bool:
        return (await _call(second.base_url, call_sid)).get("end_reason") == "stop"

    await eventually(ended, 10)
    stored = await _call(second.base_url, call_sid)
    said = [(u["role"], u["text"]) for u in stored["utterances"]]
    assert [role for role, _ in said] == ["bot", "caller", "bot", "bot", "caller", "bot"]
    assert said[2] == ("bot", REPLY) and said[5] == ("bot", REPLY)
    # The resumed stream says the resume line, not the greeting, then the call goes on: the
    # caller's words are heard again. (`in`, not `==`: once, on a fresh clone's loaded CI run,
    # the resumed stream's transcript ended in a repeat of the words' start, "... tomorrow
    # morning hi there what time do", most likely Whisper on a longer tail of silence when
    # the turn ended later under load; it passed on every run here.)
    assert said[3] == ("bot", RESUME) and _words(said[1][1]) in _words(said[4][1])
    turns = [u["turn"] for u in stored["utterances"] if u["role"] == "caller"]
    assert turns[1] > turns[0]  # numbered on from the first stream's turns
    assert stored["status"] == "completed" and stored["ended_at"] is not None
    resumed = [e for e in stored["events"] if e["type"] == "resumed"]
    assert [e["detail"] for e in resumed] == [{"attempt": 1, "utterances": 3}]
    # The LLM answered the second turn knowing the first one (the memory joins the bot's
    # reply and the resume line, said one after the other, into one message).
    answered = [r for r in fake_openai.chat_requests[requests_before:]
                if r.last_user_message == said[4][1]]
    assert answered
    assert PROMPT in answered[-1].messages[0]["content"]
    contents = [(m["role"], m["content"]) for m in answered[-1].messages
                if m["role"] != "system"]
    assert contents == [("assistant", said[0][1]), ("user", said[1][1]),
                        ("assistant", f"{REPLY} {RESUME}"), ("user", said[4][1])]
    async with httpx.AsyncClient(base_url=second.base_url, timeout=10) as http:
        metrics = (await http.get("/metrics")).text
    assert "voicebot_streams_resumed_total 1.0" in metrics  # not counted as a new call:
    assert 'voicebot_calls_started_total{direction="inbound"}' not in metrics
    # The call ended with a `stop` this time: Twilio's next question gets a hang-up.
    twiml = await _stream_ended(second.base_url, call_sid, "?resumes=1")
    assert "<Hangup" in twiml and "<Connect" not in twiml


@pytest.mark.redis
async def test_a_full_deployment_takes_back_a_call_whose_machine_died(
    tmp_path: Path, fake_openai: FakeOpenAi, fixtures_dir: Path
) -> None:
    """Two servers sharing Redis with one line between them (`MAX_CONCURRENT_CALLS=1`). The
    server carrying the call dies, its lease with it (nothing left on that machine to free
    it; it would expire after `ADMISSION_LEASE_TTL_S`, 30 s). The other server's
    `/twilio/stream-ended` gives the call's line back by its CallSid before connecting it
    again, so the resumed stream is admitted at once instead of refused as over the limit."""
    fake_openai.script(Rule(when="open", reply=REPLY), default_reply="Okay.")
    shared = {"REDIS_URL": REDIS_URL, "REDIS_NAMESPACE": f"resume-{uuid.uuid4().hex[:8]}",
              "MAX_CONCURRENT_CALLS": "1", "ADMISSION_LEASE_TTL_S": "30"}
    first = ServerProcess(tmp_path, {**_env(tmp_path, fake_openai, "spool-a"), **shared},
                          name="a")
    second = ServerProcess(tmp_path, {**_env(tmp_path, fake_openai, "spool-b"), **shared},
                           name="b")
    try:
        await first.start()
        await second.start()
        turn = CallerTurn(wav=str(fixtures_dir / "open_hours.wav"))
        caller = SimulatedCaller(first.media_url, direction="inbound")
        call_sid = caller.call_sid
        await _killed_after_a_reply(first, second, caller, turn)
        _, _, parameters = _connect(await _stream_ended(second.base_url, call_sid))
        again = SimulatedCaller(second.media_url, call_sid=call_sid, parameters=parameters,
                                direction="inbound")
        result = await asyncio.wait_for(again.run([turn]), 60)
        assert not result.closed_by_server and result.turns[0].latency_ms is not None
    finally:
        first.kill()
        second.kill()


async def test_a_bot_that_hangs_up_is_not_taken_for_a_drop(
    servers: tuple[ServerProcess, ServerProcess], fake_openai: FakeOpenAi, fixtures_dir: Path
) -> None:
    """Without Twilio credentials the bot hangs up by closing the stream; Twilio asks the
    action at once, maybe another server: the end is already stored there."""
    first, second = servers
    fake_openai.script(Rule(when="goodbye", reply="Goodbye, have a nice day!",
                            tool_call=ToolCall("end_call", {})))
    caller = SimulatedCaller(first.media_url, pace=3.0)
    result = await asyncio.wait_for(caller.run([
        CallerTurn(wav=str(fixtures_dir / "goodbye.wav")), CallerTurn(silence_ms=10_000)]), 60)
    assert result.closed_by_server
    twiml = await _stream_ended(second.base_url, caller.call_sid)
    assert "<Hangup" in twiml and "<Connect" not in twiml
    stored = await _call(second.base_url, caller.call_sid)
    assert stored["end_reason"].startswith("bot_")


async def test_a_call_past_the_drain_grace_goes_on_on_another_server(
    tmp_path: Path, fake_openai: FakeOpenAi, fixtures_dir: Path
) -> None:
    """A rolling restart: the draining server closes the calls still up when its grace runs
    out (stored as `disconnect`); the call is connected again on the server that stays up,
    its row in progress once more until the caller hangs up there."""
    fake_openai.script(Rule(when="open", reply=REPLY), default_reply="Okay.")
    draining = ServerProcess(tmp_path, {**_env(tmp_path, fake_openai, "spool-a"),
                                        "DRAIN_GRACE_S": "1"}, name="a")
    staying = ServerProcess(tmp_path, _env(tmp_path, fake_openai, "spool-b"), name="b")
    try:
        await draining.start()
        await staying.start()
        turn = CallerTurn(wav=str(fixtures_dir / "open_hours.wav"))
        caller = SimulatedCaller(draining.media_url)
        call = asyncio.create_task(caller.run([turn, CallerTurn(silence_ms=20_000)]))

        async def answered() -> bool:
            stored = await _call(staying.base_url, caller.call_sid)
            return any(u["text"] == REPLY for u in stored.get("utterances", []))

        await eventually(answered, 40)
        draining.signal(signal.SIGTERM)
        assert (await asyncio.wait_for(call, 20)).closed_by_server
        assert await draining.wait_exit(20) == 0

        async def dropped() -> bool:
            return (await _call(staying.base_url, caller.call_sid)).get(
                "end_reason") == "disconnect"

        await eventually(dropped, 10)
        _, _, parameters = _connect(await _stream_ended(staying.base_url, caller.call_sid))
        assert parameters["resume"] == "1"
        again = SimulatedCaller(staying.media_url, call_sid=caller.call_sid,
                                parameters=parameters)
        call = asyncio.create_task(again.run([turn, CallerTurn(silence_ms=20_000)]))

        async def going_on() -> bool:
            stored = await _call(staying.base_url, caller.call_sid)
            return [u["text"] for u in stored.get("utterances", [])].count(REPLY) == 2

        await eventually(going_on, 40)
        stored = await _call(staying.base_url, caller.call_sid)
        assert (stored["status"], stored["end_reason"], stored["ended_at"]) == (
            "in-progress", None, None)
        call.cancel()  # the caller hangs up without a `stop`: the socket just closes
        with contextlib.suppress(asyncio.CancelledError):
            await call

        async def ended() -> bool:
            return (await _call(staying.base_url, caller.call_sid)).get("ended_at") is not None

        await eventually(ended, 10)
    finally:
        draining.kill()
        staying.kill()


async def test_words_the_drop_left_unanswered_are_answered_after_the_resume_line(
    servers: tuple[ServerProcess, ServerProcess], fake_openai: FakeOpenAi, fixtures_dir: Path
) -> None:
    """The server dies while the LLM is still thinking about the caller's question: on the
    stream connected again the bot says the resume line, then answers the question."""
    first, second = servers
    fake_openai.script(Rule(when="open", hang=True, times=1), Rule(when="open", reply=REPLY),
                       default_reply="Okay.")
    caller = SimulatedCaller(first.media_url, reply_timeout_s=60)
    call = asyncio.create_task(caller.run([CallerTurn(wav=str(fixtures_dir / "open_hours.wav"))]))

    async def asked() -> bool:
        stored = await _call(second.base_url, caller.call_sid)
        return any(u["role"] == "caller" for u in stored.get("utterances", []))

    await eventually(asked, 40)
    await eventually(lambda: len(fake_openai.chat_requests) >= 1, 10)  # the LLM is thinking
    first.signal(signal.SIGKILL)
    assert (await asyncio.wait_for(call, 20)).closed_by_server

    _, _, parameters = _connect(await _stream_ended(second.base_url, caller.call_sid))
    again = SimulatedCaller(second.media_url, call_sid=caller.call_sid, parameters=parameters)
    result = await asyncio.wait_for(again.run([CallerTurn(silence_ms=1000)]), 60)
    assert not result.closed_by_server

    async def ended() -> bool:
        return (await _call(second.base_url, caller.call_sid)).get("end_reason") == "stop"

    await eventually(ended, 10)
    stored = await _call(second.base_url, caller.call_sid)
    said = [(u["role"], u["text"]) for u in stored["utterances"]]
    assert [role for role, _ in said] == ["bot", "caller", "bot", "bot"]
    assert said[2:] == [("bot", RESUME), ("bot", REPLY)]
    caller_turn = stored["utterances"][1]["turn"]
    assert [u["turn"] for u in stored["utterances"][2:]] == [caller_turn, caller_turn]
    # The LLM was asked on the history before the resume line: the question last.
    answered = fake_openai.chat_requests[-1]
    assert answered.messages[-1] == {"role": "user", "content": said[1][1]}
    # Not a measured turn: no latency parts stored for it.
    assert all(m["turn"] != caller_turn or m["v2v_ms"] is None for m in stored["metrics"])
