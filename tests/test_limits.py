"""The server's limits and what a peer sees when it hits one (voicebot/limits.py, and the
limit hooks of telephony/stream.py): request bodies, WebSocket message size, calls per
source address, call length, and a peer that stops reading."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import websockets
from starlette.requests import HTTPConnection
from starlette.testclient import TestClient

from pipeline.conversation import Engines
from pipeline.events import CallEnded, CallStarted
from pipeline.tts_piper import ToneTts
from telephony.rest import TwilioRest
from tests.fakes.engines import FixedStt, ScriptedLlm, instant_engines
from tests.fakes.twilio_server import FakeTwilio
from tests.limitkit import install_limits, limited_server
from voicebot.app import create_app
from voicebot.limits import BodyLimit, CallsPerAddress, Limits
from voicebot.settings import Settings, load_settings

AUTH_TOKEN = "limits-test-token"


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return load_settings(database_url=f"sqlite:///{tmp_path}/calls.db", public_url=None,
                         db_spool_dir=str(tmp_path / "spool"), greeting="Hi.")


def with_limits(settings: Settings, **limits: Any) -> Settings:
    return settings.model_copy(update=limits)


def start_frames(call_sid: str, stream_sid: str) -> list[str]:
    return [
        json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"}),
        json.dumps({"event": "start", "streamSid": stream_sid, "start": {
            "streamSid": stream_sid, "callSid": call_sid, "accountSid": "AC" + "0" * 32,
            "tracks": ["inbound"], "customParameters": {},
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}}}),
    ]


def silence_frame(stream_sid: str) -> str:
    payload = base64.b64encode(b"\xff" * 160).decode()
    return json.dumps({"event": "media", "streamSid": stream_sid,
                       "media": {"track": "inbound", "chunk": "1", "timestamp": "20",
                                 "payload": payload}})


# -- request bodies ---------------------------------------------------------------------------


async def _echo_body(scope: dict, receive: Any, send: Any) -> None:
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": str(len(body)).encode()})


async def _call(app: Any, headers: list[tuple[bytes, bytes]], chunks: int, size: int
                ) -> tuple[int | None, int]:
    """Send `chunks` body chunks of `size` bytes through `app`; (status, chunks pulled)."""
    pulled = 0
    status: int | None = None

    async def receive() -> dict:
        nonlocal pulled
        pulled += 1
        return {"type": "http.request", "body": b"x" * size, "more_body": pulled < chunks}

    async def send(message: dict) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    scope = {"type": "http", "method": "POST", "path": "/twilio/status", "headers": headers,
             "client": ("127.0.0.1", 5000)}
    await BodyLimit(_echo_body, max_bytes=64 * 1024)(scope, receive, send)
    return status, pulled


async def test_a_declared_body_over_the_limit_gets_413_without_being_read() -> None:
    status, pulled = await _call(_echo_body, [(b"content-length", b"10000000")], 1000, 10_000)
    assert (status, pulled) == (413, 0)


async def test_a_streamed_body_gets_413_as_soon_as_it_passes_the_limit() -> None:
    status, pulled = await _call(_echo_body, [], chunks=1000, size=16 * 1024)
    assert status == 413
    assert pulled == 5  # 5 × 16 KiB is the first read past 64 KiB: the rest is never read


async def test_bodies_within_the_limit_pass_untouched() -> None:
    status, pulled = await _call(_echo_body, [(b"content-length", b"40000")], 4, 10_000)
    assert (status, pulled) == (200, 4)


async def test_a_malformed_content_length_gets_400() -> None:
    status, pulled = await _call(_echo_body, [(b"content-length", b"12, 12")], 1, 10)
    assert (status, pulled) == (400, 0)


def test_webhooks_with_huge_bodies_get_413_from_the_app(settings: Settings) -> None:
    app = create_app(settings, engines=instant_engines())
    install_limits(app, settings)
    with TestClient(app) as client:
        for path in ("/twilio/voice", "/twilio/status", "/twilio/stream-status", "/twilio/amd"):
            big = client.post(path, content=b"CallSid=" + b"A" * 200_000,
                              headers={"content-type": "application/x-www-form-urlencoded"})
            assert big.status_code == 413, path

            def chunks() -> Iterator[bytes]:
                for _ in range(100):
                    yield b"A" * 4096

            streamed = client.post(path, content=chunks(),
                                   headers={"content-type": "application/x-www-form-urlencoded"})
            assert streamed.status_code == 413, path


# -- calls per source address -----------------------------------------------------------------


def _conn(peer: str, forwarded: str | None = None) -> HTTPConnection:
    headers = [(b"x-forwarded-for", forwarded.encode())] if forwarded else []
    return HTTPConnection({"type": "websocket", "client": (peer, 4000), "headers": headers,
                           "path": "/twilio/media", "query_string": b""})


def test_calls_per_address_are_counted_and_released() -> None:
    limiter = CallsPerAddress(2)
    assert limiter.acquire("10.0.0.1") and limiter.acquire("10.0.0.1")
    assert not limiter.acquire("10.0.0.1")
    assert limiter.acquire("10.0.0.2")  # another address has its own allowance
    limiter.release("10.0.0.1")
    assert limiter.acquire("10.0.0.1")
    for _ in range(3):
        limiter.release("10.0.0.1")
    limiter.release("10.0.0.2")
    assert limiter.open == {}


def test_the_forwarded_address_counts_only_behind_a_trusted_proxy() -> None:
    limiter = CallsPerAddress(5, trusted_proxies="127.0.0.1")
    assert limiter.address(_conn("127.0.0.1", "203.0.113.9, 198.51.100.7")) == "198.51.100.7"
    assert limiter.address(_conn("192.0.2.1", "198.51.100.7")) == "192.0.2.1"
    assert limiter.address(_conn("127.0.0.1")) == "127.0.0.1"


def test_limits_default_from_settings_that_lack_them() -> None:
    assert Limits.from_settings(object()) == Limits()
    assert Limits.from_settings(load_settings()).max_calls_per_address >= 1


async def test_unsigned_calls_over_the_per_address_limit_are_refused(settings: Settings) -> None:
    limited = with_limits(settings, max_calls_per_address=2)
    async with limited_server(limited, instant_engines()) as served:
        first = await websockets.connect(served.media_url)
        second = await websockets.connect(served.media_url)
        with pytest.raises(websockets.exceptions.InvalidStatus) as refused:
            await websockets.connect(served.media_url)
        assert refused.value.response.status_code == 403
        await first.close()
        # The slot comes back once the first call's handler has finished.
        async with asyncio.timeout(5):
            while served.app.state.calls_per_address.open.get("127.0.0.1") != 1:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        third = await websockets.connect(served.media_url)
        await second.close()
        await third.close()


async def test_calls_signed_by_twilio_are_not_limited_per_address(settings: Settings) -> None:
    from twilio.request_validator import RequestValidator

    signed = with_limits(settings, max_calls_per_address=1, twilio_auth_token=AUTH_TOKEN)
    async with limited_server(signed, instant_engines()) as served:
        url = served.media_url
        signature = RequestValidator(AUTH_TOKEN).compute_signature(
            url.replace("ws://", "wss://"), {})
        headers = {"X-Twilio-Signature": signature}
        sockets = [await websockets.connect(url, additional_headers=headers) for _ in range(3)]
        for ws in sockets:
            await ws.close()
        with pytest.raises(websockets.exceptions.InvalidStatus):  # unsigned: the guard refuses
            await websockets.connect(url)


# -- message size -----------------------------------------------------------------------------


async def test_a_frame_over_ws_max_size_closes_the_socket_and_the_call_is_finalized(
    settings: Settings,
) -> None:
    """`voicebot serve` runs uvicorn with ws_max_size = MAX_MESSAGE_BYTES: 1009, then the call
    ends as a disconnect and is stored as ended."""
    call_sid, stream_sid = "CA" + uuid.uuid4().hex, "MZ" + uuid.uuid4().hex
    async with limited_server(settings, instant_engines(),
                              ws_max_size=settings.max_message_bytes) as served:
        async with websockets.connect(served.media_url, max_size=None) as ws:
            for frame in start_frames(call_sid, stream_sid):
                await ws.send(frame)
            # (uvicorn drops frames that arrive in the same read as an oversized one)
            await served.wait_for(lambda e: isinstance(e, CallStarted) and e.call_sid == call_sid)
            await ws.send("x" * (settings.max_message_bytes + 1))
            with pytest.raises(websockets.exceptions.ConnectionClosed):
                async with asyncio.timeout(5):
                    while True:
                        await ws.recv()
            assert ws.close_code == 1009
        ended = await served.ended(call_sid)
        assert ended.reason == "disconnect"
        assert (await served.app.state.calls.get_call(call_sid)).as_json()["end_reason"] == \
            "disconnect"


async def test_a_frame_over_max_message_bytes_is_ignored_and_the_call_goes_on(
    settings: Settings, caplog: pytest.LogCaptureFixture,
) -> None:
    call_sid, stream_sid = "CA" + uuid.uuid4().hex, "MZ" + uuid.uuid4().hex
    async with (limited_server(settings, instant_engines()) as served,  # ws_max_size 1 MiB
                websockets.connect(served.media_url) as ws):
        for frame in start_frames(call_sid, stream_sid):
            await ws.send(frame)
        await ws.send(json.dumps({"event": "mark", "streamSid": stream_sid,
                                  "mark": {"name": "x" * 100_000}}))
        await ws.send(json.dumps({"event": "stop", "streamSid": stream_sid, "stop": {}}))
        ended = await served.ended(call_sid)
    assert ended.reason == "stop"
    assert any("exceeds" in r.getMessage() for r in caplog.records)


# -- call length ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fake_twilio() -> Iterator[FakeTwilio]:
    with FakeTwilio() as fake:
        yield fake


async def test_a_call_longer_than_max_call_s_is_ended_and_hung_up(
    settings: Settings, fake_twilio: FakeTwilio,
) -> None:
    call_sid = fake_twilio.add_call()
    stream_sid = "MZ" + uuid.uuid4().hex
    short = with_limits(settings, max_call_s=1.0)
    async with limited_server(short, instant_engines()) as served:
        served.app.state.twilio_rest = TwilioRest(fake_twilio.account_sid, fake_twilio.auth_token,
                                                  api_base=fake_twilio.url)
        started = time.monotonic()
        async with websockets.connect(served.media_url) as ws:
            for frame in start_frames(call_sid, stream_sid):
                await ws.send(frame)
            with pytest.raises(websockets.exceptions.ConnectionClosedOK):
                async with asyncio.timeout(10):
                    while True:  # a caller who never hangs up
                        await ws.send(silence_frame(stream_sid))
                        await asyncio.sleep(0.02)
        held = time.monotonic() - started
        ended = await served.ended(call_sid)
        detail = (await served.app.state.calls.get_call(call_sid)).as_json()
    assert 1.0 <= held < 3.0
    assert ended.reason == "max_duration" and detail["end_reason"] == "max_duration"
    hang_ups = fake_twilio.of("POST", f"/Calls/{call_sid}.json")
    assert [r.form.get("Status") for r in hang_ups] == ["completed"]
    assert fake_twilio.calls[call_sid]["status"] == "completed"


async def test_max_call_s_ends_the_call_without_a_rest_client(settings: Settings) -> None:
    call_sid, stream_sid = "CA" + uuid.uuid4().hex, "MZ" + uuid.uuid4().hex
    async with limited_server(with_limits(settings, max_call_s=0.5),
                              instant_engines()) as served:
        assert getattr(served.app.state, "twilio_rest", None) is None
        async with websockets.connect(served.media_url) as ws:
            for frame in start_frames(call_sid, stream_sid):
                await ws.send(frame)
            with pytest.raises(websockets.exceptions.ConnectionClosedOK):
                async with asyncio.timeout(10):
                    while True:
                        await ws.recv()
        assert (await served.ended(call_sid)).reason == "max_duration"


# -- a peer that stops reading ----------------------------------------------------------------


def _ws_frame(text: str) -> bytes:
    """One masked client text frame (RFC 6455 §5.2)."""
    data = text.encode()
    mask = os.urandom(4)
    head = bytes([0x81])
    if len(data) < 126:
        head += bytes([0x80 | len(data)])
    else:
        head += bytes([0x80 | 126]) + len(data).to_bytes(2, "big")
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(data))


def _open_and_never_read(port: int, frames: list[str]) -> socket.socket:
    """A WebSocket client that sends its frames and then never reads a byte."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall((f"GET /twilio/media HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                  "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                  f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
    response = b""
    while b"\r\n\r\n" not in response:
        response += sock.recv(1)
    assert response.startswith(b"HTTP/1.1 101"), response
    for frame in frames:
        sock.sendall(_ws_frame(frame))
    return sock


