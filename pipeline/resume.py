"""Pausing the bot's speech and resuming it where the caller stopped hearing it.

A barge-in first *pauses* the bot: `clear` goes out at once (the caller hears the bot stop
within a round trip) but the reply is not thrown away. If the sound that stopped it turns out
to hold no words (a cough, a bump, a long "mmm"), the bot `resume`s from the first byte the
caller did not hear, so nothing is repeated and nothing is skipped; if it was words, the
conversation `drop`s the paused reply and answers them.

`ResumableSink` wraps the transport's `AudioSink`. It hands the transport `_Piece`s (slices of
the reply's `SpokenSegment`s) and mirrors their progress (sent, played, cleared) back onto the
originals, so the reply task, its metrics and "what was heard" work as before. A `clear` on a
piece during a pause is *not* passed on: the original stays unfinished until resumed or
dropped.

Where the caller stopped hearing: marks (one per 100 ms chunk) say what was played for sure;
audio keeps playing between the last echoed mark and the moment our `clear` went out, at
8 bytes per ms, so the estimate adds that time (never more than was sent).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from media.mulaw import pcm16_to_ulaw, ulaw_to_pcm16
from pipeline.speech import ULAW_BYTES_PER_MS, AudioSink, SpokenSegment

FADE_MS = 8


@dataclass(eq=False, slots=True)
class _Piece(SpokenSegment):
    """A slice of an original segment, as handed to the transport."""

    origin: SpokenSegment | None = None
    offset: int = 0
    owner: ResumableSink | None = None
    played_at: float | None = None
    taken: int = 0  # bytes already handed to the echo guard
    sends: list[tuple[int, float]] = field(default_factory=list)  # (bytes sent before, when)

    def mark_sent(self, nbytes: int) -> None:
        self.sends.append((self.sent_bytes, time.monotonic()))
        SpokenSegment.mark_sent(self, nbytes)
        owner = self.owner
        if owner is not None:
            owner.has_sent = True
            if owner.on_sent is not None:
                owner.on_sent()
        if self.origin is not None:
            self.origin.mark_sent(nbytes)

    def mark_played(self, upto: int) -> None:
        SpokenSegment.mark_played(self, upto)
        self.played_at = time.monotonic()
        if self.origin is not None:
            self.origin.mark_played(self.offset + upto)


    def mark_cleared(self) -> None:
        SpokenSegment.mark_cleared(self)
        if self.owner is not None:
            self.owner._on_piece_cleared(self)


@dataclass(slots=True)
class Paused:
    """What a pause stopped: the originals not fully heard, in order, and where each stops."""

    at: float
    heard: dict[int, int] = field(default_factory=dict)  # id(origin) → bytes heard
    segments: list[SpokenSegment] = field(default_factory=list)


def fade_in(ulaw: bytes, ms: int = FADE_MS) -> bytes:
    """The first `ms` of μ-law audio faded in, so a resume does not start with a click."""
    n = min(len(ulaw), ms * ULAW_BYTES_PER_MS)
    if n == 0:
        return ulaw
    head = ulaw_to_pcm16(ulaw[:n]).astype(np.float32) * np.linspace(0.0, 1.0, n)
    return pcm16_to_ulaw(head.astype(np.int16)) + ulaw[n:]


class ResumableSink:
    """An `AudioSink` that can pause (clear, keep the rest) and resume without repeating."""

    def __init__(self, inner: AudioSink) -> None:
        self._inner = inner
        self._live: list[_Piece] = []  # pieces handed to the transport, not finished
        self.has_sent = False  # bot audio went out since the last `take_sent`
        self.on_sent: Callable[[], None] | None = None  # called as `has_sent` is set
        self._held: list[SpokenSegment] = []  # played while paused: waiting for resume
        self.paused: Paused | None = None
        self._pausing = False
        self.resumes = 0


    # AudioSink -----------------------------------------------------------------------------
    def play(self, segment: SpokenSegment) -> None:
        if self.paused is not None:
            self._held.append(segment)
            return
        self._forward(segment, 0)

    @property
    def busy(self) -> bool:
        return self._inner.busy or bool(self._held) or self.paused is not None

    @property
    def audible(self) -> bool:
        """The caller can hear the bot now (or will within the transport's lead)."""
        return self._inner.busy and self.paused is None

    async def clear(self) -> bool:
        """Stop for good: drop what is playing, queued, paused or held."""
        cleared = await self._inner.clear()
        dropped = self.drop()
        return cleared or dropped

    # Pause / resume ------------------------------------------------------------------------
    async def pause(self, replying: bool = False) -> bool:
        """Clear the transport but keep the unheard rest; True if it paused (something was
        playing, or `replying`).

        `replying`: a reply is still being made. When nothing is playing at that moment (its
        next sentence is still being synthesized), the pause holds what comes next: without
        it, that sentence would play over the caller who just started talking."""
        if self.paused is not None or not (self._inner.busy or replying):
            return False
        now = time.monotonic()
        live = [p for p in self._live if not p.finished.is_set()]
        paused = Paused(at=now)
        for piece in live:
            origin = piece.origin
            assert origin is not None
            paused.heard[id(origin)] = piece.offset + self._heard_bytes(piece, now)
            if origin not in paused.segments:
                paused.segments.append(origin)
        self.paused = paused
        self._pausing = True
        try:
            await self._inner.clear()
        finally:
            self._pausing = False
        self._live = [p for p in self._live if p.origin not in paused.segments]
        return True

    def resume(self) -> int:
        """Play the unheard rest of the paused segments, then anything held; returns the
        bytes of paused audio that will be replayed from their heard position."""
        paused, self.paused = self.paused, None
        if paused is None:
            return 0
        self.resumes += 1
        first = True
        for origin in paused.segments:
            start = paused.heard.get(id(origin), origin.played_bytes)
            start = max(start, origin.played_bytes)
            if start >= len(origin.audio):
                origin.mark_played(len(origin.audio))
                continue
            self._forward(origin, start, fade=first)
            first = False
        held, self._held = self._held, []
        for segment in held:
            self._forward(segment, 0)
        return sum(len(s.audio) - paused.heard.get(id(s), 0) for s in paused.segments)

    def drop(self) -> bool:
        """Forget a pause: its segments (and any held) end as cleared, heard as marked."""
        paused, self.paused = self.paused, None
        held, self._held = self._held, []
        segments = (paused.segments if paused else []) + held
        for origin in segments:
            if paused is not None and id(origin) in paused.heard:
                origin.mark_played(min(paused.heard[id(origin)], len(origin.audio)))
            origin.mark_cleared()
        return bool(segments)

    def take_sent(self) -> list[tuple[bytes, float]]:
        """Bot audio sent to the transport since the last call, in order, with when each
        piece went out (monotonic): for the echo guard, it is what the caller's phone plays."""
        out: list[tuple[bytes, float]] = []
        self.has_sent = False
        for piece in self._live:
            for before, at in piece.sends:
                if before >= piece.taken:
                    end = next((b for b, _ in piece.sends if b > before), piece.sent_bytes)
                    out.append((piece.audio[before:end], at))
            piece.taken = piece.sent_bytes
            piece.sends.clear()
        self._live = [p for p in self._live
                      if not (p.finished.is_set() and p.taken >= p.sent_bytes)]
        return out

    # Internals -----------------------------------------------------------------------------
    def _forward(self, origin: SpokenSegment, start: int, fade: bool = False) -> None:
        audio = origin.audio[start:]
        piece = _Piece(origin.text, fade_in(audio) if fade else audio, origin.turn,
                       origin=origin, offset=start, owner=self)
        if start == 0 and not origin.audio:
            origin.mark_played(0)
        self._live.append(piece)
        self._inner.play(piece)

    def _on_piece_cleared(self, piece: _Piece) -> None:
        if piece in self._live:
            self._live.remove(piece)
        if self._pausing:
            return  # the origin stays open until resume() or drop()
        if piece.origin is not None:
            piece.origin.mark_cleared()

    @staticmethod
    def _heard_bytes(piece: _Piece, now: float) -> int:
        """Bytes of `piece` the caller has heard by `now` (marks + time since the last one)."""
        if piece.played_at is None:
            if piece.first_sent_at is None:
                return 0
            since = piece.first_sent_at
            base = 0
        else:
            since = piece.played_at
            base = piece.played_bytes
        extra = int((now - since) * 1000 * ULAW_BYTES_PER_MS)
        return min(piece.sent_bytes, base + max(0, extra))
