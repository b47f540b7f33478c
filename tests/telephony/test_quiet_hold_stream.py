"""The quiet hold end to end in-process: a real `TwilioStream` and `Conversation` (Silero,
echo guard, turn-taking) fed WebSocket frames through the server's own reader
(`DirectTextProtocol._read_frames`), with the hold and without it. The same frames are
counted, the same audio reaches turn-taking, the same actions come on the same frames, and
the bot's audio sent meanwhile lands between the same frames on the echo guard's timeline."""

from __future__ import annotations

import base64
from typing import Any

import numpy as np
import pytest

from bench.frame_path import ProtocolStub
from media.audiofile import read_wav
from media.mulaw import pcm16_to_ulaw
from media.vad import SileroSession
from pipeline.speech import SpokenSegment
from telephony.messages import inbound_media_text
from telephony.stream import StreamState, TwilioStream
from tests.pipeline.test_quiet_hold import FIXTURES, _caller_line, _conversation, _frames
from tests.telephony.test_frame_reader import _frame

pytest.importorskip("telephony._fastmedia")

SID = "MZ" + "7" * 32


@pytest.fixture(scope="module")
def silero() -> SileroSession:
    return SileroSession()


class _Done:
    def done(self) -> bool:
        return True


def _run(silero: SileroSession, frames: list[bytes], hold: bool, sends: dict[int, int],
         idle_s: float | None = None) -> dict[str, Any]:
    """Feed `frames` (two to a socket read, as a loaded server reads them); at frame index
    `i` in `sends`, that many bytes of the bot's audio go out first. `idle_s`: the idle
    reprompt's limit (the hang-up's twice it), and no bot audio."""
    conversation = _conversation(silero)
    spawned: list[tuple[int, str]] = []
    if idle_s is not None:
        conversation.config.idle_reprompt_s, conversation.config.idle_hangup_s = idle_s, 2 * idle_s

        def spawn(coro: Any, name: str, awaited: bool = False) -> _Done:
            coro.close()  # what the conversation started, and on which frame
            spawned.append((stream.stats.frames, name))
            return _Done()

        conversation._spawn = spawn  # type: ignore[method-assign]
    conversation.echo_guard.converge = 0  # refits on a fixed beat: its state shows when
    stream = TwilioStream(object(), None)  # type: ignore[arg-type]
    stream.state = StreamState.STARTED
    stream.stream_sid = stream._media_sid = SID
    stream.conversation = conversation
    protocol = ProtocolStub(stream, hold)  # the server's frame reader, on this stream
    assert (stream._hold is not None) == hold
    log: dict[str, Any] = {"actions": [], "fed": [], "held_in_c": 0}

    def drop(pending: Any, *waiting: str) -> None:  # actions are compared, not carried out
        pending.close()
        for text in waiting:
            stream._on_text(text)

    stream._begin_step = drop  # type: ignore[method-assign]
    feed, hear, hear_held = conversation.turns.feed, conversation.hear, conversation.hear_held

    def recording_feed(pcm8k: np.ndarray, *args: Any) -> Any:
        log["fed"].append(pcm8k.copy())
        return feed(pcm8k, *args)

    def recording(take: Any) -> Any:
        def wrapped(*args: Any) -> Any:
            actions = take(*args)
            if actions:
                log["actions"].append((stream.stats.frames, [type(a).__name__ for a in actions]))
            return actions
        return wrapped

    def counting_held(audio: bytes, frames: int) -> Any:
        log["held_in_c"] += frames
        return recording(hear_held)(audio, frames)

    conversation.turns.feed = recording_feed  # type: ignore[method-assign]
    conversation.hear = recording(hear)  # type: ignore[method-assign]
    conversation.hear_held = counting_held  # type: ignore[method-assign]
    if idle_s is None:
        tone = pcm16_to_ulaw((np.sin(np.arange(40000) * 0.3) * 8000).astype(np.int16))
        conversation._sink.play(SpokenSegment("Hello.", tone, turn=1))
        piece = conversation._sink._live[0]
    data = [_frame(0x81, inbound_media_text(SID, i, i, 20 * i, base64.b64encode(f).decode()
                                            ).encode(), bytes((i % 251, 1, 2, 3)), 16)
            for i, f in enumerate(frames)]
    for i in range(0, len(data), 2):
        for j in (i, i + 1):
            if j in sends:
                before = piece.sent_bytes
                piece.mark_sent(sends[j])
                piece.sends[-1] = (before, conversation._mono0 + 0.5 + j * 0.02)
        protocol.read_frames(b"".join(data[i:i + 2]))
    if stream._hold is not None and stream._hold.count:
        pending = stream._flush_hold(stream._hold)  # what the end of the stream does
        assert pending is None
    log.update(frames=stream.stats.frames, guard=conversation.echo_guard,
               in_speech=conversation.listener.in_speech, idle=conversation._idle_ms,
               held=len(conversation._held), spawned=spawned)
    return log


