"""Admission control: MAX_CONCURRENT_CALLS across workers (Redis leases), busy TwiML when full,
1013 for a media stream over the limit, load shedding on deep work queues, draining."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import httpx
import pytest
import websockets
from starlette.applications import Starlette
from websockets.exceptions import InvalidStatus

from db.records import CallDetail
from db.repository import CallNotFound
from pipeline.conversation import Engines
from pipeline.factory import build_vad_factory
from pipeline.llm_openai import OpenAiLlm
from pipeline.stt import ScriptedStt
from pipeline.tts_piper import ToneTts
from pipeline.work_queue import WorkQueue
from tests.capacitykit import with_capacity
from tests.fakes.openai_server import FakeOpenAi
from tests.serverkit import eventually
from voicebot.admission import PER_CALL_FROM, Admission, LocalLeases, RedisLeases, Refused
from voicebot.app import create_app
from voicebot.local_server import running_server
from voicebot.settings import Settings, load_settings

REDIS_URL = os.environ.get("VOICEBOT_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def call_settings(tmp_path: Path, fake: FakeOpenAi, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "database_url": f"sqlite:///{tmp_path}/calls-{uuid.uuid4().hex[:6]}.db",
        "db_spool_dir": str(tmp_path / "spool"), "llm_base_url": fake.base_url,
        "llm_model": "scripted", "public_url": None, "max_concurrent_calls": 1,
    }
    return load_settings(**{**values, **overrides})


def instant_engines(settings: Settings) -> Engines:
    """Test doubles that are honest about it: scripted STT, a tone for TTS, level-only VAD."""
    return Engines(stt=ScriptedStt(), llm=OpenAiLlm.from_settings(settings), tts=ToneTts(),
                   vad=build_vad_factory(settings, "energy"),
                   stt_limiter=anyio.CapacityLimiter(1))


def media_url(base: str) -> str:
    return base.replace("http://", "ws://") + "/twilio/media"


@contextlib.asynccontextmanager
async def call_in_progress(base: str, call_sid: str | None = None
                           ) -> AsyncIterator[websockets.ClientConnection]:
    """A media stream that has started (the greeting is playing) until the block ends."""
    call_sid = call_sid or "CA" + uuid.uuid4().hex
    async with websockets.connect(media_url(base)) as ws:
        await ws.send(json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"}))
        await ws.send(json.dumps({
            "event": "start", "sequenceNumber": "1", "streamSid": "MZ" + call_sid[2:],
            "start": {"streamSid": "MZ" + call_sid[2:], "callSid": call_sid, "tracks": ["inbound"],
                      "customParameters": {"direction": "inbound"},
                      "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000,
                                      "channels": 1}},
        }))
        first = json.loads(await asyncio.wait_for(ws.recv(), 5))
        assert first["event"] == "media"  # the greeting: the call is really up
        yield ws
        await ws.send(json.dumps({"event": "stop", "streamSid": "MZ" + call_sid[2:],
                                  "stop": {"callSid": call_sid}}))


async def refused_with(base: str) -> int:
    """Open a media stream that must be refused; the HTTP status of the refused upgrade."""
    with pytest.raises(InvalidStatus) as refused:
        async with websockets.connect(media_url(base)):
            pass
    return refused.value.response.status_code


async def voice_twiml(base: str) -> str:
    async with httpx.AsyncClient(base_url=base) as http:
        response = await http.post("/twilio/voice", data={"From": "+15550001111",
                                                          "To": "+15550002222"})
    assert response.status_code == 200
    return response.text


@pytest.mark.redis
async def test_a_second_call_is_refused_whichever_worker_it_reaches(
    tmp_path: Path, fake_openai: FakeOpenAi
) -> None:
    """Two workers (two apps) share Redis and MAX_CONCURRENT_CALLS=1."""
    namespace = f"test-{uuid.uuid4().hex[:8]}"
    one = call_settings(tmp_path, fake_openai, redis_url=REDIS_URL, redis_namespace=namespace)
    two = call_settings(tmp_path, fake_openai, redis_url=REDIS_URL, redis_namespace=namespace)
    app_one = with_capacity(create_app(one, engines=instant_engines(one)))
    app_two = with_capacity(create_app(two, engines=instant_engines(two)))
    async with running_server(app_one) as base_one, running_server(app_two) as base_two:
        assert "<Connect" in await voice_twiml(base_two)
        async with call_in_progress(base_one):
            # Full on both: the other worker's voice webhook is busy and its stream refused,
            # and so is a second stream on the worker holding the call.
            twiml = await voice_twiml(base_two)
            assert "<Say>" in twiml and "<Hangup" in twiml and "<Connect" not in twiml
            assert "<Hangup" in await voice_twiml(base_one)
            assert await refused_with(base_two) == 403
            assert await refused_with(base_one) == 403
        # The call ended: its line is free for either worker at once.
        async def free() -> bool:
            return await app_two.state.admission.cluster_active() == 0

        await eventually(free, 5)
        async with call_in_progress(base_two):
            assert await refused_with(base_one) == 403
    refused = app_two.state.admission.refusals
    assert refused["media:full"] == 1 and refused["voice:full"] == 1


async def test_busy_twiml_and_1013_when_every_line_is_taken(
    tmp_path: Path, fake_openai: FakeOpenAi
) -> None:
    settings = call_settings(tmp_path, fake_openai)  # no Redis: this process's leases
    app = with_capacity(create_app(settings, engines=instant_engines(settings)))
    async with running_server(app) as base:
        async with call_in_progress(base):
            twiml = await voice_twiml(base)
            assert "all of our lines are busy" in twiml.lower() or "busy" in twiml.lower()
            assert "<Hangup" in twiml
            assert await refused_with(base) == 403
        await eventually(lambda: app.state.admission.local_active == 0, 5)
        assert "<Connect" in await voice_twiml(base)
        async with httpx.AsyncClient(base_url=base) as http:
            text = (await http.get("/metrics")).text
    assert 'voicebot_calls_refused_total{reason="full",where="media"} 1.0' in text


@pytest.mark.redis
async def test_a_crashed_workers_lines_come_free_when_its_leases_expire() -> None:
    namespace = f"test-{uuid.uuid4().hex[:8]}"
    crashed = Admission(1, RedisLeases(REDIS_URL, namespace), ttl_s=0.6)
    await crashed.admit()  # ...and the worker dies: no release, no heartbeat
    await crashed.store.aclose()
    survivor = Admission(1, RedisLeases(REDIS_URL, namespace), ttl_s=0.6)
    await survivor.start()
    try:
        with pytest.raises(Refused) as refused:
            await survivor.admit()
        assert refused.value.reason == "full"
        await asyncio.sleep(0.7)
        lease = await survivor.admit()
        await survivor.release(lease)
    finally:
        await survivor.stop()


@pytest.mark.redis
async def test_a_dropped_calls_line_is_given_back_by_its_call_sid() -> None:
    """A machine dies with a call (no supervisor frees its leases): the server that connects
    the call again frees the call's line by its CallSid (`free_call`, from
    /twilio/stream-ended), so a full deployment admits the resumed stream at once. The dead
    server's late release, if it ever comes, takes nothing from the new stream."""
    namespace = f"test-{uuid.uuid4().hex[:8]}"
    dead = Admission(1, RedisLeases(REDIS_URL, namespace), ttl_s=30)
    survivor = Admission(1, RedisLeases(REDIS_URL, namespace), ttl_s=30)
    try:
        old = await dead.admit()
        await dead.bind(old, "CA" + "1" * 32)
        with pytest.raises(Refused):  # every line taken, by the dropped stream's lease
            await survivor.admit()
        assert not await survivor.free_call("CA" + "2" * 32)  # another call: nothing bound
        assert await survivor.free_call("CA" + "1" * 32)
        assert not await survivor.free_call("CA" + "1" * 32)  # once
        new = await survivor.admit()
        await survivor.bind(new, "CA" + "1" * 32)
        await dead.release(old)  # the old stream's end, late: neither the line nor the note
        assert await survivor.cluster_active() == 1
        assert await survivor.free_call("CA" + "1" * 32)  # still bound to the new stream
        assert await survivor.cluster_active() == 0
    finally:
        await dead.store.aclose()
        await survivor.store.aclose()


