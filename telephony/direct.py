"""The direct text path's contract between the ASGI server and a media stream.

A server that can hand text messages to the app as they are parsed (without the ASGI receive
queue) puts a `DirectText` handle in the WebSocket scope's extensions under `DIRECT_TEXT`
(`voicebot.ws_protocol` does it for uvicorn). `telephony.stream.TwilioStream` uses it when it
is there and `receive()` for everything when it is not.

A handle may also offer `attach_hold(hold, on_full) -> bool` (`voicebot.ws_protocol` does,
with the C extension built): the caller's quiet frames that the stream's conversation would
only hold are kept in a `telephony._fastmedia.QuietHold` without reaching the handler, and
`on_full` runs when the hold has as many as its `limit` (see `TwilioStream`, "the quiet
hold"). A handle without it sends every message to the handler.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

DIRECT_TEXT = "voicebot.direct_text"


class DirectText(Protocol):
    def attach(self, handler: Callable[[str], None]) -> None:
        """Complete text messages go to `handler`, in order, synchronously; it must not
        raise or block."""

    def detach(self) -> None:
        """Back to `receive()` for everything (reading resumes if it was paused)."""

    def send_text(self, text: str) -> bool:
        """Write a text message now if the connection is open and the transport has room;
        False when it cannot (then send through ASGI, which waits for room or raises)."""

    def send_texts(self, texts: Sequence[str]) -> bool:
        """`send_text` for several messages, written together (one system call), in order:
        all of them or, returning False, none."""

    def pause_reading(self) -> None:
        """Stop reading the socket (the handler has a backlog)."""

    def resume_reading(self) -> None: ...

    @property
    def closed(self) -> bool:
        """The connection is closing or gone: the server sent its close frame (a protocol
        error in the peer's frames does that on its own) or the peer left."""
