"""Twilio Media Streams messages, parsed once at the edge into typed events.

Shapes follow Twilio's "Media Streams - WebSocket Messages" reference: inbound `connected`,
`start`, `media`, `dtmf`, `mark`, `stop`; outbound `media`, `mark`, `clear`. Inbound numeric
fields (`sequenceNumber`, `chunk`, `timestamp`) arrive as strings; we convert them here so
nothing downstream touches raw dicts.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

# Twilio sends 20 ms of 8 kHz μ-law per media message (160 bytes); anything far larger is not
# Twilio and is refused rather than buffered.
MAX_MEDIA_PAYLOAD_BYTES = 16_000  # 2 s of audio


class ProtocolError(Exception):
    """A message that is not valid Media Streams JSON. `reason` is safe to log."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


@dataclass(frozen=True, slots=True)
class Connected:
    protocol: str
    version: str
    event: Literal["connected"] = "connected"


@dataclass(frozen=True, slots=True)
class MediaFormat:
    encoding: str = "audio/x-mulaw"
    sample_rate: int = 8000
    channels: int = 1


@dataclass(frozen=True, slots=True)
class Start:
    stream_sid: str
    call_sid: str
    account_sid: str
    tracks: tuple[str, ...]
    custom_parameters: dict[str, str]
    media_format: MediaFormat
    sequence_number: int = 0
    event: Literal["start"] = "start"


# Not frozen, unlike the other messages: one is made for every 20 ms of every call, and a
# frozen dataclass's __init__ (object.__setattr__ per field) costs four times a plain one's
# (0.8 against 0.2 µs). Nothing changes it after parsing.
@dataclass(slots=True)
class Media:
    stream_sid: str
    track: str
    chunk: int
    timestamp_ms: int
    payload: bytes  # raw μ-law, base64-decoded
    sequence_number: int = 0
    event: Literal["media"] = "media"


@dataclass(frozen=True, slots=True)
class Dtmf:
    stream_sid: str
    digit: str
    track: str = "inbound_track"
    event: Literal["dtmf"] = "dtmf"


@dataclass(frozen=True, slots=True)
class Mark:
    stream_sid: str
    name: str
    event: Literal["mark"] = "mark"


@dataclass(frozen=True, slots=True)
class Stop:
    stream_sid: str
    call_sid: str
    account_sid: str = ""
    event: Literal["stop"] = "stop"


InboundMessage = Connected | Start | Media | Dtmf | Mark | Stop


def _obj(data: dict[str, Any], key: str) -> dict[str, Any]:
    value = data.get(key)
    if not isinstance(value, dict):
        raise ProtocolError(f"'{key}' must be an object")
    return value


def _str(data: dict[str, Any], key: str, default: str | None = None) -> str:
    value = data.get(key, default)
    if not isinstance(value, str):
        raise ProtocolError(f"'{key}' must be a string")
    if len(value) > 256:
        raise ProtocolError(f"'{key}' is too long")
    return value


_SID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.")


def _sid(data: dict[str, Any], key: str, default: str | None = None) -> str:
    """A Twilio identifier (streamSid, callSid): short, and only characters safe to echo."""
    value = _str(data, key, default)
    if len(value) > 64 or not set(value) <= _SID_CHARS:
        raise ProtocolError(f"'{key}' is not a valid identifier")
    return value


def _int(data: dict[str, Any], key: str, default: int = 0) -> int:
    value = data.get(key, default)
    # Twilio sends these as strings ("sequenceNumber": "2"); accept real ints too.
    if isinstance(value, bool):
        raise ProtocolError(f"'{key}' must be a number")
    try:
        number = int(value)
    except (TypeError, ValueError, OverflowError):  # OverflowError: JSON's `Infinity`
        raise ProtocolError(f"'{key}' must be a number") from None
    if not 0 <= number < 2**53:
        raise ProtocolError(f"'{key}' is out of range")
    return number


def _payload(media: dict[str, Any]) -> bytes:
    encoded = media.get("payload")
    if not isinstance(encoded, str):
        raise ProtocolError("'media.payload' must be a base64 string")
    if len(encoded) > _MAX_PAYLOAD_B64:
        raise ProtocolError("'media.payload' is too large")
    try:
        return base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise ProtocolError("'media.payload' is not valid base64") from None