@pytest.mark.redis
async def test_the_heartbeat_keeps_a_long_call_s_lease_alive() -> None:
    namespace = f"test-{uuid.uuid4().hex[:8]}"
    worker = Admission(1, RedisLeases(REDIS_URL, namespace), ttl_s=0.6)
    other = Admission(1, RedisLeases(REDIS_URL, namespace), ttl_s=0.6)
    await worker.start()
    try:
        lease = await worker.admit()
        await asyncio.sleep(1.5)  # 2.5 lease lifetimes: only the heartbeat keeps it
        assert await other.cluster_active() == 1
        with pytest.raises(Refused):
            await other.admit()
        await worker.release(lease)
        assert await other.cluster_active() == 0
    finally:
        await worker.stop()
        await other.stop()


async def test_without_redis_answering_calls_are_admitted_against_the_local_count() -> None:
    admission = Admission(2, RedisLeases("redis://127.0.0.1:1/0", "down", op_timeout_s=0.2))
    first = await admission.admit()
    second = await admission.admit()
    assert not first.shared and not second.shared
    with pytest.raises(Refused):
        await admission.admit()
    await admission.release(first)
    await admission.release(second)
    assert admission.local_active == 0


async def assert_sheds_new_calls_only(admission: Admission) -> None:
    """Overloaded with one call in progress: a new call is refused as `overloaded`, and the
    call in progress keeps its line."""
    assert admission.should_shed()
    with pytest.raises(Refused) as refused:
        await admission.admit()
    assert refused.value.reason == "overloaded"
    assert admission.local_active == 1


