"""Fuzzing the Media Streams edge: message strategies, the properties, and a server to run
them against. Shared by `tests/telephony/test_fuzz_*.py` and `bench/fuzz_media.py`.

Frames are generated around Twilio's real messages: every event with fields dropped, added,
of the wrong type or huge; base64 that is not; payloads of odd sizes; binary frames; bare
junk; events in any order; another stream's SID; floods of marks, digits, `clear`-like
events and media. SIDs in generated frames are the placeholders `STREAM_SID` / `CALL_SID`,
replaced by fresh ones for each session, so that every session is a distinct call.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import re
import socket
import struct
import threading
import time
import uuid
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvicorn
from hypothesis import strategies as st
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from pipeline.events import CallEnded, PipelineEvent
from telephony.messages import (
    MAX_MEDIA_PAYLOAD_BYTES,
    Connected,
    Dtmf,
    Mark,
    Media,
    ProtocolError,
    Start,
    Stop,
    parse_message,
)
from tests.fakes.engines import instant_engines
from tests.limitkit import install_limits, stream_limits_applied
from voicebot.app import create_app
from voicebot.settings import load_settings
from voicebot.ws_protocol import DirectTextProtocol

STREAM_SID = "MZ" + "5" * 32
CALL_SID = "CA" + "5" * 32
OTHER_STREAM_SID = "MZ" + "6" * 32
END_REASONS = frozenset({"stop", "disconnect"})  # what a fuzzed session may end with

# -- strategies -----------------------------------------------------------------------------

_scalars = (st.none() | st.booleans() | st.integers(-(2**70), 2**70)
            | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12))
_json_values = st.recursive(
    _scalars,
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=8,
)
_huge_text = st.builds(lambda char, n: char * n,
                       st.sampled_from(["A", "é", "\x00", "9", " ", "\U0001f4de"]),
                       st.integers(200, 70_000))
_wrong_values = st.one_of(_json_values, _huge_text, st.just(2**64), st.just(-1),
                          st.just("-1"), st.just("１２"), st.just(""))


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


_payloads = st.one_of(
    st.binary(max_size=400).map(_b64),  # odd sizes, and the empty payload
    st.sampled_from([0xFF, 0x7F, 0x00, 0x80]).flatmap(  # silence, loud, around the limit
        lambda byte: st.integers(0, MAX_MEDIA_PAYLOAD_BYTES + 40).map(
            lambda n: _b64(bytes([byte]) * n))),
    st.text(alphabet="ABCDEFGH+/=-_ \n%!é", max_size=40),  # not base64
    st.just(_b64(b"\xff" * 160)[:-1]),  # truncated padding
    st.just(_b64(bytes(range(256)) * 200)),  # 51 200 bytes: over the limit
)
_sids = st.sampled_from([STREAM_SID, STREAM_SID, OTHER_STREAM_SID, "", "MZ" + "7" * 100,
                         "MZ bad sid", "MZ\u00e9", CALL_SID])


def _template(kind: str, payload: str, sid: str) -> dict[str, Any]:
    if kind == "connected":
        return {"event": "connected", "protocol": "Call", "version": "1.0.0"}
    if kind == "start":
        return {"event": "start", "sequenceNumber": "1", "streamSid": sid, "start": {
            "streamSid": sid, "callSid": CALL_SID, "accountSid": "AC" + "0" * 32,
            "tracks": ["inbound"], "customParameters": {"from": "+15550100001"},
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}}}
    if kind == "media":
        return {"event": "media", "sequenceNumber": "3", "streamSid": sid, "media": {
            "track": "inbound", "chunk": "1", "timestamp": "20", "payload": payload}}
    if kind == "mark":
        return {"event": "mark", "streamSid": sid, "mark": {"name": "1"}}
    if kind == "dtmf":
        return {"event": "dtmf", "streamSid": sid, "dtmf": {"track": "inbound_track",
                                                             "digit": "5"}}
    if kind == "stop":
        return {"event": "stop", "streamSid": sid, "stop": {"accountSid": "AC" + "0" * 32,
                                                            "callSid": CALL_SID}}
    return {"event": kind, "streamSid": sid}  # clear (outbound only), unknown events


KINDS = ["connected", "start", "media", "mark", "dtmf", "stop", "clear", "teleport"]


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield (*prefix, key)
            yield from _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield (*prefix, index)
            yield from _paths(value, (*prefix, index))


def _apply(message: dict[str, Any], path: tuple[Any, ...], action: str, value: Any) -> None:
    parent: Any = message
    for step in path[:-1]:
        parent = parent[step]
    last = path[-1]
    if action == "drop":
        del parent[last]
    elif action == "replace":
        parent[last] = value
    elif isinstance(parent, dict):  # "extra": a sibling field nobody asked for
        parent[f"x{len(parent)}"] = value


@st.composite
def messages(draw: st.DrawFn, kinds: list[str] = KINDS) -> str:
    """A Twilio-shaped message, possibly mutated (fields dropped, added, wrong-typed, huge)."""
    kind = draw(st.sampled_from(kinds))
    message = _template(kind, draw(_payloads), draw(_sids))
    for _ in range(draw(st.integers(0, 3))):
        paths = list(_paths(message))
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        _apply(message, path, draw(st.sampled_from(["drop", "replace", "extra"])),
               draw(_wrong_values))
    return json.dumps(message)


def valid(kind: str, payload: bytes = b"\xff" * 160) -> str:
    """An exact Twilio message of `kind` for the session's placeholders."""
    return json.dumps(_template(kind, _b64(payload), STREAM_SID))