def _parse_start(data: dict[str, Any]) -> Start:
    start = _obj(data, "start")
    fmt = start.get("mediaFormat") or {}
    if not isinstance(fmt, dict):
        raise ProtocolError("'start.mediaFormat' must be an object")
    media_format = MediaFormat(
        encoding=_str(fmt, "encoding", "audio/x-mulaw"),
        sample_rate=_int(fmt, "sampleRate", 8000),
        channels=_int(fmt, "channels", 1),
    )
    if media_format.encoding != "audio/x-mulaw" or media_format.sample_rate != 8000:
        # The peer's own text, cut short and quoted: a reason goes into the logs.
        raise ProtocolError(f"unsupported media format {media_format.encoding[:40]!r} "
                            f"at {media_format.sample_rate} Hz")
    tracks = start.get("tracks", ["inbound"])
    if not isinstance(tracks, list) or not all(isinstance(t, str) for t in tracks):
        raise ProtocolError("'start.tracks' must be a list of strings")
    params = start.get("customParameters") or {}
    if not isinstance(params, dict) or len(params) > 64:
        raise ProtocolError("'start.customParameters' must be a small object")
    custom = {str(k)[:256]: str(v)[:4096] for k, v in params.items()}
    if not start.get("callSid"):
        raise ProtocolError("'start.callSid' is required")
    return Start(
        stream_sid=_sid(start, "streamSid", _sid(data, "streamSid", "")),
        call_sid=_sid(start, "callSid"),
        account_sid=_str(start, "accountSid", ""),
        tracks=tuple(tracks),
        custom_parameters=custom,
        media_format=media_format,
        sequence_number=_int(data, "sequenceNumber"),
    )


def _parse_media(data: dict[str, Any]) -> Media:
    media = _obj(data, "media")
    return Media(
        stream_sid=_sid(data, "streamSid"),
        track=_str(media, "track", "inbound"),
        chunk=_int(media, "chunk"),
        timestamp_ms=_int(media, "timestamp"),
        payload=_payload(media),
        sequence_number=_int(data, "sequenceNumber"),
    )


# streamSids already checked by `_sid` (one per call, repeated 50 times a second).
_KNOWN_SIDS: set[str] = set()
_KNOWN_SIDS_MAX = 4096
_MAX_PAYLOAD_B64 = MAX_MEDIA_PAYLOAD_BYTES * 4 // 3 + 4


def _fast_number(value: object) -> int | None:
    if type(value) is str and 0 < len(value) <= 15 and value.isdecimal() and value.isascii():
        return int(value)
    return None


def _fast_media(data: dict[str, Any]) -> Media | None:
    """`media` as Twilio sends it, 50 times a second per call, checked with the fewest
    operations; None hands anything unusual to `_parse_media`, which checks it fully (and
    raises the precise `ProtocolError`)."""
    media = data.get("media")
    stream_sid = data.get("streamSid")
    if type(media) is not dict or type(stream_sid) is not str:
        return None
    if stream_sid not in _KNOWN_SIDS:
        if len(stream_sid) > 64 or not set(stream_sid) <= _SID_CHARS:
            return None
        if len(_KNOWN_SIDS) >= _KNOWN_SIDS_MAX:
            _KNOWN_SIDS.clear()
        _KNOWN_SIDS.add(stream_sid)
    track = media.get("track", "inbound")
    encoded = media.get("payload")
    chunk = _fast_number(media.get("chunk", "0"))
    timestamp = _fast_number(media.get("timestamp", "0"))
    sequence = _fast_number(data.get("sequenceNumber", "0"))
    if (chunk is None or timestamp is None or sequence is None or type(track) is not str
            or len(track) > 256 or type(encoded) is not str):
        return None
    payload = _fast_payload(encoded)
    if payload is None:
        return None
    return Media(stream_sid, track, chunk, timestamp, payload, sequence)


def _fast_payload(encoded: str) -> bytes | None:
    """`_payload`'s bytes, or None for it to say what is wrong."""
    if len(encoded) > _MAX_PAYLOAD_B64:
        return None
    try:
        return binascii.a2b_base64(encoded, strict_mode=True)  # b64decode(validate=True)
    except (binascii.Error, ValueError):
        return None