async def test_new_calls_are_shed_while_a_work_queue_stays_deep() -> None:
    limiter = anyio.CapacityLimiter(1)
    admission = Admission(100, LocalLeases(), queues=[WorkQueue("stt", limiter)], shed_depth=2,
                          shed_window_s=0.3, sample_interval_s=0.05)
    await admission.start()
    in_progress = await admission.admit()
    release = anyio.Event()

    async def work() -> None:
        async with limiter:
            await release.wait()

    try:
        async with anyio.create_task_group() as group:
            for _ in range(3):  # one running, two waiting
                group.start_soon(work)
            await asyncio.sleep(0.05)
            assert admission.queue_depth() == 2
            assert not admission.should_shed()  # a burst is not yet overload
            await asyncio.sleep(0.4)
            await assert_sheds_new_calls_only(admission)
            release.set()
        await asyncio.sleep(0.1)
        assert not admission.should_shed()
        await admission.release(await admission.admit())
        await admission.release(in_progress)
    finally:
        await admission.stop()


@contextlib.asynccontextmanager
async def loop_kept_busy(share: float = 1.0) -> AsyncIterator[None]:
    """Keeps this thread's event loop computing (`share` of the time) until the block ends,
    in 10 ms slices with the loop's other work (the server's included) run in between."""
    done = asyncio.Event()

    async def spin() -> None:
        while not done.is_set():
            until = time.perf_counter() + 0.010 * share
            while time.perf_counter() < until:
                pass
            await asyncio.sleep(0.010 * (1 - share))

    task = asyncio.create_task(spin())
    try:
        yield
    finally:
        done.set()
        await task


async def test_new_calls_are_shed_while_the_event_loop_is_saturated() -> None:
    admission = Admission(100, LocalLeases(), shed_loop_busy=0.8, shed_window_s=0.5,
                          sample_interval_s=0.05)
    await admission.start()
    try:
        await asyncio.sleep(0.6)
        idle = admission.loop_busy()
        assert idle is not None and idle < 0.3  # measured: this thread, from the kernel
        in_progress = await admission.admit()
        async with loop_kept_busy():
            await asyncio.sleep(0.2)
            assert not admission.should_shed()  # a moment's work is not overload
            await asyncio.sleep(0.6)
            busy = admission.loop_busy()
            assert busy is not None and busy > 0.8
            await assert_sheds_new_calls_only(admission)
        await asyncio.sleep(0.6)
        assert not admission.should_shed()
        await admission.release(await admission.admit())
        await admission.release(in_progress)
    finally:
        await admission.stop()