@pytest.mark.slow
async def test_a_client_that_never_reads_is_dropped_after_the_send_timeout(
    settings: Settings,
) -> None:
    """Outbound audio goes at real time (200 ms ahead); the ASGI server's send waits while
    its write buffer is full, so a wedged client costs a bounded buffer, then the call ends."""
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)  # inherited when accepted
    listener.bind(("127.0.0.1", 0))
    long_greeting = "Hello there, this is a very long greeting. " * 25  # ~60 s of tone
    engines = Engines(stt=FixedStt(), llm=ScriptedLlm(), tts=ToneTts(max_ms=120_000),
                      vad=instant_engines().vad, stt_limiter=anyio.CapacityLimiter(1))
    slow = with_limits(settings, send_timeout_s=0.5, greeting=long_greeting)
    call_sid, stream_sid = "CA" + uuid.uuid4().hex, "MZ" + uuid.uuid4().hex
    async with limited_server(slow, engines, sock=listener) as served:
        port = listener.getsockname()[1]
        started = time.monotonic()
        client = await asyncio.to_thread(_open_and_never_read, port,
                                         start_frames(call_sid, stream_sid))
        try:
            ended = await served.ended(call_sid, wait_s=40)
            took = time.monotonic() - started
            assert ended.reason == "send_timeout"
            detail = (await served.app.state.calls.get_call(call_sid)).as_json()
            assert detail["end_reason"] == "send_timeout"
            # What the server had pushed out is bounded by the socket buffers, far less than
            # the minute of audio the greeting holds.
            client.settimeout(2)
            pushed = 0
            while chunk := await asyncio.to_thread(_recv_or_empty, client):
                pushed += len(chunk)
        finally:
            client.close()
    greeting_bytes = len(long_greeting) * 60 * 8 * 4 // 3  # base64 μ-law at 60 ms a char
    assert pushed < 300_000 < greeting_bytes
    assert took < 30