# Twilio's compact layout read in C (telephony/_fastmedia.c, built by setup.py): the same
# fields as `_MEDIA_COMPACT_RE` and the strict decode, for a subset of what they accept
# (whole base64 quartets), in a fifth of the time; None for anything else, which goes on
# below. Without a compiler the extension is not built and the expressions read everything.
try:
    from telephony._fastmedia import QuietHold
    from telephony._fastmedia import inbound_media as _inbound_media
    from telephony._fastmedia import media_fields as _media_fields
except ImportError:  # pragma: no cover - depends on the install
    _inbound_media = _media_fields = QuietHold = None

# The longest payload a media message may carry, in base64 characters (`inbound_media`).
MAX_PAYLOAD_B64 = _MAX_PAYLOAD_B64


def _no_inbound_media(text: str, stream_sid: str, max_payload_b64: int) -> None:
    return None


# inbound_media(text, stream_sid, MAX_PAYLOAD_B64) -> (payload, timestamp in ms) when `text`
# is a frame of the caller's audio on this stream in Twilio's compact layout: what
# `parse_message` makes a `Media` of with this `stream_sid`, an inbound track ("inbound" or
# "inbound_track") and a payload that is not empty, read in C without building the message.
# None for anything else (any other message, layout, stream or track; and always without the
# C extension): `parse_message` reads those. The stream's hot path (`TwilioStream._take`).
inbound_media: Callable[[str, str, int], tuple[bytes, int] | None] = (
    _inbound_media or _no_inbound_media)

# A `media` message laid out as Twilio sends it (its keys in this order; JSON whitespace
# allowed between tokens), read with one regular expression instead of the JSON parser and
# dict lookups: a third of the cost. Only text whose JSON value is exactly these fields can
# match (no escapes, every key once); anything else takes the general path below. Twilio's
# own messages have no whitespace at all: `_MEDIA_COMPACT_RE` reads those in 0.5 µs against
# 1.4 µs for the general layout (whose every `_WS` is a loop in the matcher). Its payload
# takes any characters but a quote (a one-character class is the matcher's fast loop): the
# strict base64 decode then rejects whatever is not base64 (a backslash, so any escape,
# included), as the general layout's character class does, and the general path decides.
_WS = r"[ \t\n\r]*"
_SEQUENCE, _TRACK = r'"([0-9]{1,15})"', r'"([A-Za-z_]{1,32})"'
_CHUNK = _TIMESTAMP = r'"([0-9]{1,15})"'
_STREAM_SID = r'"([A-Za-z0-9_.-]{1,64})"'
_MEDIA_COMPACT_RE = re.compile(
    r'\{"event":"media","sequenceNumber":' + _SEQUENCE + r',"media":\{"track":' + _TRACK
    + r',"chunk":' + _CHUNK + r',"timestamp":' + _TIMESTAMP + r',"payload":"([^"]*)"\},'
    + r'"streamSid":' + _STREAM_SID + r"\}")
_MEDIA_RE = re.compile(
    "".join((r"\{", _WS, r'"event"', _WS, ":", _WS, r'"media"', _WS, ",", _WS,
             r'"sequenceNumber"', _WS, ":", _WS, _SEQUENCE, _WS, ",", _WS,
             r'"media"', _WS, ":", _WS, r"\{", _WS,
             r'"track"', _WS, ":", _WS, _TRACK, _WS, ",", _WS,
             r'"chunk"', _WS, ":", _WS, _CHUNK, _WS, ",", _WS,
             r'"timestamp"', _WS, ":", _WS, _TIMESTAMP, _WS, ",", _WS,
             r'"payload"', _WS, ":", _WS, r'"([A-Za-z0-9+/]*={0,2})"', _WS, r"\}", _WS, ",",
             _WS, r'"streamSid"', _WS, ":", _WS, _STREAM_SID, _WS, r"\}",
             _WS)))


