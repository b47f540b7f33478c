"""Outbound audio pacing for one Twilio stream, with marks and `clear`.

Twilio plays `media` messages in order and buffers whatever we send. If we sent a whole reply at
once, a barge-in `clear` would still work, but our idea of "what the caller heard" would only
come from marks, and a slow network would let the buffer grow. So we keep Twilio's buffer short:
audio goes out in `chunk_ms` pieces, each followed by a `mark`, and we only send when less than
`lead_ms` is queued at Twilio. "Queued at Twilio" is estimated two ways and the smaller wins:
the wall clock (audio plays in real time) and the marks not yet echoed (Twilio echoes a mark
once the audio before it has played). Marks also tell each segment how much was heard.

The defaults, 200 ms pieces and a 300 ms lead, keep at least 100 ms queued at Twilio between
sends (as 100 ms pieces with a 200 ms lead did) with half the messages: every piece is a
write, a mark and its echo, and a wake-up of this loop, about a tenth of a server's CPU at
100 ms (`bench/capacity_media.py`, docs/ARCHITECTURE.md "Capacity"). What is heard is known
to the piece; a barge-in's `clear` drops Twilio's whole buffer whatever its size.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable

from pipeline.speech import ULAW_BYTES_PER_MS, SpokenSegment
from telephony.messages import clear_message, mark_message, media_message

log = logging.getLogger(__name__)

# Defaults of the settings PLAYOUT_LEAD_MS and PLAYOUT_CHUNK_MS (voicebot/settings.py).
DEFAULT_LEAD_MS = 300
DEFAULT_CHUNK_MS = 200

# Sends text messages in order; several given at once go out together (one write).
Send = Callable[..., Awaitable[None]]


class TwilioPlayout:
    """Paces `SpokenSegment`s onto a Twilio stream and implements `AudioSink`."""

    def __init__(
        self,
        send: Send,
        stream_sid: str,
        *,
        lead_ms: int = DEFAULT_LEAD_MS,
        chunk_ms: int = DEFAULT_CHUNK_MS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._send = send
        self._stream_sid = stream_sid
        self._lead_ms = lead_ms
        self._chunk_ms = chunk_ms
        self._chunk_bytes = chunk_ms * ULAW_BYTES_PER_MS
        self._clock = clock
        self._queue: deque[SpokenSegment] = deque()
        self._pending: dict[str, tuple[SpokenSegment, int, int]] = {}
        self._names = itertools.count(1)
        self._wake = asyncio.Event()
        self._buffer_until = 0.0  # wall-clock estimate of when Twilio's buffer runs dry
        self._unacked_bytes = 0
        self._lock = asyncio.Lock()  # one writer of media/mark/clear at a time
        self.sent_chunks = 0
        self.clears = 0

    # AudioSink -----------------------------------------------------------------------------
    def play(self, segment: SpokenSegment) -> None:
        if not segment.audio:
            segment.mark_played(0)
            segment.first_sent.set()
            return
        self._queue.append(segment)
        self._wake.set()

    @property
    def busy(self) -> bool:
        return bool(self._queue) or bool(self._pending)

    async def clear(self) -> bool:
        if not self.busy:
            return False
        async with self._lock:
            dropped = list(self._queue) + [seg for seg, _, _ in self._pending.values()]
            self._queue.clear()
            # Marks still pending are echoed by Twilio right after a clear; they do not mean
            # "heard", so forget them now and ignore the echoes.
            self._pending.clear()
            self._unacked_bytes = 0
            self._buffer_until = 0.0
            await self._send(clear_message(self._stream_sid))
            self.clears += 1
        for segment in dropped:
            segment.mark_cleared()
        return True

    # Marks ---------------------------------------------------------------------------------
    def on_mark(self, name: str) -> None:
        """Twilio echoed a mark: the audio before it has been played to the caller."""
        entry = self._pending.pop(name, None)
        if entry is None:
            return  # an echo after `clear`, or a name we never sent
        segment, upto, nbytes = entry
        self._unacked_bytes = max(0, self._unacked_bytes - nbytes)
        segment.mark_played(upto)
        self._wake.set()

    async def wait_idle(self) -> None:
        """Wait until everything queued has been played (or cleared)."""
        while self.busy:
            segments = list(self._queue) + [seg for seg, _, _ in self._pending.values()]
            await asyncio.gather(*(s.finished.wait() for s in segments))

    # Pacing loop ---------------------------------------------------------------------------
    def _queued_ms(self, now: float) -> float:
        by_clock = max(0.0, self._buffer_until - now) * 1000.0
        by_marks = self._unacked_bytes / ULAW_BYTES_PER_MS
        return min(by_clock, by_marks)

    async def run(self) -> None:
        """Send audio as the lead allows; runs for the life of the stream."""
        loop = asyncio.get_running_loop()
        wake = self._wake
        while True:
            if not self._queue:
                wake.clear()
                await wake.wait()
                continue
            now = self._clock()
            queued = self._queued_ms(now)
            # A segment's short last piece goes when a whole one would: the pieces reach
            # Twilio a piece's time apart.
            if queued > 0 and queued + self._chunk_ms > self._lead_ms:
                wake.clear()
                wait_s = (queued + self._chunk_ms - self._lead_ms) / 1000.0 + 0.002
                # A timer sets the wake event: waiting costs no exception when the time
                # comes (about once a chunk, as an expiring `asyncio.timeout` would raise),
                # and a cancellation goes straight through (`asyncio.wait_for` on 3.11 can
                # swallow one that lands as the event fires).
                timer = loop.call_later(wait_s, wake.set)
                try:
                    await wake.wait()
                finally:
                    timer.cancel()
                continue
            await self._send_next_chunk(now)

    async def _send_next_chunk(self, now: float) -> None:
        async with self._lock:
            if not self._queue:
                return
            segment = self._queue[0]
            start = segment.sent_bytes
            chunk = segment.audio[start : start + self._chunk_bytes]
            name = str(next(self._names))
            await self._send(media_message(self._stream_sid, chunk),
                             mark_message(self._stream_sid, name))
            upto = start + len(chunk)
            self._pending[name] = (segment, upto, len(chunk))
            self._unacked_bytes += len(chunk)
            self._buffer_until = max(self._buffer_until, now) + len(chunk) / 8000.0
            self.sent_chunks += 1
            segment.mark_sent(len(chunk))
            if segment.sent_bytes >= len(segment.audio):
                self._queue.popleft()
