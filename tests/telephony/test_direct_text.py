"""The direct text path: uvicorn's protocol hands text messages to the stream synchronously.

Two halves: `voicebot.ws_protocol` over a real uvicorn server and socket (order, flow
control, what still goes through `receive()`), and `TwilioStream` driven through a stand-in
handle (backlog order behind async work, `stop`, failures), whose frames it cannot tell from
the server's."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Callable, Sequence
from typing import Any

import pytest
import websockets
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket

import telephony.stream as stream_module
from pipeline.call_setup import CallInfo
from telephony.direct import DIRECT_TEXT
from telephony.messages import inbound_media_text
from telephony.stream import BACKLOG_PAUSE, TwilioStream
from tests.telephony.fuzzkit import OTHER_STREAM_SID, STREAM_SID, valid
from voicebot.local_server import running_server

# -- the protocol, over a real server (`running_server` uses it) ------------------------


async def test_text_goes_to_the_handler_in_order_and_the_rest_through_receive() -> None:
    seen: list[Any] = []
    done = asyncio.Event()

    async def endpoint(websocket: WebSocket) -> None:
        direct = websocket.scope["extensions"][DIRECT_TEXT]
        await websocket.accept()
        direct.attach(lambda text: seen.append(("direct", text)))
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                seen.append(("disconnect", message["code"]))
                break
            seen.append(("receive", message.get("bytes")))
        done.set()

    app = Starlette(routes=[WebSocketRoute("/ws", endpoint)])
    async with running_server(app) as base:
        async with websockets.connect(base.replace("http", "ws") + "/ws") as ws:
            for index in range(200):
                await ws.send(f"message {index}")
            await ws.send(b"\x00binary")
            await ws.send(["frag", "mented"])  # a fragmented text message
            await ws.send("é" * 3)
        await asyncio.wait_for(done.wait(), 5)
    texts = [item for kind, item in seen if kind == "direct"]
    assert texts == [f"message {index}" for index in range(200)] + ["fragmented", "ééé"]
    assert ("receive", b"\x00binary") in seen
    assert seen[-1] == ("disconnect", 1000)


async def test_a_paused_direct_path_stops_reading_until_resumed() -> None:
    got: list[str] = []
    paused = asyncio.Event()
    resume = asyncio.Event()
    finished = asyncio.Event()

    async def endpoint(websocket: WebSocket) -> None:
        direct = websocket.scope["extensions"][DIRECT_TEXT]
        await websocket.accept()

        def handler(text: str) -> None:
            got.append(text)
            if text == "pause":
                direct.pause_reading()
                paused.set()

        direct.attach(handler)
        await resume.wait()
        seen_while_paused = len(got)
        direct.resume_reading()
        while (await websocket.receive())["type"] != "websocket.disconnect":
            pass
        got.append(f"while paused: {seen_while_paused}")
        finished.set()

    app = Starlette(routes=[WebSocketRoute("/ws", endpoint)])
    async with running_server(app) as base:
        async with websockets.connect(base.replace("http", "ws") + "/ws") as ws:
            await ws.send("pause")
            await asyncio.wait_for(paused.wait(), 5)
            for index in range(20):
                await ws.send(f"after {index}")
            await asyncio.sleep(0.3)  # the server has them in its socket, unread
            resume.set()
            await asyncio.sleep(0.3)
        await asyncio.wait_for(finished.wait(), 5)
    assert got[-1] == "while paused: 1"
    assert got[:-1] == ["pause"] + [f"after {index}" for index in range(20)]


async def _messages_from(endpoint: Callable[[WebSocket], Any]) -> list[str]:
    """Serve `endpoint` on a real server; what a client receives until the close. Without
    compression, like Twilio (with an extension, every frame goes the usual way)."""
    done = asyncio.Event()

    async def serve(websocket: WebSocket) -> None:
        try:
            await endpoint(websocket)
        finally:
            done.set()

    app = Starlette(routes=[WebSocketRoute("/ws", serve)])
    async with running_server(app) as base:
        async with websockets.connect(base.replace("http", "ws") + "/ws",
                                      max_size=1 << 20, compression=None) as ws:
            got = [message async for message in ws]
        await asyncio.wait_for(done.wait(), 5)
    return got


async def test_direct_sends_arrive_in_order_with_asgi_sends_until_the_close() -> None:
    refused: list[bool] = []
    sizes = (10, 125, 126, 1000, 65535, 65536, 70000)  # each header length, at its edges

    async def endpoint(websocket: WebSocket) -> None:
        direct = websocket.scope["extensions"][DIRECT_TEXT]
        await websocket.accept()
        for index, size in enumerate(sizes):
            text = str(index) + "é" * ((size - 1) // 2) + "x" * ((size - 1) % 2)
            if index % 2:
                await websocket.send_text(text)
            else:
                assert direct.send_text(text)
        await websocket.close()
        refused.append(direct.send_text("after the close"))

    got = await _messages_from(endpoint)
    assert [len(text.encode()) for text in got] == list(sizes)
    assert [text[0] for text in got] == [str(index) for index in range(len(sizes))]
    assert refused == [False]


class _CountingTransport:
    """The server's transport, with its writes recorded."""

    def __init__(self, transport: Any, written: list[bytes]) -> None:
        self._transport = transport
        self._written = written

    def write(self, data: bytes) -> None:
        self._written.append(data)
        self._transport.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


