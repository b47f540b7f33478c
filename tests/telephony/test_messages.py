"""Parsing every Media Streams event, with the JSON shapes from Twilio's docs
("Media Streams - WebSocket Messages")."""

import base64
import json

import pytest

import telephony.messages as telephony_messages
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


@pytest.mark.parametrize("name", ["7", "1234567890", "reply-3", 'a"b', "a\\b", "ü", "",
                                  "x\ny"])
def test_a_mark_name_comes_back_as_it_was_sent(name: str) -> None:
    """Counter names are written out as they are, anything else escaped."""
    message = mark_message(SID, name)
    assert json.loads(message) == {"event": "mark", "streamSid": SID, "mark": {"name": name}}
    if name.isascii() and name.isalnum():  # the playout's counters: no encoder
        assert message == json.dumps(
            {"event": "mark", "streamSid": SID, "mark": {"name": name}}, separators=(",", ":"))


# -- the media fast path: Twilio's layout read by one regular expression ---------------------


def _both_ways(text: str) -> tuple[object, object]:
    """The result of `parse_message` on `text`, and of the general JSON path (bytes skip
    the layout match): a Media, or the ProtocolError's message."""
    results = []
    for given in (text, text.encode()):
        try:
            results.append(parse_message(given))
        except ProtocolError as exc:
            results.append(f"ProtocolError: {exc}")
    return results[0], results[1]


def _laid_out(space: str = "", **fields: str) -> str:
    values = {"sequenceNumber": "4", "track": "inbound", "chunk": "3", "timestamp": "60",
              "payload": PAYLOAD, "streamSid": SID, **fields}
    s = space
    return (f'{{{s}"event"{s}:{s}"media"{s},{s}"sequenceNumber"{s}:{s}"{values["sequenceNumber"]}"'
            f'{s},{s}"media"{s}:{s}{{{s}"track"{s}:{s}"{values["track"]}"{s},{s}"chunk"{s}:{s}'
            f'"{values["chunk"]}"{s},{s}"timestamp"{s}:{s}"{values["timestamp"]}"{s},{s}'
            f'"payload"{s}:{s}"{values["payload"]}"{s}}}{s},{s}"streamSid"{s}:{s}'
            f'"{values["streamSid"]}"{s}}}{s}')


@pytest.mark.parametrize("text", [
    _laid_out(),
    _laid_out(" "),
    _laid_out("\n\t "),
    _laid_out(sequenceNumber="007", chunk="0", timestamp="999999999999999"),
    _laid_out(track="outbound"),
    _laid_out(payload=""),
    _laid_out(payload=PAYLOAD[:-2] + "=="),  # padding where it does not belong
    _laid_out(payload="AAA"),  # not a multiple of 4
    _laid_out(payload="AA-A"),  # not base64's alphabet
    _laid_out(payload="AA\\/A"),  # an escape inside (JSON says "AA/A")
    _laid_out(payload="AAAA\\n"),
    _laid_out(payload="AAAA AAAA"),
    _laid_out(payload="AAAA\n"),  # a raw control character: not JSON
    _laid_out(payload="AAAA="),  # padding the strict decode lets through
    _laid_out(payload="AAAA==="),
    _laid_out(payload="AAAé"),
    _laid_out(payload="A" * 20000),  # over the size limit
    _laid_out(streamSid=""),
    _laid_out(streamSid="MZ" + "a" * 63),  # a SID too long
    _laid_out(track="in\\u0062ound"),  # an escape: JSON says "inbound"
    _laid_out(chunk="1e3"),
    _laid_out(timestamp="1234567890123456"),  # 16 digits
    _laid_out("\f"),  # not JSON whitespace
    _laid_out().replace('"chunk"', '"chunk":"1","chunk"'),  # a key twice
    _laid_out().replace('{"event":"media",', '{"streamSid":"x","event":"media",'),
    _laid_out()[:-1] + ',"extra":1}',
])
def test_the_layout_match_parses_exactly_as_the_json_path(text: str) -> None:
    fast, general = _both_ways(text)
    assert fast == general


def test_twilios_own_media_message_takes_the_layout_match() -> None:
    text = _laid_out()
    assert telephony_messages._media_by_layout(text) == parse_message(text.encode())
    assert telephony_messages._media_by_layout(_laid_out(" ")) is not None
    assert telephony_messages._media_by_layout(_laid_out(chunk="1e3")) is None


# -- the compiled reader (telephony/_fastmedia.c) against the expressions ---------------------


def _by_expressions(text: str) -> Media | None:
    """`_media_by_layout` with the compiled reader switched off."""
    saved = telephony_messages._media_fields
    telephony_messages._media_fields = None
    try:
        return telephony_messages._media_by_layout(text)
    finally:
        telephony_messages._media_fields = saved


def test_the_compiled_media_reader_is_built() -> None:
    """setup.py builds it in place (a C compiler is part of the setup: llama.cpp needs one);
    without it everything still works, through the expressions, only slower."""
    assert telephony_messages._media_fields is not None