_raw = st.one_of(
    st.binary(max_size=64),  # binary frames (Twilio error 31950)
    st.text(max_size=64),
    st.integers(1, 30_000).map(lambda n: "[" * n),  # deep nesting
    st.integers(1, 30_000).map(lambda n: '{"a":' * n),
    st.sampled_from(["", "null", "[]", "{}", '"media"', "1e999", "NaN", "Infinity", "-0",
                     '{"event": null}', '{"event": ["media"]}', '{"event": {}}',
                     '{"event":"media","streamSid":"STREAM_SID","media":{"payload":"AA==",'
                     '"timestamp":1e400}}', '{"event":"media","media":[]}', "\ud800"]),
    messages().flatmap(lambda text: st.integers(0, max(0, len(text) - 1)).map(
        lambda cut: text[:cut])),  # truncated JSON
)


@st.composite
def floods(draw: st.DrawFn) -> list[str]:
    """Many copies of one message: marks, digits, `clear`s, media, junk."""
    frame = draw(st.one_of(
        st.sampled_from(["mark", "dtmf", "clear", "media", "start", "connected"]).map(valid),
        messages(["mark", "dtmf", "clear"]),
        st.just("{bad"),
    ))
    return [frame] * draw(st.integers(10, 400))


frames = st.one_of(messages(), _raw)
"""One WebSocket frame (str: text, bytes: binary) as anything might send it."""

ENDINGS = ["stop", "close", "abort", "stop_then_more", "nothing"]


@st.composite
def sessions(draw: st.DrawFn) -> tuple[list[str | bytes], str]:
    """A whole session: frames in any order (usually after a proper `connected` + `start`,
    so the call is live while the junk arrives), and how the client leaves."""
    steps: list[str | bytes] = []
    if draw(st.integers(0, 9)) < 8:
        steps += [valid("connected"), valid("start")]
    for _ in range(draw(st.integers(0, 12))):
        choice = draw(st.integers(0, 9))
        if choice < 4:
            steps.append(draw(messages()))
        elif choice < 6:
            steps.append(draw(_raw))
        elif choice < 8:
            steps.append(valid(draw(st.sampled_from(KINDS[:6])),
                               draw(st.binary(min_size=0, max_size=320))))
        else:
            steps += draw(floods())
    return steps, draw(st.sampled_from(ENDINGS))