async def test_messages_sent_together_arrive_whole_and_in_order() -> None:
    sizes = (10, 125, 126, 65535, 65536, 3)
    texts = [str(index) + "x" * (size - 1) for index, size in enumerate(sizes)]
    written: list[bytes] = []

    async def endpoint(websocket: WebSocket) -> None:
        direct = websocket.scope["extensions"][DIRECT_TEXT]
        await websocket.accept()
        protocol = direct._protocol
        transport = protocol.transport
        protocol.transport = _CountingTransport(transport, written)
        assert direct.send_texts(texts)
        protocol.transport = transport
        await websocket.close()

    assert await _messages_from(endpoint) == texts
    assert len(written) == 1  # one write (one system call) for all of them


async def test_without_the_extension_the_stream_uses_receive() -> None:
    """Another ASGI server: no handle in the scope, `receive()` for everything."""
    socket = _FakeSocket(direct=None)
    stream = TwilioStream(socket, _factory(_FakeConversation()))  # type: ignore[arg-type]
    for text in (valid("connected"), valid("start"), valid("media"), valid("stop")):
        socket.incoming.put_nowait({"type": "websocket.receive", "text": text})
    assert await asyncio.wait_for(stream.run(), 5) == "stop"
    assert stream.stats.frames == 1


async def test_an_end_that_cannot_be_stored_in_time_is_logged_by_name(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """The end is stored before the socket closes, within `END_RECORD_TIMEOUT_S`; a store
    that takes longer is given up (the recorder writes it again) and the log names the
    timeout, whose own message is empty."""
    monkeypatch.setattr(stream_module, "END_RECORD_TIMEOUT_S", 0.01)
    conversation = _FakeConversation()
    conversation.started = conversation.ended = object()  # type: ignore[attr-defined]

    async def slow_store(events: Sequence[Any]) -> None:
        await asyncio.sleep(5)

    socket = _FakeSocket(direct=None)
    stream = TwilioStream(socket, _factory(conversation), on_end=slow_store)  # type: ignore[arg-type]
    for text in (valid("connected"), valid("start"), valid("stop")):
        socket.incoming.put_nowait({"type": "websocket.receive", "text": text})
    with caplog.at_level("WARNING", logger="telephony.stream"):
        assert await asyncio.wait_for(stream.run(), 5) == "stop"
    assert any(record.getMessage().endswith(": TimeoutError")
               and "could not store the end" in record.getMessage()
               for record in caplog.records), [r.getMessage() for r in caplog.records]


# -- the stream's side, through a stand-in handle ------------------------------------------


class _FakeDirect:
    def __init__(self) -> None:
        self.handler: Callable[[str], None] | None = None
        self.attached = asyncio.Event()
        self.paused = 0
        self.resumed = 0
        self.writable = True
        self.sent: list[str] = []
        self.writes: list[int] = []  # messages per write

    def attach(self, handler: Callable[[str], None]) -> None:
        self.handler = handler
        self.attached.set()

    def detach(self) -> None:
        self.handler = None

    def pause_reading(self) -> None:
        self.paused += 1

    def resume_reading(self) -> None:
        self.resumed += 1

    @property
    def closed(self) -> bool:
        return False

    def send_text(self, text: str) -> bool:
        return self.send_texts((text,))

    def send_texts(self, texts: Sequence[str]) -> bool:
        if self.writable:
            self.sent.extend(texts)
            self.writes.append(len(texts))
        return self.writable

    def send(self, text: str) -> None:
        assert self.handler is not None, "the stream detached"
        self.handler(text)


class _FakeSocket:
    def __init__(self, direct: _FakeDirect | None) -> None:
        self.scope: dict[str, Any] = {"extensions": {DIRECT_TEXT: direct} if direct else {}}
        self.incoming: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.sent: list[str] = []

    async def receive(self) -> dict[str, Any]:
        return await self.incoming.get()

    async def send_text(self, text: str) -> None:
        self.sent.append(text)

    async def close(self) -> None:
        return None


class _FakeConversation:
    """Records what it heard; a frame whose first sample is `ACT` leaves async work."""

    ACT = 7

    def __init__(self, act_s: float = 0.0, fail_on: int | None = None) -> None:
        self.heard: list[int] = []
        self.acted: list[int] = []
        self.act_s = act_s
        self.fail_on = fail_on
        self.closed: str | None = None

    async def begin(self) -> None:
        await asyncio.sleep(0.05)  # `start` leaves async work: the frames behind it wait

    def hear(self, ulaw: bytes) -> list[Any]:
        index = len(self.heard)
        if index == self.fail_on:
            raise RuntimeError("a bug in listening")
        self.heard.append(index)
        return [index] if ulaw[0] == self.ACT else []

    async def act(self, actions: list[Any]) -> None:
        await asyncio.sleep(self.act_s)
        self.acted.extend(actions)

    async def on_dtmf(self, digit: str) -> None:
        return None

    async def close(self, reason: str) -> None:
        self.closed = reason


def _factory(conversation: _FakeConversation) -> Any:
    async def make(info: CallInfo, playout: Any, end: Any) -> _FakeConversation:
        return conversation

    return make


def _media(byte: int = 0xFF) -> str:
    return valid("media", bytes([byte]) * 160)


async def _started(conversation: _FakeConversation
                   ) -> tuple[TwilioStream, _FakeDirect, _FakeSocket, asyncio.Task[str]]:
    direct = _FakeDirect()
    socket = _FakeSocket(direct)
    stream = TwilioStream(socket, _factory(conversation))  # type: ignore[arg-type]
    run = asyncio.create_task(stream.run())
    await direct.attached.wait()
    return stream, direct, socket, run


async def test_frames_behind_async_work_wait_in_order_and_stop_ends_the_run() -> None:
    conversation = _FakeConversation(act_s=0.05)
    stream, direct, _, run = await _started(conversation)
    direct.send(valid("connected"))
    direct.send(valid("start"))  # async: the conversation begins
    for index in range(30):
        direct.send(_media(_FakeConversation.ACT if index in (3, 10) else 0xFF))
    assert conversation.heard == []  # all waiting behind `start`, none lost
    direct.send(valid("stop"))
    assert await asyncio.wait_for(run, 5) == "stop"
    assert conversation.heard == list(range(30))
    assert conversation.acted == [3, 10]  # each frame's work done before the next frame
    assert stream.stats.frames == 30
    assert conversation.closed == "stop"
    assert direct.handler is None  # detached: nothing reaches a finished call


async def test_frames_are_handled_at_once_when_nothing_is_pending() -> None:
    conversation = _FakeConversation()
    _, direct, socket, run = await _started(conversation)
    direct.send(valid("start"))
    await asyncio.sleep(0.1)
    for index in range(5):
        direct.send(_media())
        assert conversation.heard == list(range(index + 1))  # synchronously
    direct.send("not json")  # logged and ignored, like before
    direct.send(_media())
    assert conversation.heard == list(range(6))
    socket.incoming.put_nowait({"type": "websocket.disconnect", "code": 1000})
    assert await asyncio.wait_for(run, 5) == "disconnect"


async def test_a_long_backlog_pauses_reading_and_resumes_when_worked_off() -> None:
    conversation = _FakeConversation()
    _, direct, _, run = await _started(conversation)
    direct.send(valid("start"))
    for _ in range(BACKLOG_PAUSE + 10):
        direct.send(_media())
    assert direct.paused == 1 and direct.resumed == 0
    await asyncio.sleep(0.2)
    assert direct.resumed >= 1
    assert conversation.heard == list(range(BACKLOG_PAUSE + 10))
    direct.send(valid("stop"))
    assert await asyncio.wait_for(run, 5) == "stop"


@pytest.mark.parametrize("when", ["at once", "in the backlog"])
async def test_a_failure_on_the_direct_path_ends_the_call_as_an_error(when: str) -> None:
    conversation = _FakeConversation(fail_on=2)
    stream, direct, _, run = await _started(conversation)
    direct.send(valid("start"))
    if when == "at once":
        await asyncio.sleep(0.1)
    for _ in range(5):
        if direct.handler is not None:
            direct.send(_media())
    assert await asyncio.wait_for(run, 5) == "error"
    assert conversation.heard == [0, 1]
    assert conversation.closed == "error"
    assert stream.stats.frames == 3


async def test_the_call_limit_ends_a_stream_fed_only_by_the_direct_path() -> None:
    direct = _FakeDirect()
    conversation = _FakeConversation(act_s=10.0)  # its work would outlast the call
    stream = TwilioStream(_FakeSocket(direct), _factory(conversation),  # type: ignore[arg-type]
                          max_call_s=0.3)
    run = asyncio.create_task(stream.run())
    await direct.attached.wait()
    direct.send(valid("start"))
    await asyncio.sleep(0.1)
    direct.send(_media(_FakeConversation.ACT))
    assert await asyncio.wait_for(run, 5) == "max_duration"
    assert conversation.acted == []  # cancelled with the call



async def test_a_stop_waiting_in_the_backlog_ends_the_call_as_stop_despite_the_close() -> None:
    """The browser sends `stop` and closes at once: the close must not overtake the stop."""
    conversation = _FakeConversation(act_s=0.2)
    _, direct, socket, run = await _started(conversation)
    direct.send(valid("start"))
    await asyncio.sleep(0.1)
    direct.send(_media(_FakeConversation.ACT))  # async work: what follows waits
    direct.send(_media())
    direct.send(valid("stop"))
    socket.incoming.put_nowait({"type": "websocket.disconnect", "code": 1000})
    assert await asyncio.wait_for(run, 5) == "stop"
    assert conversation.heard == [0, 1]


async def test_sends_go_direct_while_the_transport_has_room_and_through_asgi_when_not() -> None:
    stream, direct, socket, run = await _started(_FakeConversation())
    direct.send(valid("start"))
    await asyncio.sleep(0.1)
    await stream._send("one")
    direct.writable = False  # the transport asked writers to wait
    await stream._send("two")
    direct.writable = True
    await stream._send("three")
    await stream._send("four", "five")  # a chunk and its mark: one write
    direct.writable = False
    await stream._send("six", "seven")
    assert direct.sent == ["one", "three", "four", "five"]
    assert direct.writes == [1, 1, 2]
    assert socket.sent == ["two", "six", "seven"]
    socket.incoming.put_nowait({"type": "websocket.disconnect", "code": 1000})
    await asyncio.wait_for(run, 5)


def _twilio_media(byte: int, sid: str = STREAM_SID, track: str = "inbound",
                  size: int = 160) -> str:
    payload = base64.b64encode(bytes([byte]) * size).decode()
    return inbound_media_text(sid, 3, 1, 20, payload, track)


@pytest.mark.parametrize("hot_path", [True, False])
async def test_twilios_media_frames_take_the_hot_path_with_the_same_outcome(
        hot_path: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """The caller's audio as Twilio lays it out skips `parse_message` and `_dispatch`
    (`inbound_media`): every other frame still goes the general way, and the stream hears,
    ignores and counts exactly what it does without the hot path."""
    taken = 0

    def counting(text: str, sid: str, limit: int) -> tuple[bytes, int] | None:
        nonlocal taken
        media = real(text, sid, limit) if hot_path else None
        taken += media is not None
        return media

    real = stream_module.inbound_media
    monkeypatch.setattr(stream_module, "inbound_media", counting)
    conversation = _FakeConversation()
    stream, direct, _, run = await _started(conversation)
    direct.send(_twilio_media(0xFF))  # before `start`: illegal, however it is laid out
    direct.send(valid("start"))
    await asyncio.sleep(0.1)
    frames = [
        _twilio_media(0xFF),
        _twilio_media(_FakeConversation.ACT),  # leaves async work: the next ones wait
        _twilio_media(0x10),
        _twilio_media(0xFF, sid=OTHER_STREAM_SID),  # another stream's: a bad message
        _twilio_media(0xFF, track="outbound"),  # not the caller's audio: ignored
        _twilio_media(0xFF, size=0),  # nothing to hear: ignored
        _twilio_media(0xFF, track="inbound_track"),
        _twilio_media(0xFF).replace(",", ", "),  # another layout: parsed, heard
        _media(0x20),  # json.dumps' layout
        _twilio_media(0xFF, size=7),  # an odd size: heard as it is
    ]
    for text in frames:
        direct.send(text)
    await asyncio.sleep(0.1)
    direct.send(valid("stop"))
    assert await asyncio.wait_for(run, 5) == "stop"
    assert direct.handler is None
    assert conversation.heard == list(range(7))
    assert conversation.acted == [1]
    assert (stream.stats.frames, stream.stats.bad_messages) == (7, 2)
    assert taken == (5 if hot_path else 0)