async def test_a_burst_of_new_calls_is_counted_before_the_loop_feels_it() -> None:
    """At the window's share per call, the calls that would take the loop past the limit are
    refused at once, not a window later when they have made every call late."""
    loop = asyncio.get_running_loop()
    admission = Admission(1000, LocalLeases(), shed_loop_busy=0.86, shed_window_s=0.3,
                          sample_interval_s=0.05, loop_demand=lambda: 0.5 * loop.time())
    leases = [await admission.admit() for _ in range(20)]
    await admission.start()
    try:
        await asyncio.sleep(0.45)  # a whole window with 20 calls at half the loop
        assert admission.loop_busy() == pytest.approx(0.5, rel=1e-3)
        burst = []
        with pytest.raises(Refused) as refused:  # no await between: the window cannot move
            while True:
                burst.append(await admission.admit())
        assert refused.value.reason == "overloaded"
        # 0.5 × (20 + k + 1) / 20 < 0.86 for k ≤ 13: fourteen more, not one more.
        assert len(burst) == 14
        # Below PER_CALL_FROM calls the share itself decides: one call is not a tenth of it.
        for lease in [*leases, *burst][PER_CALL_FROM - 1:]:
            await admission.release(lease)
        await asyncio.sleep(0.45)
        assert admission.loop_busy_with_one_more() == pytest.approx(0.5, rel=1e-3)
    finally:
        await admission.stop()


async def stored_call(app: Starlette, call_sid: str) -> CallDetail:
    """The call as stored, once the recorder has written it (within 5 s)."""
    async def stored() -> bool:
        try:
            await app.state.calls.get_call(call_sid)
        except CallNotFound:
            return False
        return True

    await eventually(stored, 5)
    return await app.state.calls.get_call(call_sid)  # type: ignore[no-any-return]


async def test_a_call_refused_at_the_voice_webhook_is_stored_with_why(
    tmp_path: Path, fake_openai: FakeOpenAi
) -> None:
    settings = call_settings(tmp_path, fake_openai)  # one line
    app = with_capacity(create_app(settings, engines=instant_engines(settings)))
    refused_sid = "CA" + uuid.uuid4().hex
    async with running_server(app) as base:
        async with call_in_progress(base), httpx.AsyncClient(base_url=base) as http:
            response = await http.post("/twilio/voice", data={
                "CallSid": refused_sid, "From": "+15550001111", "To": "+15550002222"})
            assert "<Hangup" in response.text
            # Not a Twilio CallSid: refused all the same, but nothing is stored for it.
            await http.post("/twilio/voice", data={"CallSid": "x" * 500})

        detail = await stored_call(app, refused_sid)
        async with httpx.AsyncClient(base_url=base) as http:
            text = (await http.get("/metrics")).text
    assert detail.call.end_reason == "refused_full" and detail.call.status == "completed"
    assert [(e.type, e.detail) for e in detail.events] == [
        ("refused", {"reason": "full", "where": "voice"})]
    assert 'voicebot_calls_ended_total{reason="refused_full"} 1.0' in text
    with pytest.raises(CallNotFound):
        await app.state.calls.get_call("x" * 500)


async def stream_ended(http: httpx.AsyncClient, call_sid: str,
                       status: str = "in-progress") -> str:
    """What Twilio gets from `<Connect action>` once the call's stream has ended."""
    response = await http.post("/twilio/stream-ended",
                               data={"CallSid": call_sid, "CallStatus": status})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/xml")
    return response.text


async def test_a_caller_whose_stream_was_refused_hears_the_busy_message(
    tmp_path: Path, fake_openai: FakeOpenAi
) -> None:
    """The voice webhook let the call through, then its stream found every line taken (1013
    before `accept`): Twilio asks `/twilio/stream-ended`, which answers the busy message and
    stores the refusal; a call whose stream ran is simply hung up."""
    settings = call_settings(tmp_path, fake_openai)  # one line
    app = with_capacity(create_app(settings, engines=instant_engines(settings)))
    refused_sid = "CA" + uuid.uuid4().hex
    async with running_server(app) as base, httpx.AsyncClient(base_url=base) as http:
        async with call_in_progress(base):
            assert await refused_with(base) == 403
            busy = await stream_ended(http, refused_sid)
            # The caller hung up meanwhile: nothing to say, nothing stored.
            gone = await stream_ended(http, "CA" + uuid.uuid4().hex, status="completed")

        detail = await stored_call(app, refused_sid)
        bad = await http.post("/twilio/stream-ended", data={"CallSid": "x" * 40})
        text = (await http.get("/metrics")).text
    assert "<Say>" in busy and "busy" in busy.lower() and "<Hangup" in busy
    assert "<Say>" not in gone and "<Hangup" in gone
    assert bad.status_code == 400
    assert detail.call.end_reason == "refused_stream" and detail.call.status == "completed"
    assert [(e.type, e.detail) for e in detail.events] == [
        ("refused", {"reason": "stream", "where": "media"})]
    assert 'voicebot_calls_ended_total{reason="refused_stream"} 1.0' in text


