import asyncio
import json

from pipeline.speech import SpokenSegment
from telephony.playout import TwilioPlayout


class Wire:
    def __init__(self) -> None:
        self.sent: list[dict] = []

    async def send(self, *texts: str) -> None:
        self.sent.extend(json.loads(text) for text in texts)

    def of(self, event: str) -> list[dict]:
        return [m for m in self.sent if m["event"] == event]


async def _start(playout: TwilioPlayout) -> asyncio.Task[None]:
    task = asyncio.create_task(playout.run())
    await asyncio.sleep(0)
    return task


async def test_only_the_lead_is_sent_ahead_of_playback() -> None:
    wire = Wire()
    playout = TwilioPlayout(wire.send, "MZ1", lead_ms=200, chunk_ms=100)
    task = await _start(playout)
    playout.play(SpokenSegment("hello", b"\xff" * 8000))  # 1 s of audio
    await asyncio.sleep(0.05)
    assert len(wire.of("media")) == 2  # 200 ms ahead, no more
    assert len(wire.of("mark")) == 2
    task.cancel()


async def test_marks_advance_playback_and_report_what_was_heard() -> None:
    wire = Wire()
    playout = TwilioPlayout(wire.send, "MZ1", lead_ms=200, chunk_ms=100)
    task = await _start(playout)
    segment = SpokenSegment("one two three four", b"\xff" * 1600)  # 200 ms
    playout.play(segment)
    await asyncio.sleep(0.02)
    names = [m["mark"]["name"] for m in wire.of("mark")]
    playout.on_mark(names[0])
    assert segment.played_ms == 100
    assert segment.heard_text() == "one two"
    playout.on_mark(names[1])
    assert segment.fully_played and segment.finished.is_set()
    assert not playout.busy
    task.cancel()


async def test_clear_drops_queued_audio_and_ignores_marks_echoed_after_it() -> None:
    wire = Wire()
    playout = TwilioPlayout(wire.send, "MZ1", lead_ms=200, chunk_ms=100)
    task = await _start(playout)
    segment = SpokenSegment("a long sentence that will be cut", b"\xff" * 8000)
    playout.play(segment)
    await asyncio.sleep(0.02)
    first, second = (m["mark"]["name"] for m in wire.of("mark"))
    playout.on_mark(first)
    assert await playout.clear() is True
    assert len(wire.of("clear")) == 1
    playout.on_mark(second)  # Twilio echoes pending marks after a clear: not "heard"
    assert segment.played_ms == 100
    assert segment.cleared and segment.finished.is_set()
    await asyncio.sleep(0.05)
    assert len(wire.of("media")) == 2  # nothing more went out
    task.cancel()


async def test_no_clear_is_sent_when_nothing_is_playing() -> None:
    wire = Wire()
    playout = TwilioPlayout(wire.send, "MZ1")
    assert await playout.clear() is False
    assert wire.of("clear") == []


async def test_paced_sending_follows_the_clock_without_marks() -> None:
    wire = Wire()
    playout = TwilioPlayout(wire.send, "MZ1", lead_ms=100, chunk_ms=50)
    task = await _start(playout)
    playout.play(SpokenSegment("x", b"\xff" * 8 * 1000))  # 1 s
    await asyncio.sleep(0.3)
    # ~300 ms of real time + 100 ms lead ≈ 400 ms sent: 8 chunks (±1 for timer slack).
    assert 7 <= len(wire.of("media")) <= 9
    task.cancel()