@pytest.mark.parametrize("payload", ["", "QQ==", "QUI=", "QUJD", "AB==", "AAB=", PAYLOAD,
                                     "////", "++++" * 54])
def test_the_compiled_reader_reads_twilios_layout_as_the_expressions_do(payload: str) -> None:
    text = _laid_out(payload=payload)
    fields = telephony_messages._media_fields(text, telephony_messages._MAX_PAYLOAD_B64)
    assert fields is not None
    assert Media(*fields) == _by_expressions(text) == parse_message(text.encode())


@pytest.mark.parametrize("text", [
    _laid_out(" "),  # whitespace: the expressions' general layout reads it
    _laid_out(payload="AAA"),
    _laid_out(payload="AA-A"),
    _laid_out(payload="AA\\/A"),
    _laid_out(payload="AAAA="),
    _laid_out(payload="AAAA==="),
    _laid_out(payload="A==="),
    _laid_out(payload="===="),
    _laid_out(payload="AA=A"),
    _laid_out(payload="AAAé"),
    _laid_out(payload="A" * 21340),  # over `_MAX_PAYLOAD_B64`
    _laid_out(streamSid=""),
    _laid_out(streamSid="MZ" + "a" * 63),
    _laid_out(track=""),
    _laid_out(track="t" * 33),
    _laid_out(sequenceNumber=""),
    _laid_out(chunk="1e3"),
    _laid_out(timestamp="1234567890123456"),
    _laid_out()[:-1],
    _laid_out() + " ",
    _laid_out()[:-1] + ',"extra":1}',
])
def test_the_compiled_reader_leaves_the_rest_to_the_expressions(text: str) -> None:
    """Anything but the exact compact layout with whole base64 quartets: None, and the
    Python reader decides (and a message that is wrong says what is wrong)."""
    assert telephony_messages._media_fields(text, telephony_messages._MAX_PAYLOAD_B64) is None
    fast, general = _both_ways(text)
    assert fast == general


# -- the hot path for the caller's audio (`inbound_media`) ------------------------------------


def _twilio(**fields: str) -> str:
    values = {"sequenceNumber": "5", "track": "inbound", "chunk": "4", "timestamp": "80",
              "payload": PAYLOAD, "streamSid": SID, **fields}
    return telephony_messages.inbound_media_text(
        values["streamSid"], values["sequenceNumber"], values["chunk"],  # type: ignore[arg-type]
        values["timestamp"], values["payload"], values["track"])  # type: ignore[arg-type]


def _inbound(text: str, sid: str = SID) -> tuple[bytes, int] | None:
    return telephony_messages.inbound_media(text, sid, telephony_messages.MAX_PAYLOAD_B64)


def media_text_from(media: Media) -> str:
    return telephony_messages.inbound_media_text(
        media.stream_sid, media.sequence_number, media.chunk, media.timestamp_ms,
        base64.b64encode(media.payload).decode(), media.track)


def valid_json_media() -> str:
    return json.dumps({"event": "media", "sequenceNumber": "3", "streamSid": SID, "media": {
        "track": "inbound", "chunk": "1", "timestamp": "20", "payload": PAYLOAD}})


def test_inbound_media_reads_twilios_message_as_parse_message_does() -> None:
    text = _twilio()
    media = parse_message(text)
    assert isinstance(media, Media)
    assert text == media_text_from(media)  # the layout Twilio sends, byte for byte
    assert _inbound(text) == (media.payload, media.timestamp_ms) == (bytes(range(160)), 80)
    assert _inbound(_twilio(track="inbound_track")) == (bytes(range(160)), 80)
    assert _inbound(_twilio(payload="QQ==", timestamp="999999999999999")) == (
        b"A", 999999999999999)


@pytest.mark.parametrize(("text", "sid"), [
    (_twilio(), "MZ" + "0" * 32),  # another stream's frame: `_check_stream` says so
    (_twilio(), SID[:-1]),
    (_twilio(), SID + "0"),
    (_twilio(track="outbound"), SID),  # not the caller's audio: ignored
    (_twilio(track="inbound_trackx"), SID),
    (_twilio(track="Inbound"), SID),
    (_twilio(payload=""), SID),  # nothing to hear: ignored
    (_twilio(payload="AAA"), SID),  # not base64: `parse_message` says what is wrong
    (_twilio(payload="AAAA="), SID),
    (_twilio(chunk="1e3"), SID),
    (_twilio().replace(",", ", "), SID),  # another layout: `parse_message` reads it
    (_twilio()[:-1] + ',"extra":1}', SID),
    (valid_json_media(), SID),
])
def test_inbound_media_leaves_every_other_message_to_parse_message(text: str, sid: str
                                                                   ) -> None:
    assert _inbound(text, sid) is None


def test_inbound_media_is_compiled() -> None:
    """Without the C extension `inbound_media` says None to everything (the stream then
    parses every frame): the hot path is worth having built."""
    assert telephony_messages._inbound_media is not None
