"""uvicorn's WebSocket protocol with a direct path for text messages.

uvicorn hands every received message to the ASGI app through an `asyncio.Queue`, and after
each one pauses reading the socket until the app has taken it (`pause_reading` /
`resume_reading`: two changes to the event loop's poller). For a media stream that is 50
messages a second per call, and each costs a queue put and get, a task wake-up, the ASGI
receive wrappers and two poller changes before the frame's own work starts.

`DirectTextProtocol` lets the app take text messages as they are parsed instead: a
connection's scope carries a `DirectText` handle under `scope["extensions"][DIRECT_TEXT]`;
an app that attaches a handler gets each complete text message synchronously, in the
protocol's `data_received`, in order. The handler must not raise and must not block (it runs
on the event loop between socket reads). Everything else — the handshake, binary messages,
pings, close and disconnect — goes the usual way, so the app's `receive()` still reports the
end of the connection. Without the extension (another ASGI server, Starlette's test client)
the app uses `receive()` for everything, as before.

Sending has a direct path too: `DirectText.send_text` writes a text frame to the transport at
once (what uvicorn's `send` does for `websocket.send`, without the ASGI message, the
`websockets` frame objects and an await), and `send_texts` several in one write, when the
connection is open and the transport is not asking writers to wait; otherwise it returns
False and the app sends through ASGI.

The handler owns flow control: `pause_reading()` stops reading the socket while it has a
backlog, `resume_reading()` starts again.

While a handler is attached, the protocol also reads the frames itself: a complete, final,
masked text frame without extension bits (every message Twilio sends) is unmasked and
decoded here, about a sixth of the cost of `websockets`' general parser (and that usual frame
is read in C, `telephony._fastmedia.masked_text`, when the extension is built: the loop's own
steps for it, in one call). A handler may also attach a *quiet hold*
(`DirectText.attach_hold`, `telephony._fastmedia.QuietHold`): frames the hold takes (the
caller's quiet audio while the stream's conversation would only hold it) are kept in C, with
no Python call per frame, and `on_full` is called when it has as many as it may. Any other frame —
ping, pong, close, binary, a fragment, an oversized or malformed one — is handed whole to
`websockets`, which checks and answers it as before; the two never see half a frame each.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.frames import apply_mask
from websockets.protocol import State

from telephony.direct import DIRECT_TEXT

try:  # the usual frame read in C (telephony/_fastmedia.c); without it, the loop below
    from telephony._fastmedia import QuietHold
    from telephony._fastmedia import masked_hold as _masked_hold
    from telephony._fastmedia import masked_text as _masked_text
except ImportError:  # pragma: no cover - depends on the install
    _masked_text = _masked_hold = QuietHold = None

TextHandler = Callable[[str], None]


class DirectText:
    """The app's handle on one connection's direct text path (see the module doc)."""

    __slots__ = ("_protocol", "handler", "hold", "on_full")

    def __init__(self, protocol: DirectTextProtocol) -> None:
        self._protocol = protocol
        self.handler: TextHandler | None = None
        self.hold: QuietHold | None = None
        self.on_full: Callable[[], None] | None = None

    def attach(self, handler: TextHandler) -> None:
        """From now on, complete text messages go to `handler` instead of `receive()`."""
        self.handler = handler

    def attach_hold(self, hold: QuietHold, on_full: Callable[[], None]) -> bool:
        """Frames `hold` takes are kept there instead of going to the handler, while its
        `limit` is above its `count`; `on_full` runs when they meet (it must not raise).
        False without the C extension (nothing is held)."""
        if _masked_hold is None:
            return False
        self.hold = hold
        self.on_full = on_full
        return True

    def detach(self) -> None:
        self.handler = None
        self.hold = self.on_full = None
        self.resume_reading()

    @property
    def closed(self) -> bool:
        protocol = self._protocol
        return protocol.close_sent or protocol.disconnected

    def send_text(self, text: str) -> bool:
        return self._protocol.send_text_now((text,))

    def send_texts(self, texts: Sequence[str]) -> bool:
        return self._protocol.send_text_now(texts)

    def pause_reading(self) -> None:
        self._protocol.pause_direct()

    def resume_reading(self) -> None:
        self._protocol.resume_direct()


class DirectTextProtocol(WebSocketsSansIOProtocol):
    """`WebSocketsSansIOProtocol` whose text messages can bypass the receive queue."""

    direct: DirectText | None = None
    _direct_paused = False
    _reading = False  # this protocol reads the frames (see the module doc)
    _partial = b""  # the start of a frame not yet complete

    def data_received(self, data: bytes) -> None:
        if not self._reading:
            if not self._can_read_frames():
                super().data_received(data)
                return
            self._reading = True
        if self._partial:
            data = self._partial + data
            self._partial = b""
        self._read_frames(data)

    def _can_read_frames(self) -> bool:
        """Only between messages of an open connection with a handler attached, and when
        `websockets` holds no buffered bytes: the byte stream then changes hands cleanly."""
        direct = self.direct
        conn = self.conn
        return (direct is not None and direct.handler is not None and self.handshake_complete
                and not self.close_sent and conn.state is State.OPEN
                and not conn.extensions and not conn.expect_continuation_frame
                and not conn.reader.buffer)

    def _read_frames(self, data: bytes) -> None:
        end = len(data)
        pos = 0
        max_size = self.conn.max_message_size
        limit = -1 if max_size is None else max_size
        while end - pos >= 2:
            direct = self.direct
            handler = None if direct is None else direct.handler
            if (_masked_text is not None and handler is not None and not self.close_sent
                    and not self.conn.expect_continuation_frame):
                # The usual frame (a whole, final, masked text frame, UTF-8 within the
                # limit) read in C: exactly what the lines below do with it; with a quiet
                # hold that has room, frames it takes are kept there instead.
                hold = direct.hold  # type: ignore[union-attr]
                if hold is not None and hold.limit > hold.count:
                    read = _masked_hold(data, pos, limit, hold)  # type: ignore[misc]
                else:
                    read = _masked_text(data, pos, limit)
                if read is not None:
                    pos = read[1]
                    text = read[0]
                    if text is not None:
                        handler(text)
                    elif hold.count >= hold.limit:  # type: ignore[union-attr]
                        direct.on_full()  # type: ignore[union-attr, misc]
                    continue
            first, second = data[pos], data[pos + 1]
            length = second & 0x7F
            head = 2
            if length == 126:
                if end - pos < 4:
                    break
                length = int.from_bytes(data[pos + 2 : pos + 4], "big")
                head = 4
            elif length == 127:
                if end - pos < 10:
                    break
                length = int.from_bytes(data[pos + 2 : pos + 10], "big")
                head = 10
            if second & 0x80:
                head += 4  # the client's mask
            frame_end = pos + head + length
            if (first != 0x81 or not second & 0x80 or handler is None or self.close_sent
                    or (max_size is not None and length > max_size)
                    or self.conn.expect_continuation_frame):
                # Not a plain text message, or no one to take it: `websockets` parses it.
                if frame_end <= end and (max_size is None or length <= max_size):
                    super().data_received(data[pos:frame_end])
                    pos = frame_end
                    if self._can_read_frames():
                        continue
                # From here on, `websockets` reads (until `_can_read_frames` again).
                self._reading = False
                if pos < end:
                    super().data_received(data[pos:])
                return
            if frame_end > end:
                break
            mask = data[frame_end - length - 4 : frame_end - length]
            try:
                text = str(apply_mask(data[frame_end - length : frame_end], mask), "utf-8")
            except UnicodeDecodeError:
                self._reading = False
                super().data_received(data[pos:])  # `websockets` closes with 1007
                return
            pos = frame_end
            handler(text)
        if pos < end:
            self._partial = data[pos:]

    def handle_connect(self, event):  # type: ignore[no-untyped-def]
        super().handle_connect(event)
        scope = getattr(self, "scope", None)  # absent when the handshake was refused
        if scope is not None:
            self.direct = DirectText(self)
            scope["extensions"][DIRECT_TEXT] = self.direct

    def send_receive_event_to_app(self) -> None:
        direct = self.direct
        handler = None if direct is None else direct.handler
        if handler is None or self.curr_msg_data_type != "text" or self.close_sent:
            super().send_receive_event_to_app()
            return
        frames = self.frames
        data = frames[0] if len(frames) == 1 else b"".join(frames)
        try:
            text = str(data, "utf-8")
        except UnicodeDecodeError:
            super().send_receive_event_to_app()  # closes with 1007, as uvicorn does
            return
        self.frames = []
        handler(text)

    def send_text_now(self, texts: Sequence[str]) -> bool:
        """Write text frames now, as `send({"type": "websocket.send"})` would (unmasked,
        final, uncompressed), all in one transport write (a media chunk and its mark cost one
        `send` system call, not two), when the connection is open and the transport has
        room; False otherwise, and the caller sends through ASGI (which waits for room, or
        raises)."""
        if (self.close_sent or self.disconnected or not self.handshake_complete
                or self.initial_response is not None or not self.writable.is_set()
                or self.conn.state is not State.OPEN or self.conn.extensions
                or self.transport.is_closing()):
            return False
        parts: list[bytes] = []
        for text in texts:
            payload = text.encode()
            n = len(payload)
            if n < 126:
                parts.append(bytes((0x81, n)))
            elif n < 65536:
                parts.append(b"\x81\x7e" + n.to_bytes(2, "big"))
            else:
                parts.append(b"\x81\x7f" + n.to_bytes(8, "big"))
            parts.append(payload)
        self.transport.write(b"".join(parts))
        return True

    def pause_direct(self) -> None:
        if self._direct_paused:
            return
        self._direct_paused = True
        if not self.read_paused and not self.transport.is_closing():
            self.read_paused = True
            self.transport.pause_reading()

    def resume_direct(self) -> None:
        if not self._direct_paused:
            return
        self._direct_paused = False
        if self.read_paused and self.queue.empty() and not self.transport.is_closing():
            self.read_paused = False
            self.transport.resume_reading()

    async def receive(self):  # type: ignore[no-untyped-def]
        message = await self.queue.get()
        # A paused direct path keeps the socket paused, whatever the queue says.
        if self.read_paused and self.queue.empty() and not self._direct_paused:
            self.read_paused = False
            self.transport.resume_reading()
        return message