# -- property (a): the parser ---------------------------------------------------------------

_SAFE_SID = re.compile(r"[A-Za-z0-9_.\-]{0,64}")


def check_parse(frame: str | bytes) -> None:
    """`parse_message` returns a typed event or raises `ProtocolError`; nothing else."""
    try:
        event = parse_message(frame)
    except ProtocolError as exc:
        # Short, one line: a reason is logged, and must not let a peer forge log lines.
        assert exc.reason and len(exc.reason) < 300 and "\n" not in exc.reason
        return
    assert isinstance(event, Connected | Start | Media | Dtmf | Mark | Stop)
    if isinstance(event, Media):
        assert len(event.payload) <= MAX_MEDIA_PAYLOAD_BYTES
        assert isinstance(event.chunk, int) and isinstance(event.timestamp_ms, int)
    if isinstance(event, Start):
        assert _SAFE_SID.fullmatch(event.call_sid) and event.call_sid
        assert all(isinstance(v, str) for v in event.custom_parameters.values())
    if isinstance(event, Media | Mark | Dtmf | Stop | Start):
        assert _SAFE_SID.fullmatch(event.stream_sid)


# -- property (b): a live session against the real server -----------------------------------


class LogCapture(logging.Handler):
    """Every record at INFO or above from the app, thread-safe, with a wait for new ones."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []
        self._cond = threading.Condition()

    def emit(self, record: logging.LogRecord) -> None:
        with self._cond:
            self.records.append(record)
            self._cond.notify_all()

    def ended(self, call_sid: str | None = None,
              but: Collection[str] = ()) -> list[logging.LogRecord]:
        """The stream's "call ended" records: for one call, or for all `but` some."""
        with self._cond:
            return [r for r in self.records
                    if r.name == "telephony.stream" and str(r.msg).startswith("call ended")
                    and (call_sid is None or r.args[0] == call_sid)  # type: ignore[index]
                    and r.args[0] not in but]  # type: ignore[index]

    def errors(self) -> list[logging.LogRecord]:
        """Server-side records at ERROR or with a traceback (the test's own clients excluded)."""
        with self._cond:
            return [r for r in self.records if (r.levelno >= logging.ERROR or r.exc_info)
                    and not r.name.startswith("websockets.client")]

    @staticmethod
    def text(records: list[logging.LogRecord]) -> str:
        formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")
        return "\n".join(formatter.format(r) for r in records)

    def wait(self, predicate: Any, timeout_s: float) -> bool:
        with self._cond:
            return self._cond.wait_for(predicate, timeout_s)

    @contextlib.contextmanager
    def installed(self) -> Iterator[LogCapture]:
        root = logging.getLogger()
        watched = [logging.getLogger(n) for n in ("telephony", "pipeline", "voicebot", "db")]
        levels = [logger.level for logger in watched]
        for logger in watched:
            logger.setLevel(logging.INFO)
        root.addHandler(self)
        try:
            yield self
        finally:
            root.removeHandler(self)
            for logger, level in zip(watched, levels, strict=True):
                logger.setLevel(level)


