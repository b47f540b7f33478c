"""Past one machine: two `voicebot serve` processes behind nginx (deploy/nginx.conf), sharing
one PostgreSQL database and one Redis, with STT and the LLM on an OpenAI-compatible server
(the scripted fake here, as it would be a faster-whisper server and an LLM server).

Calls through nginx land on either server; MAX_CONCURRENT_CALLS=1 holds across both (a second
simultaneous call is refused whichever server it reaches); `/api/calls` on either server
lists the calls both handled.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
import websockets
from prometheus_client.parser import text_string_to_metric_families
from websockets.exceptions import InvalidStatus

from db.migrate import upgrade_to_head_async
from telephony.simulator import CallerTurn, SimulatedCaller
from tests.conftest_db import create_pg_database, drop_pg_database, pg_url
from tests.fakes.openai_server import FakeOpenAi, Rule
from tests.serverkit import ServerProcess, eventually, free_port

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.redis]

ROOT = Path(__file__).resolve().parents[2]
REDIS_URL = os.environ.get("VOICEBOT_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def render_nginx_conf(prefix: Path, port: int, upstreams: list[int]) -> Path:
    """deploy/nginx.conf with loopback addresses, and its files under `prefix`."""
    text = (ROOT / "deploy" / "nginx.conf").read_text()
    swaps = [
        ("server voicebot1:8000", f"server 127.0.0.1:{upstreams[0]}"),
        ("server voicebot2:8000", f"server 127.0.0.1:{upstreams[1]}"),
        ("listen 80;", f"listen 127.0.0.1:{port};"),
        ("worker_processes auto;", "worker_processes 1;\n"
         + ("user root;\n" if os.geteuid() == 0 else "")
         + f"pid {prefix}/nginx.pid;\nerror_log {prefix}/error.log warn;"),
        ("http {", "http {\n" + "".join(
            f"    {kind}_temp_path {prefix}/{kind};\n"
            for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))),
    ]
    for old, new in swaps:
        assert text.count(old) == 1, f"deploy/nginx.conf no longer has {old!r}"
        text = text.replace(old, new)
    path = prefix / "nginx.conf"
    path.write_text(text)
    return path


@contextlib.contextmanager
def nginx(prefix: Path, port: int, upstreams: list[int]) -> Iterator[str]:
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(binary).exists():
        pytest.skip("nginx is not installed (apt-get install nginx)")
    conf = render_nginx_conf(prefix, port, upstreams)
    process = subprocess.Popen([binary, "-p", str(prefix), "-e", str(prefix / "error.log"),
                                "-c", str(conf), "-g", "daemon off;"])
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        process.send_signal(signal.SIGQUIT)  # graceful: finish open connections, then exit
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


async def wait_answering(url: str, within_s: float = 10) -> None:
    async with httpx.AsyncClient(timeout=2) as http:
        async def ready() -> bool:
            try:
                return (await http.get(url + "/readyz")).status_code == 200
            except httpx.TransportError:
                return False

        await eventually(ready, within_s)


@pytest.fixture
async def shared_database() -> AsyncIterator[str]:
    name = await create_pg_database("voicebot_deploy")
    url = pg_url(name)
    await upgrade_to_head_async(url)  # `voicebot db upgrade`, the release step
    try:
        yield url
    finally:
        await drop_pg_database(name)


def calls_started(metrics_text: str) -> float:
    return sum(sample.value for family in text_string_to_metric_families(metrics_text)
               for sample in family.samples if sample.name == "voicebot_calls_started_total")


@contextlib.asynccontextmanager
async def held_call(media_url: str) -> AsyncIterator[str]:
    """A call that has started (greeting playing) and stays up until the block ends."""
    call_sid = "CA" + uuid.uuid4().hex
    async with websockets.connect(media_url) as ws:
        await ws.send(json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"}))
        await ws.send(json.dumps({
            "event": "start", "sequenceNumber": "1", "streamSid": "MZ" + call_sid[2:],
            "start": {"streamSid": "MZ" + call_sid[2:], "callSid": call_sid,
                      "tracks": ["inbound"], "customParameters": {"direction": "inbound"},
                      "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000,
                                      "channels": 1}},
        }))
        assert json.loads(await asyncio.wait_for(ws.recv(), 10))["event"] == "media"
        yield call_sid
        await ws.send(json.dumps({"event": "stop", "streamSid": "MZ" + call_sid[2:],
                                  "stop": {"callSid": call_sid}}))


async def refused(media_url: str) -> bool:
    try:
        async with websockets.connect(media_url, open_timeout=5):
            return False
    except InvalidStatus as exc:
        return exc.response.status_code == 403


async def test_two_servers_behind_nginx_share_admission_storage_and_the_viewer(
    tmp_path: Path, fake_openai: FakeOpenAi, shared_database: str, fixtures_dir: Path
) -> None:
    fake_openai.transcription.text = "What time do you open tomorrow?"
    fake_openai.script(Rule(when="open", reply="We open at nine tomorrow morning."),
                       default_reply="Okay.")
    env = {
        "DATABASE_URL": shared_database,
        "REDIS_URL": REDIS_URL,
        "REDIS_NAMESPACE": f"deploy-{uuid.uuid4().hex[:8]}",
        "MAX_CONCURRENT_CALLS": "1",
        "STT_PROVIDER": "openai",
        "STT_BASE_URL": fake_openai.base_url,
        "STT_MODEL": "whisper-1",
        "LLM_BASE_URL": fake_openai.base_url,
        "LLM_MODEL": "scripted",
        "TRUSTED_PROXIES": "127.0.0.1",
        "LOG_LEVEL": "INFO",
    }
    servers = [ServerProcess(tmp_path / name, {**env, "DB_SPOOL_DIR": str(tmp_path / name)},
                             name=name) for name in ("one", "two")]
    try:
        await asyncio.gather(*(server.start() for server in servers))
        prefix = tmp_path / "nginx"
        prefix.mkdir()
        with nginx(prefix, free_port(), [s.port for s in servers]) as front:
            await wait_answering(front)
            media = front.replace("http://", "ws://") + "/twilio/media"

            # Calls through nginx land on either server (least_conn: one each here).
            placed = []
            for _ in range(2):
                caller = SimulatedCaller(media, pace=2.0)
                result = await caller.run([CallerTurn(wav=str(fixtures_dir / "open_hours.wav"))])
                assert result.turns[0].latency_ms is not None, "the bot answered"
                placed.append(caller.call_sid)
            async with httpx.AsyncClient(timeout=5) as http:
                started = [calls_started((await http.get(s.base_url + "/metrics")).text)
                           for s in servers]
            assert started == [1, 1], started
            # STT ran on the transcription server, not on the call servers.
            assert any(r.path.endswith("/audio/transcriptions") for r in fake_openai.requests)

            # One line in the whole deployment: while a call holds it, every other call is
            # refused, through nginx and on either server directly.
            async with held_call(media) as held:
                assert all([await refused(media) for _ in range(4)])
                for server in servers:
                    assert await refused(server.media_url)
                async with httpx.AsyncClient(timeout=5) as http:
                    twiml = (await http.post(front + "/twilio/voice",
                                             data={"From": "+15550001111"})).text
                assert "<Hangup" in twiml and "<Connect" not in twiml
            placed.append(held)

            # Both servers write to the one database: each lists every call.
            async with httpx.AsyncClient(timeout=5) as http:
                for base in [front, *(s.base_url for s in servers)]:
                    async def lists_all(base: str = base) -> bool:
                        listed = (await http.get(base + "/api/calls")).json()
                        return set(placed) <= {c["call_sid"] for c in listed["calls"]}

                    await eventually(lists_all, 10, interval_s=0.1)

                # When a stream ends, either server tells Twilio what comes next from the
                # shared database: a hang-up for the calls that ran (whichever server took
                # them), the busy message for a stream that never started.
                refused_sid = "CA" + uuid.uuid4().hex
                for base in (s.base_url for s in servers):
                    for call_sid in placed:
                        twiml = (await http.post(base + "/twilio/stream-ended", data={
                            "CallSid": call_sid, "CallStatus": "in-progress"})).text
                        assert "<Hangup" in twiml and "<Say>" not in twiml, (base, call_sid)
                busy = (await http.post(front + "/twilio/stream-ended", data={
                    "CallSid": refused_sid, "CallStatus": "in-progress"})).text
                assert "<Say>" in busy and "<Hangup" in busy
    finally:
        for server in servers:
            server.kill()