def _media_by_layout(text: str) -> Media | None:
    if _media_fields is not None:
        fields = _media_fields(text, _MAX_PAYLOAD_B64)
        if fields is not None:
            return Media(*fields)
    match = _MEDIA_COMPACT_RE.fullmatch(text) or _MEDIA_RE.fullmatch(text)
    if match is None:
        return None
    sequence, track, chunk, timestamp, encoded, stream_sid = match.groups()
    payload = _fast_payload(encoded)
    if payload is None:
        return None
    return Media(stream_sid, track, int(chunk), int(timestamp), payload, int(sequence))


def parse_message(text: str | bytes) -> InboundMessage:
    """Parse one WebSocket text frame from Twilio. Raises `ProtocolError` on anything else."""
    if type(text) is str and (media := _media_by_layout(text)) is not None:
        return media
    try:
        data = json.loads(text)
    except (ValueError, UnicodeDecodeError):
        raise ProtocolError("not valid JSON") from None
    except RecursionError:  # "[[[[…": nesting deeper than the parser's stack
        raise ProtocolError("JSON nested too deeply") from None
    if not isinstance(data, dict):
        raise ProtocolError("message must be a JSON object")
    event = data.get("event")
    if event == "media":
        return _fast_media(data) or _parse_media(data)
    if event == "mark":
        return Mark(stream_sid=_sid(data, "streamSid"), name=_str(_obj(data, "mark"), "name"))
    if event == "dtmf":
        dtmf = _obj(data, "dtmf")
        digit = _str(dtmf, "digit")
        if len(digit) != 1 or digit not in "0123456789*#ABCD":
            raise ProtocolError("'dtmf.digit' must be one keypad digit")
        return Dtmf(stream_sid=_sid(data, "streamSid"), digit=digit, track=_str(dtmf, "track", ""))
    if event == "start":
        return _parse_start(data)
    if event == "stop":
        stop = data.get("stop") or {}
        if not isinstance(stop, dict):
            raise ProtocolError("'stop' must be an object")
        return Stop(
            stream_sid=_sid(data, "streamSid"),
            call_sid=_str(stop, "callSid", ""),
            account_sid=_str(stop, "accountSid", ""),
        )
    if event == "connected":
        return Connected(protocol=_str(data, "protocol", "Call"), version=_str(data, "version", ""))
    raise ProtocolError(f"unknown event {str(event)[:32]!r}")


# Outbound messages. Twilio plays `media` payloads in order, with no file headers
# ("audio/x-mulaw", 8000 Hz); a `mark` is echoed back once the audio before it has played;
# `clear` empties Twilio's buffer (pending marks are then echoed at once).


def inbound_media_text(stream_sid: str, sequence: int, chunk: int, timestamp_ms: int,
                       payload_b64: str, track: str = "inbound") -> str:
    """A `media` message of the caller's audio exactly as Twilio sends it: its keys in this
    order, no whitespace (for the simulator and the load generators; `inbound_media` reads
    it)."""
    return (f'{{"event":"media","sequenceNumber":"{sequence}","media":{{"track":"{track}",'
            f'"chunk":"{chunk}","timestamp":"{timestamp_ms}","payload":"{payload_b64}"}},'
            f'"streamSid":"{stream_sid}"}}')


def media_message(stream_sid: str, ulaw: bytes) -> str:
    payload = base64.b64encode(ulaw).decode("ascii")
    return f'{{"event":"media","streamSid":"{stream_sid}","media":{{"payload":"{payload}"}}}}'


def mark_message(stream_sid: str, name: str) -> str:
    # The playout's names are counters, written out as they are (as `media_message` writes
    # the stream's SID, checked against `_SID_CHARS` when it arrived); any other name is
    # escaped by the JSON encoder.
    if name.isascii() and name.isalnum():
        return f'{{"event":"mark","streamSid":"{stream_sid}","mark":{{"name":"{name}"}}}}'
    return json.dumps({"event": "mark", "streamSid": stream_sid, "mark": {"name": name}})


def clear_message(stream_sid: str) -> str:
    return json.dumps({"event": "clear", "streamSid": stream_sid})


@dataclass(slots=True)
class OutboundLog:
    """Counts what we sent on a stream (for logs and tests)."""

    media: int = 0
    marks: int = 0
    clears: int = 0
    bytes: int = 0
    names: list[str] = field(default_factory=list)
