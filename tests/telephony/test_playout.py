import asyncio
import base64
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


async def test_cancelled_while_waiting_for_the_lead_it_stops_and_sends_nothing_more() -> None:
    wire = Wire()
    playout = TwilioPlayout(wire.send, "MZ1", lead_ms=200, chunk_ms=100)
    task = await _start(playout)
    playout.play(SpokenSegment("x", b"\xff" * 8000))  # 1 s: it waits after 200 ms
    await asyncio.sleep(0.02)
    assert len(wire.of("media")) == 2
    task.cancel()
    await asyncio.wait([task], timeout=1.0)
    assert task.cancelled()
    await asyncio.sleep(0.15)  # past the wait's timer: it was cancelled with the task
    assert len(wire.of("media")) == 2


async def test_a_short_last_piece_goes_when_a_whole_one_would() -> None:
    wire = Wire()
    playout = TwilioPlayout(wire.send, "MZ1", lead_ms=200, chunk_ms=100)
    task = await _start(playout)
    playout.play(SpokenSegment("x", b"\xff" * 2000))  # 250 ms: pieces of 100, 100 and 50
    await asyncio.sleep(0.075)
    # Sized by what is left, the 50 ms piece would fit the lead at 50 ms; it waits for 100.
    assert [len(m["media"]["payload"]) for m in wire.of("media")] == [1068, 1068]
    await asyncio.sleep(0.1)
    assert len(wire.of("media")) == 3
    task.cancel()


async def test_by_default_pieces_are_200_ms_with_at_most_300_ms_ahead() -> None:
    wire = Wire()
    playout = TwilioPlayout(wire.send, "MZ1")
    task = await _start(playout)
    playout.play(SpokenSegment("x", b"\xff" * 8000))  # 1 s
    await asyncio.sleep(0.05)
    assert len(wire.of("media")) == 1 and len(wire.of("mark")) == 1
    assert len(base64.b64decode(wire.of("media")[0]["media"]["payload"])) == 1600
    await asyncio.sleep(0.1)  # 100 ms queued: room for the next piece
    assert len(wire.of("media")) == 2
    task.cancel()
