"""The usual WebSocket frame read in C (`telephony._fastmedia.masked_text`, used by
`voicebot.ws_protocol.DirectTextProtocol._read_frames`): exactly what the Python loop there
does with a whole, final, masked text frame, and None for everything it leaves to the rest of
that loop (and to `websockets`)."""

from __future__ import annotations

import asyncio
import struct

import pytest
import websockets
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket

from telephony.direct import DIRECT_TEXT
from voicebot.local_server import running_server

masked_text = pytest.importorskip("telephony._fastmedia").masked_text


def _frame(first: int, payload: bytes, mask: bytes | None, length_form: int) -> bytes:
    """A frame with the payload length written in the given form (7, 16 or 64 bits), as
    long as it fits."""
    n = len(payload)
    bit = 0x80 if mask is not None else 0
    if length_form == 7 and n < 126:
        head = bytes((first, bit | n))
    elif length_form <= 16 and n < 65536:
        head = bytes((first, bit | 126)) + struct.pack(">H", n)
    else:
        head = bytes((first, bit | 127)) + struct.pack(">Q", n)
    if mask is None:
        return head + payload
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def _oracle(data: bytes, pos: int, max_size: int) -> tuple[str, int] | None:
    """The Python loop's reading of one frame at `pos`, for the case the C reader takes."""
    if len(data) - pos < 2:
        return None
    first, second = data[pos], data[pos + 1]
    length, head = second & 0x7F, 2
    if length == 126:
        if len(data) - pos < 4:
            return None
        length, head = int.from_bytes(data[pos + 2:pos + 4], "big"), 4
    elif length == 127:
        if len(data) - pos < 10:
            return None
        length, head = int.from_bytes(data[pos + 2:pos + 10], "big"), 10
    if first != 0x81 or not second & 0x80 or (max_size >= 0 and length > max_size):
        return None
    head += 4
    end = pos + head + length
    if end > len(data):
        return None
    mask = data[pos + head - 4:pos + head]
    raw = bytes(b ^ mask[i % 4] for i, b in enumerate(data[pos + head:end]))
    try:
        return raw.decode("utf-8"), end
    except UnicodeDecodeError:
        return None


_payloads = st.one_of(
    st.text(max_size=300).map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.binary(max_size=300),  # mostly not UTF-8
    st.sampled_from([b"", "é".encode() * 200, b"\xed\xa0\x80", b"\xf4\x90\x80\x80",
                     b"x" * 70_000]),
)


@settings(derandomize=True, max_examples=1500, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.sampled_from([0x81, 0x81, 0x81, 0x01, 0x82, 0x88, 0x89, 0xC1, 0x91]), _payloads,
       st.one_of(st.none(), st.binary(min_size=4, max_size=4)), st.sampled_from([7, 16, 64]),
       st.binary(max_size=6), st.integers(0, 40), st.sampled_from([-1, 0, 64, 300, 65_536]))
def test_the_c_reader_reads_a_frame_exactly_as_the_python_loop(
        first: int, payload: bytes, mask: bytes | None, length_form: int, before: bytes,
        cut: int, max_size: int) -> None:
    frame = _frame(first, payload, mask, length_form)
    data = before + frame + b"\x81\x85"  # the start of the next frame behind it
    for end in (len(data), len(before) + len(frame), max(0, len(data) - cut)):
        chunk = data[:end]
        assert masked_text(chunk, len(before), max_size) == _oracle(chunk, len(before),
                                                                    max_size)


def test_the_c_reader_takes_the_usual_frame_and_leaves_the_rest() -> None:
    mask = b"\x01\x02\x03\x04"
    media = b'{"event":"media"}'
    frame = _frame(0x81, media, mask, 7)
    assert masked_text(frame + frame, 0, -1) == (media.decode(), len(frame))
    assert masked_text(frame + frame, len(frame), 100) == (media.decode(), 2 * len(frame))
    assert masked_text(frame, 0, len(media) - 1) is None  # over the limit
    assert masked_text(frame[:-1], 0, -1) is None  # not all here yet
    assert masked_text(_frame(0x81, media, None, 7), 0, -1) is None  # unmasked
    assert masked_text(_frame(0x01, media, mask, 7), 0, -1) is None  # not final
    assert masked_text(_frame(0x81, b"\xff", mask, 7), 0, -1) is None  # not UTF-8
    assert masked_text(_frame(0x81, b"x" * 2000, mask, 16), 0, -1) == ("x" * 2000, 2008)
    huge = bytes((0x81, 0xFF)) + struct.pack(">Q", 2**63 - 1) + mask
    assert masked_text(huge, 0, -1) is None
    assert masked_text(b"\x81", 0, -1) is None
    with pytest.raises(TypeError):
        masked_text(bytearray(frame), 0, -1)


async def test_a_text_frame_that_is_not_utf8_still_closes_the_connection_with_1007() -> None:
    """The C reader leaves it to the loop, which leaves it to `websockets`, as before."""
    seen: list[str] = []
    done = asyncio.Event()

    async def endpoint(websocket: WebSocket) -> None:
        direct = websocket.scope["extensions"][DIRECT_TEXT]
        await websocket.accept()
        direct.attach(seen.append)
        while (await websocket.receive())["type"] != "websocket.disconnect":
            pass
        done.set()

    app = Starlette(routes=[WebSocketRoute("/ws", endpoint)])
    async with running_server(app) as base:
        async with websockets.connect(base.replace("http", "ws") + "/ws") as ws:
            await ws.send("before")
            transport = ws.transport
            transport.write(_frame(0x81, b"\xff\xfe", b"\x11\x22\x33\x44", 7))
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), 5)
        await asyncio.wait_for(done.wait(), 5)
    assert seen == ["before"]
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1007
