"""SIGTERM drains: no new calls, the call in progress finishes, then the process exits.

The server runs as a real subprocess (`python -m voicebot.workers`, what `voicebot serve`
runs) with the real models, the LLM behind the scripted OpenAI-compatible fake.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets
from prometheus_client.parser import text_string_to_metric_families
from websockets.exceptions import ConnectionClosed, InvalidStatus

from telephony.simulator import CallerTurn, SimulatedCaller
from tests.fakes.openai_server import FakeOpenAi, Rule
from tests.serverkit import ServerProcess, connections_by_pid, eventually

pytestmark = pytest.mark.slow

REDIS_URL = os.environ.get("VOICEBOT_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def server_env(tmp_path: Path, fake: FakeOpenAi, **extra: str) -> dict[str, str]:
    return {
        "DATABASE_URL": f"sqlite:///{tmp_path}/calls.db",
        "DB_SPOOL_DIR": str(tmp_path / "spool"),
        "LLM_BASE_URL": fake.base_url,
        "LLM_MODEL": "scripted",
        "LOG_LEVEL": "INFO",
        **extra,
    }


@pytest.fixture
async def server(request: pytest.FixtureRequest, tmp_path: Path,
                 fake_openai: FakeOpenAi) -> AsyncIterator[ServerProcess]:
    options = getattr(request, "param", {})
    process = ServerProcess(tmp_path, server_env(tmp_path, fake_openai, **options.get("env", {})),
                            workers=options.get("workers", 1))
    await process.start()
    try:
        yield process
    finally:
        process.kill()


async def refused(url: str) -> bool:
    try:
        async with websockets.connect(url, open_timeout=5):
            return False
    except InvalidStatus as exc:
        return exc.response.status_code == 403


async def start_call(ws: Any, call_sid: str) -> None:
    """Twilio's `connected` and `start` messages for a media stream of call `call_sid`."""
    await ws.send(json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"}))
    await ws.send(json.dumps({
        "event": "start", "streamSid": "MZ1", "sequenceNumber": "1",
        "start": {"streamSid": "MZ1", "callSid": call_sid, "tracks": ["inbound"],
                  "customParameters": {}, "mediaFormat": {"encoding": "audio/x-mulaw",
                                                          "sampleRate": 8000, "channels": 1}},
    }))


@pytest.mark.parametrize("server", [{"env": {"DRAIN_GRACE_S": "30"}}], indirect=True)
async def test_sigterm_lets_the_call_in_progress_finish_then_exits(
    server: ServerProcess, fake_openai: FakeOpenAi, fixtures_dir: Path
) -> None:
    fake_openai.script(Rule(when="open", reply="We open at nine tomorrow morning."),
                       Rule(when="table", reply="Sure, a table for two tonight."),
                       default_reply="Okay.")
    caller = SimulatedCaller(server.media_url, pace=1.0)
    call = asyncio.create_task(caller.run([
        CallerTurn(wav=str(fixtures_dir / "open_hours.wav")),
        CallerTurn(wav=str(fixtures_dir / "book_table.wav")),
    ]))
    await eventually(lambda: caller.result.greeting_latency_ms is not None, 20)
    server.signal(signal.SIGTERM)  # mid-call: the greeting is playing

    async with httpx.AsyncClient(base_url=server.base_url, timeout=5) as http:
        async def not_ready() -> bool:
            return (await http.get("/readyz")).status_code == 503

        await eventually(not_ready, 5)
        twiml = (await http.post("/twilio/voice", data={"From": "+15550001111"})).text
        assert "<Hangup" in twiml and "<Connect" not in twiml
    assert await refused(server.media_url)
    assert server.process is not None and server.process.poll() is None  # still serving

    result = await asyncio.wait_for(call, 60)
    assert not result.closed_by_server
    assert [turn.latency_ms is not None for turn in result.turns] == [True, True]
    assert await server.wait_exit(15) == 0
    assert "drained" in server.log()


@pytest.mark.parametrize("server", [{"env": {"DRAIN_GRACE_S": "1"}}], indirect=True)
async def test_a_call_longer_than_the_grace_period_is_ended(server: ServerProcess) -> None:
    call_sid = "CA" + uuid.uuid4().hex
    async with websockets.connect(server.media_url) as ws:
        await start_call(ws, call_sid)
        await asyncio.wait_for(ws.recv(), 10)  # the greeting: the call is up
        server.signal(signal.SIGTERM)
        started = asyncio.get_running_loop().time()
        with pytest.raises(ConnectionClosed):
            while True:
                await asyncio.wait_for(ws.recv(), 10)
        assert asyncio.get_running_loop().time() - started < 6
    assert await server.wait_exit(15) == 0
    assert "grace" in server.log()


def _counter(text: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    return 0.0


@pytest.mark.redis
@pytest.mark.parametrize("server", [{"workers": 2, "env": {
    "REDIS_URL": REDIS_URL, "REDIS_NAMESPACE": f"drain-{uuid.uuid4().hex[:8]}",
    "MAX_CONCURRENT_CALLS": "1", "DRAIN_GRACE_S": "10"}}], indirect=True)
async def test_two_workers_share_the_limit_and_metrics_then_stop_on_sigterm(
    server: ServerProcess, fake_openai: FakeOpenAi, fixtures_dir: Path
) -> None:
    fake_openai.script(default_reply="We open at nine.")
    caller = SimulatedCaller(server.media_url, pace=2.0)
    call = asyncio.create_task(caller.run([CallerTurn(wav=str(fixtures_dir / "open_hours.wav"))]))
    await eventually(lambda: caller.result.greeting_latency_ms is not None, 20)
    # Whichever worker the kernel hands them to, further calls are refused.
    assert all([await refused(server.media_url) for _ in range(4)])
    result = await asyncio.wait_for(call, 60)
    assert result.turns[0].latency_ms is not None
    async with httpx.AsyncClient(base_url=server.base_url, timeout=5) as http:
        await asyncio.sleep(1.0)  # the bus hands CallEnded to the metrics subscriber
        scrapes = [(await http.get("/metrics")).text for _ in range(6)]
    # Every scrape, whichever worker answers, shows the whole server's totals.
    assert {_counter(t, "voicebot_calls_started_total", direction="simulated")
            for t in scrapes} == {1.0}
    assert {_counter(t, "voicebot_calls_refused_total", where="media", reason="full")
            for t in scrapes} == {4.0}
    server.signal(signal.SIGTERM)
    assert await server.wait_exit(20) == 0


def test_several_workers_share_one_login_secret_when_none_is_set() -> None:
    from voicebot.workers import share_login_secret

    env: dict[str, str] = {}
    share_login_secret(1, env)
    assert "UI_SECRET" not in env  # one process: its own random key is enough
    share_login_secret(2, env)
    made = env["UI_SECRET"]
    assert len(made) >= 32
    share_login_secret(2, env)
    assert env["UI_SECRET"] == made  # an existing secret (the user's) is kept


DEAD_NAMESPACE = f"dead-{uuid.uuid4().hex[:8]}"


@pytest.mark.redis
@pytest.mark.parametrize("server", [{"workers": 2, "env": {
    "REDIS_URL": REDIS_URL, "REDIS_NAMESPACE": DEAD_NAMESPACE, "MAX_CONCURRENT_CALLS": "1",
    "ADMISSION_LEASE_TTL_S": "120"}}], indirect=True)
async def test_a_dead_workers_lines_come_free_at_once(server: ServerProcess) -> None:
    """A worker killed with a call on it: the supervisor gives its line back when it reaps
    it, not when the lease would expire (120 s here), so the call, connected again, and new
    calls find the line free."""
    from redis.asyncio import Redis

    redis = Redis.from_url(REDIS_URL)
    key = f"{DEAD_NAMESPACE}:active"
    try:
        async with websockets.connect(server.media_url) as ws:
            await start_call(ws, "CA" + uuid.uuid4().hex)
            await asyncio.wait_for(ws.recv(), 10)  # the greeting: the call holds the line
            assert await refused(server.media_url)
            [token] = await redis.zrange(key, 0, -1)
            pid = token.decode().split(":")[1]  # tokens: host:pid:random
            os.kill(int(pid), signal.SIGKILL)
            with pytest.raises(ConnectionClosed):
                while True:
                    await asyncio.wait_for(ws.recv(), 10)

        async def line_free() -> bool:
            return await redis.zcard(key) == 0

        await eventually(line_free, 10)
        assert f"freed 1 line(s) of dead worker {pid}" in server.log()
        # A worker (the one left, or its replacement) takes the next call at once.
        await eventually(lambda: server_admits(server.media_url), 30)
    finally:
        await redis.aclose()


async def server_admits(url: str) -> bool:
    try:
        async with websockets.connect(url, open_timeout=5):
            return True
    except (InvalidStatus, OSError):
        return False


@pytest.mark.parametrize("server", [{"workers": 2, "env": {"DRAIN_GRACE_S": "30",
                                                          "SHED_LOOP_BUSY": "0"}}],
                         indirect=True)
async def test_a_draining_worker_is_passed_over_while_the_other_admits(
        server: ServerProcess) -> None:
    """One worker drains with a call on it (SIGTERM to that worker alone). It reports that
    it refuses new calls, so the supervisor hands the next stream to the other worker even
    where least connections alone would have picked the draining one (a tie, which goes to
    the first worker): the caller gets a line, not a refusal. (Shedding at the event loop is
    off here: a worker just started, its loop busy loading models, would refuse for a moment
    too, and get no connection while the other takes them.)"""
    await eventually(lambda: all(f"worker slot {slot} is taking connections" in server.log()
                                 for slot in (0, 1)), 60)
    async with websockets.connect(server.media_url) as ws:
        await start_call(ws, "CA" + uuid.uuid4().hex)
        await asyncio.wait_for(ws.recv(), 10)  # the greeting: the call is up
        [calling_pid] = connections_by_pid(server.port)
        await asyncio.sleep(0.3)  # the workers' ticks report the start-up checks' closes
        # Three idle connections even the two workers out: 2 and 2.
        idle = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(3)]
        with contextlib.suppress(TimeoutError):
            await eventually(lambda: sorted(connections_by_pid(server.port).values())
                             == [2, 2], 10)
        assert sorted(connections_by_pid(server.port).values()) == [2, 2], (
            connections_by_pid(server.port), server.log())
        os.kill(calling_pid, signal.SIGTERM)
        await eventually(lambda: f"{calling_pid} __mp_main__: draining" in server.log(), 10)
        await asyncio.sleep(0.5)  # its next tick reports it
        assert await server_admits(server.media_url)
        assert ws.state.name == "OPEN"  # the draining worker's call goes on
        for _, writer in idle:
            writer.close()