@dataclass
class FuzzServer:
    """The real app (instant engines, SQLite, limits on) under uvicorn in its own thread."""

    directory: Path
    settings_overrides: dict[str, Any] = field(default_factory=dict)
    events: list[PipelineEvent] = field(default_factory=list)
    url: str = ""
    loop: asyncio.AbstractEventLoop | None = None

    def __post_init__(self) -> None:
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._server: uvicorn.Server | None = None
        self.settings = load_settings(
            database_url=f"sqlite:///{self.directory}/fuzz.db", public_url=None,
            db_spool_dir=str(self.directory / "spool"), greeting="Hi.",
            **self.settings_overrides)
        self.app = create_app(self.settings, engines=instant_engines())
        install_limits(self.app, self.settings)

    @property
    def media_url(self) -> str:
        return self.url.replace("http://", "ws://") + "/twilio/media"

    def start(self) -> FuzzServer:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        config = uvicorn.Config(self.app, lifespan="on", log_level="warning", access_log=False,
                                ws_max_size=self.settings.max_message_bytes,
                                timeout_graceful_shutdown=2, ws=DirectTextProtocol)
        self._server = uvicorn.Server(config)
        ready = threading.Event()

        async def serve() -> None:
            self.loop = asyncio.get_running_loop()
            with stream_limits_applied(self.settings, self.app.state):
                task = asyncio.create_task(self._server.serve(sockets=[sock]))  # type: ignore[union-attr]
                while not self._server.started and not task.done():  # type: ignore[union-attr]  # noqa: ASYNC110 (uvicorn has no event)
                    await asyncio.sleep(0.01)
                if not task.done():
                    self.app.state.services.bus.subscribe("fuzz", self._add)
                ready.set()
                await task

        self._thread = threading.Thread(target=lambda: asyncio.run(serve()), daemon=True,
                                        name="fuzz-server")
        self._thread.start()
        if not ready.wait(30) or not self._server.started:
            raise RuntimeError("fuzz server did not start")
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=15)

    async def _add(self, event: PipelineEvent) -> None:
        with self._cond:
            self.events.append(event)
            self._cond.notify_all()

    def call_ended(self, call_sid: str, timeout_s: float) -> CallEnded | None:
        def find() -> CallEnded | None:
            for event in self.events:
                if isinstance(event, CallEnded) and event.call_sid == call_sid:
                    return event
            return None

        with self._cond:
            self._cond.wait_for(lambda: find() is not None, timeout_s)
            return find()

    @property
    def active_calls(self) -> int:
        return int(self.app.state.services.active_calls)

    def tasks_of(self, call_sid: str, settle_s: float = 2.0) -> list[str]:
        """Names of the server's tasks that still carry `call_sid`, after up to `settle_s`."""
        assert self.loop is not None

        async def names() -> list[str]:
            return [t.get_name() for t in asyncio.all_tasks() if call_sid in t.get_name()]

        deadline = time.monotonic() + settle_s
        while True:
            left = asyncio.run_coroutine_threadsafe(names(), self.loop).result(5)
            if not left or time.monotonic() > deadline:
                return left
            time.sleep(0.05)


def _send_all(ws: ClientConnection, frames: list[str | bytes]) -> bool:
    """Send frames until the server closes; True when all went out."""
    try:
        for frame in frames:
            ws.send(frame)
    except (ConnectionClosed, OSError):
        return False
    return True


def _read_until_closed(ws: ClientConnection, wait_s: float) -> None:
    deadline = time.monotonic() + wait_s
    with contextlib.suppress(ConnectionClosed, TimeoutError, OSError):
        while time.monotonic() < deadline:
            ws.recv(timeout=max(0.0, deadline - time.monotonic()))


def _drop(ws: ClientConnection) -> None:
    """Leave without a close frame: the TCP connection just goes (reset on close)."""
    with contextlib.suppress(OSError):
        ws.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        ws.socket.shutdown(socket.SHUT_RDWR)


