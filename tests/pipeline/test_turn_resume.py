"""Pausing the bot and resuming where the caller stopped hearing it (a fake transport)."""

from __future__ import annotations

import asyncio

from pipeline.resume import ResumableSink
from pipeline.speech import SpokenSegment


class FakeTransport:
    """Plays like Twilio: everything queued, `advance(n)` plays n bytes and reports marks."""

    def __init__(self) -> None:
        self.queue: list[SpokenSegment] = []
        self.clears = 0

    def play(self, segment: SpokenSegment) -> None:
        self.queue.append(segment)
        segment.mark_sent(len(segment.audio))

    @property
    def busy(self) -> bool:
        return bool(self.queue)

    async def clear(self) -> bool:
        if not self.queue:
            return False
        dropped, self.queue = self.queue, []
        self.clears += 1
        for segment in dropped:
            segment.mark_cleared()
        return True

    def advance(self, nbytes: int) -> None:
        while nbytes and self.queue:
            segment = self.queue[0]
            step = min(nbytes, len(segment.audio) - segment.played_bytes)
            segment.mark_played(segment.played_bytes + step)
            nbytes -= step
            if segment.fully_played:
                self.queue.pop(0)


def _audio(n: int) -> bytes:
    return bytes((i * 7) % 251 for i in range(n))


async def test_pause_then_resume_plays_the_rest_without_repeating() -> None:
    transport = FakeTransport()
    sink = ResumableSink(transport)
    first = SpokenSegment("Our prices depend on the day.", _audio(8000))
    second = SpokenSegment("Lunch is fifteen dollars.", _audio(6000))
    sink.play(first)
    sink.play(second)
    transport.advance(3000)
    assert await sink.pause()
    assert transport.clears == 1 and not first.finished.is_set() and not first.cleared
    third = SpokenSegment("Dinner is thirty.", _audio(4000))
    sink.play(third)  # made while paused: held
    assert not transport.queue and sink.busy and not sink.audible
    sink.resume()
    resumed = transport.queue[0]
    # The first byte replayed is the first byte not heard (a short fade-in aside).
    assert len(resumed.audio) == 8000 - 3000
    assert resumed.audio[64:] == first.audio[3064:]
    transport.advance(5000 + 6000 + 4000)
    assert first.fully_played and second.fully_played and third.fully_played
    await asyncio.wait_for(first.finished.wait(), 1)
    assert first.heard_text() == first.text and not first.cleared


async def test_a_real_interruption_drops_the_paused_reply_keeping_what_was_heard() -> None:
    transport = FakeTransport()
    sink = ResumableSink(transport)
    segment = SpokenSegment("Our prices depend on the day of the week.", _audio(8000))
    sink.play(segment)
    transport.advance(4000)
    await sink.pause()
    assert sink.drop()
    assert segment.cleared and segment.finished.is_set()
    assert segment.played_bytes == 4000
    assert segment.heard_text() == "Our prices depend on"
    assert not sink.busy


async def test_clear_without_pause_is_a_plain_barge_in() -> None:
    transport = FakeTransport()
    sink = ResumableSink(transport)
    segment = SpokenSegment("Hello there.", _audio(4000))
    sink.play(segment)
    assert await sink.clear()
    assert segment.cleared and not sink.busy
    assert not await sink.pause()  # nothing playing: nothing to pause


async def test_a_pause_between_two_sentences_holds_the_next_one() -> None:
    """The caller starts talking after one sentence has played and before the next is
    synthesized: nothing to clear, but the next sentence must not play over them."""
    transport = FakeTransport()
    sink = ResumableSink(transport)
    first = SpokenSegment("Our prices depend on the day.", _audio(4000))
    sink.play(first)
    transport.advance(4000)  # played in full: the transport is idle
    assert not await sink.pause()  # no reply being made: nothing to pause
    assert await sink.pause(replying=True)
    second = SpokenSegment("Lunch is fifteen dollars.", _audio(6000))
    sink.play(second)
    assert not transport.queue and not sink.audible and transport.clears == 0
    sink.resume()  # no words after all: it plays now
    assert transport.queue and transport.queue[0].audio == second.audio
    assert await sink.pause(replying=True)  # now it is playing: a real clear
    assert transport.clears == 1
    assert sink.drop() and second.cleared