def test_the_hold_changes_nothing_but_how_many_frames_run_python(
        silero: SileroSession) -> None:
    words = _frames(read_wav(FIXTURES / "one_two_three.wav", 8000))
    frames = _caller_line() + words + _caller_line()[:150]
    sends = {i: 800 for i in range(120, 400, 7)}  # the bot talking over part of the line
    held = _run(silero, frames, True, sends)
    plain = _run(silero, frames, False, sends)
    assert held["frames"] == plain["frames"] == len(frames)
    assert held["held"] == plain["held"] > 0  # the line's last quiet frames, not yet heard
    assert held["actions"] == plain["actions"]
    assert sum(kinds.count("TurnEnded") for _, kinds in plain["actions"]) == 3
    assert np.array_equal(np.concatenate(held["fed"]), np.concatenate(plain["fed"]))
    a, b = held["guard"], plain["guard"]
    assert a._far_total == b._far_total == 800 * len(sends)
    assert (a.near_end, a._play_end, a._since_fit, a.stats.frames) == (
        b.near_end, b._play_end, b._since_fit, b.stats.frames)
    assert np.array_equal(a._ref, b._ref) and np.array_equal(a._near, b._near)
    assert (held["in_speech"], held["idle"]) == (plain["in_speech"], plain["idle"])
    assert plain["held_in_c"] == 0
    # A good part of the line never ran Python: kept in C, heard as blocks (the rest is the
    # words, the silence ending each turn, the first quiet frames after either and the
    # frames after each of the bot's sends, all of which go through `hear`).
    assert held["held_in_c"] > 0.25 * len(frames)


def test_the_callers_idle_time_reaches_its_limits_on_the_same_frames(
        silero: SileroSession) -> None:
    """The hold stops at the frame where the caller's silence reaches the reprompt's limit,
    then the hang-up's, so both come on the frame they come on without it."""
    frames = _caller_line()[:61] + _caller_line()[:61] * 3  # silence, hiss, no words
    held = _run(silero, frames, True, {}, idle_s=1.3)
    plain = _run(silero, frames, False, {}, idle_s=1.3)
    assert held["spawned"] == plain["spawned"] == [(65, "reprompt"), (130, "end")]
    assert held["idle"] == plain["idle"]
    assert held["held_in_c"] > 0.5 * len(frames)


def test_a_failure_in_the_hold_ends_the_call_instead_of_escaping_to_the_server(
        silero: SileroSession) -> None:
    """The handler must not raise (it runs in the server's `data_received`)."""
    conversation = _conversation(silero)
    stream = TwilioStream(object(), None)  # type: ignore[arg-type]
    stream.state = StreamState.STARTED
    stream.stream_sid = stream._media_sid = SID
    stream.conversation = conversation
    protocol = ProtocolStub(stream, True)

    def broken() -> int:
        raise RuntimeError("a bug in holding")

    conversation.hold_room = broken  # type: ignore[method-assign]
    frame = _frame(0x81, inbound_media_text(SID, 1, 1, 20, base64.b64encode(
        b"\xff" * 160).decode()).encode(), b"abcd", 16)
    protocol.read_frames(frame)  # does not raise
    assert stream._broken and isinstance(stream._direct_error, RuntimeError)
    assert stream._hold is not None and stream._hold.limit == 0
