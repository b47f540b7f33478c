"""What the bot says, as it travels to the caller's ear.

A reply is spoken as `SpokenSegment`s (one per sentence). The transport that plays them (the
Twilio playout) reports back through marks how much of each segment the caller has heard, so
after a barge-in we know exactly which words were played and keep only those in history.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Protocol

ULAW_BYTES_PER_MS = 8  # 8 kHz, one byte per sample


@dataclass(eq=False, slots=True)
class SpokenSegment:
    """One sentence of bot speech: its text and its 8 kHz μ-law audio."""

    text: str
    audio: bytes
    turn: int = 0
    sent_bytes: int = 0
    played_bytes: int = 0
    first_sent_at: float | None = None
    # When the caller's ear got the first audio: the first mark echo less the audio it covers
    # (not before it was sent). `first_heard` is also set when the segment ends unheard.
    first_played_at: float | None = None
    cleared: bool = False
    first_sent: asyncio.Event = field(default_factory=asyncio.Event)
    first_heard: asyncio.Event = field(default_factory=asyncio.Event)
    finished: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def duration_ms(self) -> float:
        return len(self.audio) / ULAW_BYTES_PER_MS

    @property
    def played_ms(self) -> float:
        return self.played_bytes / ULAW_BYTES_PER_MS

    @property
    def fully_played(self) -> bool:
        return self.played_bytes >= len(self.audio)

    def mark_sent(self, nbytes: int) -> None:
        if self.first_sent_at is None:
            self.first_sent_at = time.monotonic()
            self.first_sent.set()
        self.sent_bytes += nbytes

    def mark_played(self, upto: int) -> None:
        if self.first_played_at is None and upto > 0:
            started = time.monotonic() - upto / ULAW_BYTES_PER_MS / 1000
            self.first_played_at = max(started, self.first_sent_at or started)
            self.first_heard.set()
        self.played_bytes = max(self.played_bytes, upto)
        if self.fully_played:
            self.finished.set()
            self.first_heard.set()

    def mark_cleared(self) -> None:
        self.cleared = True
        self.finished.set()
        self.first_heard.set()
        self.first_sent.set()  # nobody waits forever for audio that will never go out

    def heard_text(self) -> str:
        """The words the caller heard: all of them, or a prefix in proportion to the audio
        played, cut back to a word boundary (speech rate is close enough to uniform)."""
        if self.fully_played or not self.audio:
            return self.text
        if self.played_bytes <= 0:
            return ""
        cut = int(len(self.text) * self.played_bytes / len(self.audio))
        prefix = self.text[:cut]
        if cut < len(self.text) and not self.text[cut].isspace():
            prefix = prefix.rsplit(" ", 1)[0] if " " in prefix else ""
        return prefix.strip()


class PeerGone(Exception):
    """The far end of an `AudioSink` is gone (hung up, socket dropped, stopped reading).

    Sinks raise a subclass from `clear` (and transports from their sends). Work that runs for
    a call treats it as the call ending, not as a failure: the transport ends the call."""


class AudioSink(Protocol):
    """Where bot speech goes: the transport plays segments in order and reports what was
    heard (it calls `segment.mark_played`). `clear` raises `PeerGone` when the far end has
    gone away."""

    def play(self, segment: SpokenSegment) -> None:
        """Queue a segment; never blocks."""
        ...

    async def clear(self) -> bool:
        """Drop everything queued or playing; True if anything was (and a clear went out)."""
        ...

    @property
    def busy(self) -> bool:
        """True while audio is queued here or not yet confirmed played by the far end."""
        ...


def heard_text(segments: list[SpokenSegment]) -> str:
    """The caller-heard text of a whole reply."""
    parts = [s.heard_text() for s in segments]
    return " ".join(p for p in parts if p)
