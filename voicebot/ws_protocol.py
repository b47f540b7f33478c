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

The handler owns flow control: `pause_reading()` stops reading the socket while it has a
backlog, `resume_reading()` starts again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

from telephony.direct import DIRECT_TEXT

log = logging.getLogger(__name__)

TextHandler = Callable[[str], None]


class DirectText:
    """The app's handle on one connection's direct text path (see the module doc)."""

    __slots__ = ("_paused", "_protocol", "handler")

    def __init__(self, protocol: DirectTextProtocol) -> None:
        self._protocol = protocol
        self.handler: TextHandler | None = None
        self._paused = False

    def attach(self, handler: TextHandler) -> None:
        """From now on, complete text messages go to `handler` instead of `receive()`."""
        self.handler = handler

    def detach(self) -> None:
        self.handler = None
        self.resume_reading()

    def pause_reading(self) -> None:
        if not self._paused:
            self._paused = True
            self._protocol.pause_direct()

    def resume_reading(self) -> None:
        if self._paused:
            self._paused = False
            self._protocol.resume_direct()


class DirectTextProtocol(WebSocketsSansIOProtocol):
    """`WebSocketsSansIOProtocol` whose text messages can bypass the receive queue."""

    direct: DirectText | None = None
    _direct_paused = False

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

    def pause_direct(self) -> None:
        self._direct_paused = True
        if not self.read_paused and not self.transport.is_closing():
            self.read_paused = True
            self.transport.pause_reading()

    def resume_direct(self) -> None:
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
