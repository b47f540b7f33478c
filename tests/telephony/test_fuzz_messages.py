"""Property: `parse_message` turns any frame into a typed event or a `ProtocolError`, nothing
else (no other exception, no unchecked field getting through)."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.telephony.fuzzkit import (
    OTHER_STREAM_SID,
    STREAM_SID,
    check_parse,
    frames,
    messages,
)
from tests.telephony.fuzzkit import _payloads as payloads

FUZZ = settings(derandomize=True, max_examples=1000, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@FUZZ
@given(frames)
def test_any_frame_parses_or_raises_protocol_error(frame: str | bytes) -> None:
    check_parse(frame)


@FUZZ
@given(messages())
def test_mutated_twilio_messages_parse_or_raise_protocol_error(frame: str) -> None:
    check_parse(frame)


@FUZZ
@given(messages())
def test_frames_as_utf8_bytes_parse_like_text(frame: str) -> None:
    check_parse(frame.encode())


def test_known_hostile_frames_raise_protocol_error() -> None:
    for frame in ["[" * 50_000, '{"a":' * 50_000, "1e999", "Infinity",
                  '{"event":"media","streamSid":"MZ1","media":{"payload":"AA==",'
                  '"timestamp":1e400}}',
                  '{"event":"media","streamSid":"MZ1","media":{"payload":"AA==",'
                  '"chunk":Infinity}}',
                  b"\xff\xfe\x00", b""]:
        check_parse(frame)


@FUZZ
@given(messages())
def test_the_compiled_media_reader_agrees_with_the_expressions(frame: str) -> None:
    """Whatever the compiled reader takes, it reads as the regular expressions do."""
    import telephony.messages as telephony_messages
    from telephony.messages import Media

    fields = telephony_messages._media_fields(frame, telephony_messages._MAX_PAYLOAD_B64)
    if fields is None:
        return
    saved = telephony_messages._media_fields
    telephony_messages._media_fields = None
    try:
        assert Media(*fields) == telephony_messages._media_by_layout(frame)
    finally:
        telephony_messages._media_fields = saved


def base64_text(data: bytes) -> str:
    import base64

    return base64.b64encode(data).decode()


_digits = st.one_of(st.integers(0, 10**15).map(str), st.integers(0, 10**16).map(str),
                    st.sampled_from(["", "1e3", "-1", "１"]))
_tracks = st.sampled_from(["inbound", "inbound", "inbound_track", "outbound", "", "Inbound",
                           "in bound", "inbound\\u0020", "t" * 33])


@FUZZ
@given(st.sampled_from([STREAM_SID, STREAM_SID, STREAM_SID, OTHER_STREAM_SID, "",
                        "MZ" + "7" * 70, "MZ é"]),
       _digits, _digits, _digits, _tracks,
       st.one_of(payloads, st.binary(min_size=1, max_size=200).map(base64_text)),
       st.sampled_from([STREAM_SID, STREAM_SID, OTHER_STREAM_SID]))
def test_the_hot_path_takes_exactly_this_streams_inbound_media(
        sid: str, sequence: str, chunk: str, timestamp: str, track: str, payload: str,
        ours: str) -> None:
    """`inbound_media` on Twilio's layout, fields drawn wild: what it takes is the `Media`
    that `parse_message` reads, on this stream, an inbound track and a payload; and every
    such frame that the compiled reader reads (`media_fields`) it takes."""
    import telephony.messages as telephony_messages
    from telephony.messages import (
        MAX_PAYLOAD_B64,
        Media,
        ProtocolError,
        inbound_media,
        inbound_media_text,
        parse_message,
    )

    text = inbound_media_text(sid, sequence, chunk, timestamp, payload, track)  # type: ignore[arg-type]
    taken = inbound_media(text, ours, MAX_PAYLOAD_B64)
    try:
        event = parse_message(text)
    except ProtocolError:
        event = None
    wanted = (isinstance(event, Media) and event.stream_sid == ours and bool(event.payload)
              and event.track in ("inbound", "inbound_track"))
    if taken is not None:
        assert wanted and isinstance(event, Media)
        assert taken == (event.payload, event.timestamp_ms)
    elif wanted and telephony_messages._media_fields(text, MAX_PAYLOAD_B64) is not None:
        raise AssertionError(f"a frame of this stream's caller left to the slow path: {text}")