def _recv_or_empty(sock: socket.socket) -> bytes:
    try:
        return sock.recv(65536)
    except (TimeoutError, OSError):
        return b""


async def test_the_end_of_a_call_is_stored_even_when_the_hang_up_fails(
    settings: Settings,
) -> None:
    """A REST client that cannot reach Twilio: the call still ends, logged, and is stored."""
    call_sid, stream_sid = "CA" + uuid.uuid4().hex, "MZ" + uuid.uuid4().hex
    async with limited_server(with_limits(settings, max_call_s=0.5),
                              instant_engines()) as served:
        served.app.state.twilio_rest = TwilioRest("AC" + "0" * 32, "token",
                                                  api_base="http://127.0.0.1:9", timeout_s=1)
        async with websockets.connect(served.media_url) as ws:
            for frame in start_frames(call_sid, stream_sid):
                await ws.send(frame)
            with pytest.raises(websockets.exceptions.ConnectionClosedOK):
                async with asyncio.timeout(10):
                    while True:
                        await ws.recv()
        ended = await served.wait_for(
            lambda e: isinstance(e, CallEnded) and e.call_sid == call_sid)
        assert isinstance(ended, CallEnded) and ended.reason == "max_duration"
        async with httpx.AsyncClient(base_url=served.base_url) as http:
            await served.app.state.services.bus.drain()
            detail = (await http.get(f"/api/calls/{call_sid}")).json()
        assert detail["end_reason"] == "max_duration"