def run_session(server: FuzzServer, capture: LogCapture,
                session: tuple[list[str | bytes], str], wait_s: float = 15.0,
                others: Collection[str] = ()) -> str:
    """Play one fuzzed session; assert it ended cleanly with a logged reason; return it.

    `others`: call SIDs of calls running meanwhile (their lines are not this session's)."""
    frames, ending = session
    stream_sid, call_sid = "MZ" + uuid.uuid4().hex, "CA" + uuid.uuid4().hex

    def fresh(frame: str | bytes) -> str | bytes:
        if isinstance(frame, bytes):
            return frame
        text = frame.replace(STREAM_SID, stream_sid).replace(CALL_SID, call_sid)
        try:
            text.encode()
        except UnicodeEncodeError:  # a text frame must be UTF-8: such a frame goes as binary
            return text.encode("utf-8", "surrogatepass")
        return text

    before = len(capture.ended(but=others))
    before_errors = len(capture.errors())
    with connect(server.media_url, max_size=None, max_queue=None, open_timeout=10,
                 close_timeout=5, compression=None, proxy=None) as ws:
        sent = _send_all(ws, [fresh(f) for f in frames])
        if sent and ending in ("stop", "stop_then_more"):
            sent = _send_all(ws, [fresh(valid("stop"))])
            if sent and ending == "stop_then_more":
                _send_all(ws, [fresh(valid("media")), fresh(valid("start")), b"\x00"])
            elif sent and frames[:2] == [valid("connected"), valid("start")]:
                # The call is live, so `stop` ends it and the server closes: wait for that,
                # reading, as Twilio does (else a send to a closed socket may end it first).
                _read_until_closed(ws, wait_s)
        if ending == "abort":
            _drop(ws)
    # Exactly one "call ended" line for this socket, with a reason a peer can cause.
    assert capture.wait(lambda: len(capture.ended(but=others)) > before, wait_s), \
        "session never ended"
    mine = capture.ended(but=others)[before:]
    assert len(mine) == 1, [r.getMessage() for r in mine]
    logged_sid, reason = mine[0].args[0], mine[0].args[1]  # type: ignore[index]
    assert reason in END_REASONS, mine[0].getMessage()
    assert logged_sid in ("-", call_sid), mine[0].getMessage()
    if logged_sid == call_sid:  # the call was live: it was finalized with that reason
        ended = server.call_ended(call_sid, wait_s)
        assert ended is not None and ended.reason == reason
        assert server.tasks_of(call_sid) == [], "tasks outlived the call"
    new_errors = capture.errors()[before_errors:]
    assert not new_errors, capture.text(new_errors)
    return str(reason)


# -- the call that must not notice --------------------------------------------------------


class GoodCalls:
    """Well-behaved calls placed one after another in a thread while the fuzzing runs."""

    def __init__(self, server: FuzzServer, wav: Path, pace: float = 4.0) -> None:
        self.server = server
        self.wav = wav
        self.pace = pace
        self.results: list[tuple[str, list[float | None], int]] = []
        self.all_sids: set[str] = set()  # every call placed, finished or not
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="good-calls")

    def __enter__(self) -> GoodCalls:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=60)

    @property
    def call_sids(self) -> set[str]:
        return {sid for sid, _, _ in self.results}

    def _run(self) -> None:
        from telephony.simulator import CallerTurn, SimulatedCaller

        while not self._stop.is_set():
            caller = SimulatedCaller(self.server.media_url, pace=self.pace, reply_timeout_s=10)
            self.all_sids.add(caller.call_sid)
            try:
                result = asyncio.run(caller.run([CallerTurn(wav=str(self.wav))] * 2))
            except Exception as exc:  # reported, then asserted by the test
                self.failures.append(f"{caller.call_sid}: {type(exc).__name__}: {exc}")
                return
            self.results.append((caller.call_sid, [t.latency_ms for t in result.turns],
                                 len(result.clears)))
            time.sleep(0.05)

    def assert_untouched(self, capture: LogCapture) -> None:
        """Every good call was answered each turn, never cut off, and ended with `stop`."""
        assert not self.failures, self.failures
        assert self.results, "no good call completed"
        for call_sid, latencies, clears in self.results:
            assert all(latency is not None for latency in latencies), (call_sid, latencies)
            assert clears == 0, call_sid
            ended = self.server.call_ended(call_sid, 10)
            assert ended is not None and ended.reason == "stop", (call_sid, ended)
            assert [r.args[1] for r in capture.ended(call_sid)] == ["stop"]  # type: ignore[index]