async def test_a_call_whose_stream_ran_is_hung_up_when_it_ends(
    tmp_path: Path, fake_openai: FakeOpenAi
) -> None:
    settings = call_settings(tmp_path, fake_openai)
    app = with_capacity(create_app(settings, engines=instant_engines(settings)))
    async with running_server(app) as base, httpx.AsyncClient(base_url=base) as http:
        call_sid = "CA" + uuid.uuid4().hex
        async with call_in_progress(base, call_sid):
            pass

        async def started() -> bool:
            stream = await app.state.calls.stream_end(call_sid)
            return stream is not None and stream.started

        await eventually(started, 5)
        twiml = await stream_ended(http, call_sid)
        detail = await app.state.calls.get_call(call_sid)
    assert "<Hangup" in twiml and "<Say>" not in twiml
    assert all(e.type != "refused" for e in detail.events)


async def test_busy_twiml_while_the_event_loop_is_saturated(
    tmp_path: Path, fake_openai: FakeOpenAi
) -> None:
    settings = call_settings(tmp_path, fake_openai, max_concurrent_calls=5, shed_loop_busy=0.8)
    app = with_capacity(create_app(settings, engines=instant_engines(settings)))
    async with running_server(app) as base:
        assert "<Connect" in await voice_twiml(base)
        async with loop_kept_busy(0.95):  # the server runs on this loop too
            await eventually(lambda: app.state.admission.should_shed(), 5)
            twiml = await voice_twiml(base)
            assert "busy" in twiml.lower() and "<Hangup" in twiml
        await eventually(lambda: not app.state.admission.should_shed(), 5)
        assert "<Connect" in await voice_twiml(base)
        async with httpx.AsyncClient(base_url=base) as http:
            text = (await http.get("/metrics")).text
    assert 'voicebot_calls_refused_total{reason="overloaded",where="voice"} 1.0' in text


async def test_draining_refuses_new_calls_and_fails_readiness(
    tmp_path: Path, fake_openai: FakeOpenAi
) -> None:
    settings = call_settings(tmp_path, fake_openai, max_concurrent_calls=5)
    app = with_capacity(create_app(settings, engines=instant_engines(settings)))
    async with running_server(app) as base, httpx.AsyncClient(base_url=base) as http:
        assert (await http.get("/readyz")).status_code == 200
        async with call_in_progress(base) as call:
            app.state.admission.begin_drain()
            assert (await http.get("/readyz")).status_code == 503
            assert "<Hangup" in await voice_twiml(base)
            assert await refused_with(base) == 403
            await call.ping()  # the call in progress is untouched
            assert app.state.admission.local_active == 1
        await asyncio.wait_for(app.state.admission.wait_idle(), 5)


async def test_a_media_stream_before_the_models_are_loaded_is_refused_and_counted(
    tmp_path: Path, fake_openai: FakeOpenAi
) -> None:
    settings = call_settings(tmp_path, fake_openai)
    app = with_capacity(create_app(settings, engines=instant_engines(settings)))
    async with running_server(app) as base:
        app.state.services.ready = False  # as while `voicebot serve` still loads the models
        assert await refused_with(base) == 403
        app.state.services.ready = True
        async with call_in_progress(base):
            pass
        async with httpx.AsyncClient(base_url=base) as http:
            text = (await http.get("/metrics")).text
    assert 'voicebot_calls_refused_total{reason="loading",where="media"} 1.0' in text
