"""The quiet hold's reader (`telephony._fastmedia.masked_hold` and `QuietHold`): it keeps
exactly the frames the stream would hand to `Conversation.hear` only to be held (this
stream's compact inbound media of one whole quiet frame, within the message limit), while
its count is below its limit, and reads every other frame as `masked_text` does."""

from __future__ import annotations

import base64
import json
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from media.mulaw import QUIET_CODES, is_quiet_ulaw
from telephony.messages import MAX_PAYLOAD_B64, inbound_media, inbound_media_text
from tests.telephony.test_frame_reader import _frame

fastmedia = pytest.importorskip("telephony._fastmedia")
QuietHold, masked_hold, masked_text = (fastmedia.QuietHold, fastmedia.masked_hold,
                                       fastmedia.masked_text)

SID = "MZ" + "0" * 32
MAX_TEXT = 600


def _holds(text: str) -> bool:
    """What the stream does with this message, read as `TwilioStream._take` and
    `Conversation.hear` read it: a frame the conversation would only hold (once holding)."""
    if len(text) > MAX_TEXT:
        return False
    media = inbound_media(text, SID, MAX_PAYLOAD_B64)
    return media is not None and len(media[0]) == 160 and is_quiet_ulaw(media[0])


_quiet = st.sampled_from(sorted(QUIET_CODES))
_loud = st.integers(0, 255)


@st.composite
def _messages(draw: st.DrawFn) -> str:
    kind = draw(st.sampled_from(["quiet", "quiet", "quiet", "loud", "short", "sid", "track",
                                 "spaced", "mark", "badb64", "unicode"]))
    codes = draw(st.lists(_quiet, min_size=160, max_size=160))
    if kind == "loud":
        codes[draw(st.integers(0, 159))] = draw(_loud)
    if kind == "short":
        codes = codes[: draw(st.integers(0, 159))]
    payload = base64.b64encode(bytes(codes)).decode()
    if kind == "badb64":
        payload = payload[:-4] + "*" + payload[-3:]
    sid = "MZ" + "1" * 32 if kind == "sid" else SID
    track = "outbound" if kind == "track" else draw(st.sampled_from(["inbound", "inbound_track"]))
    stamp = draw(st.integers(0, 10**12))
    text = inbound_media_text(sid, 7, 3, stamp, payload, track)
    if kind == "spaced":
        text = text.replace(",", ", ")
    elif kind == "mark":
        text = json.dumps({"event": "mark", "streamSid": SID, "mark": {"name": "1"}})
    elif kind == "unicode":
        text = text.replace("media", "médïa", 1)
    return text


@settings(derandomize=True, max_examples=400, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_messages(), min_size=1, max_size=12), st.integers(0, 12),
       st.binary(min_size=4, max_size=4), st.integers(0, 3))
def test_the_hold_keeps_exactly_the_frames_the_conversation_would_only_hold(
        texts: list[str], limit: int, mask: bytes, cut: int) -> None:
    data = b"".join(_frame(0x81, text.encode(), mask, 7 if len(text) < 126 else 16)
                    for text in texts)
    data = data[: len(data) - cut]  # the last frame perhaps not all here yet
    hold = QuietHold(SID, QUIET_CODES, MAX_TEXT)
    hold.limit = limit
    before = time.monotonic()
    # The protocol's loop (`DirectTextProtocol._read_frames`), and what the stream would do.
    pos, handled, held = 0, [], 0
    while len(data) - pos >= 2:
        read = masked_hold(data, pos, -1, hold) if hold.limit > hold.count else masked_text(
            data, pos, -1)
        if read is None:
            break
        pos = read[1]
        if read[0] is not None:
            handled.append(read[0])
        elif hold.count >= hold.limit:
            held += hold.count
            hold.take()
            hold.limit = 0  # full: the stream would hear them, then set another limit
    kept, stamps, arrivals = hold.take()
    held += len(stamps)
    # The oracle: frames whole in `data`, the first `limit` holdable ones kept.
    whole, expected_handled, room, keep = 0, [], limit, b""
    for text in texts:
        size = len(_frame(0x81, text.encode(), mask, 7 if len(text) < 126 else 16))
        if whole + size > len(data):
            break
        whole += size
        if room and _holds(text):
            room -= 1
            media = inbound_media(text, SID, MAX_PAYLOAD_B64)
            assert media is not None
            keep += media[0]
            continue
        expected_handled.append(text)
    assert pos == whole
    assert handled == expected_handled
    assert held == limit - room
    assert kept == keep[len(keep) - 160 * len(stamps):]
    assert all(before <= t <= time.monotonic() for t in arrivals)


def test_the_hold_gives_its_frames_in_order_with_their_timestamps_and_then_none() -> None:
    hold = QuietHold(SID, QUIET_CODES, MAX_TEXT)
    frames = [bytes([0xFF - i]) * 160 for i in range(3)]
    data = b"".join(_frame(0x81, inbound_media_text(
        SID, i, i, 20 * i, base64.b64encode(f).decode()).encode(), b"abcd", 16)
        for i, f in enumerate(frames))
    hold.limit = 2
    assert masked_hold(data, 0, -1, hold) == (None, len(data) * 2 // 3)  # full after two
    assert hold.count == 2
    audio, stamps, _ = hold.take()
    assert (audio, stamps, hold.count) == (frames[0] + frames[1], [0, 20], 0)
    hold.limit = 0  # stopped: the next frame is read for the handler
    assert masked_hold(data, len(data) * 2 // 3, -1, hold)[0].startswith('{"event":"media"')
    assert hold.take() == (b"", [], [])


def test_limits_outside_the_holds_room_and_odd_sids_are_refused() -> None:
    hold = QuietHold(SID, QUIET_CODES, MAX_TEXT)
    for bad in (-1, 65):
        with pytest.raises(ValueError):
            hold.limit = bad
    with pytest.raises(ValueError):
        QuietHold("", QUIET_CODES, MAX_TEXT)
    with pytest.raises(TypeError):
        masked_hold(b"", 0, -1, object())


def test_a_message_over_the_streams_limit_is_left_to_the_stream() -> None:
    text = inbound_media_text(SID, 1, 1, 20, base64.b64encode(b"\xff" * 160).decode())
    data = _frame(0x81, text.encode(), b"abcd", 16)
    hold = QuietHold(SID, QUIET_CODES, len(text) - 1)
    hold.limit = 5
    assert masked_hold(data, 0, -1, hold) == (text, len(data))
    assert hold.count == 0
