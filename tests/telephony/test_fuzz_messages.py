"""Property: `parse_message` turns any frame into a typed event or a `ProtocolError`, nothing
else (no other exception, no unchecked field getting through)."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings

from tests.telephony.fuzzkit import check_parse, frames, messages

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
