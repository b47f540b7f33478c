"""Parsing every Media Streams event, with the JSON shapes from Twilio's docs
("Media Streams - WebSocket Messages")."""

import base64
import json

import pytest

from telephony.messages import (
    Connected,
    Dtmf,
    Mark,
    Media,
    ProtocolError,
    Start,
    Stop,
    clear_message,
    mark_message,
    media_message,
    parse_message,
)

SID = "MZ18ad3ab5a668481ce02b83e7395059f0"
CALL = "CA5b1d1d1d1d1d1d1d1d1d1d1d1d1d1d1d"
ACCOUNT = "AC00000000000000000000000000000000"
PAYLOAD = base64.b64encode(bytes(range(160))).decode()

DOC_START = {
    "event": "start",
    "sequenceNumber": "1",
    "start": {
        "accountSid": ACCOUNT,
        "streamSid": SID,
        "callSid": CALL,
        "tracks": ["inbound"],
        "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
        "customParameters": {"FirstName": "Jane", "from": "+15551234567"},
    },
    "streamSid": SID,
}


def test_connected() -> None:
    msg = parse_message('{"event": "connected", "protocol": "Call", "version": "1.0.0"}')
    assert msg == Connected(protocol="Call", version="1.0.0")


def test_start_carries_ids_tracks_format_and_parameters() -> None:
    msg = parse_message(json.dumps(DOC_START))
    assert isinstance(msg, Start)
    assert (msg.stream_sid, msg.call_sid, msg.account_sid) == (SID, CALL, ACCOUNT)
    assert msg.tracks == ("inbound",)
    assert msg.media_format.sample_rate == 8000
    assert msg.custom_parameters == {"FirstName": "Jane", "from": "+15551234567"}
    assert msg.sequence_number == 1


def test_media_numbers_arrive_as_strings_and_payload_is_decoded() -> None:
    raw = {
        "event": "media",
        "sequenceNumber": "3",
        "media": {"track": "inbound", "chunk": "1", "timestamp": "5", "payload": PAYLOAD},
        "streamSid": SID,
    }
    msg = parse_message(json.dumps(raw))
    assert isinstance(msg, Media)
    assert (msg.chunk, msg.timestamp_ms, msg.sequence_number) == (1, 5, 3)
    assert msg.payload == bytes(range(160))


def test_dtmf_mark_and_stop() -> None:
    dtmf = parse_message(json.dumps({"event": "dtmf", "streamSid": SID, "sequenceNumber": "5",
                                     "dtmf": {"track": "inbound_track", "digit": "1"}}))
    assert dtmf == Dtmf(stream_sid=SID, digit="1", track="inbound_track")
    mark = parse_message(json.dumps({"event": "mark", "sequenceNumber": "4", "streamSid": SID,
                                     "mark": {"name": "my label"}}))
    assert mark == Mark(stream_sid=SID, name="my label")
    stop = parse_message(json.dumps({"event": "stop", "sequenceNumber": "5", "streamSid": SID,
                                     "stop": {"accountSid": ACCOUNT, "callSid": CALL}}))
    assert stop == Stop(stream_sid=SID, call_sid=CALL, account_sid=ACCOUNT)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "JSON object"),
        ('{"event": "bogus"}', "unknown event"),
        ('{"event": "media", "streamSid": "MZ1", "media": {"payload": "@@@"}}', "base64"),
        ('{"event": "media", "streamSid": "MZ1", "media": {"payload": 5}}', "base64"),
        ('{"event": "media", "streamSid": "MZ1"}', "object"),
        ('{"event": "media", "streamSid": "MZ1", "media": {"payload": "", "chunk": "x"}}',
         "number"),
        ('{"event": "dtmf", "streamSid": "MZ1", "dtmf": {"digit": "12"}}', "keypad"),
        ('{"event": "mark", "streamSid": "MZ\\"1", "mark": {"name": "a"}}', "identifier"),
        ('{"event": "start", "start": {"streamSid": "MZ1"}}', "callSid"),
    ],
)
def test_bad_messages_raise_protocol_error(text: str, reason: str) -> None:
    with pytest.raises(ProtocolError, match=reason):
        parse_message(text)


def test_oversized_payload_is_refused() -> None:
    huge = base64.b64encode(b"\xff" * 100_000).decode()
    text = json.dumps({"event": "media", "streamSid": SID, "media": {"payload": huge}})
    with pytest.raises(ProtocolError, match="too large"):
        parse_message(text)


def test_outbound_messages_have_twilios_shape() -> None:
    media = json.loads(media_message(SID, b"\xff\x7f"))
    assert media == {"event": "media", "streamSid": SID,
                     "media": {"payload": base64.b64encode(b"\xff\x7f").decode()}}
    assert json.loads(mark_message(SID, "7")) == {"event": "mark", "streamSid": SID,
                                                  "mark": {"name": "7"}}
    assert json.loads(clear_message(SID)) == {"event": "clear", "streamSid": SID}
