"""A cheap Twilio Media Streams load generator: N calls from one process.

Each call is a raw asyncio protocol (no WebSocket library): the upgrade is written by hand,
client frames use an all-zero mask (valid per RFC 6455; the payload goes out as it is), and
the per-frame JSON is one f-string around a payload precomputed for the call's script. Frames
are due every 20 ms per call; calls are spread over five 4 ms phases so the load is smooth.

Like Twilio, each call "plays" the bot's audio in real time: a `mark` is echoed once the audio
sent before it has played, `clear` drops the buffer and echoes pending marks. Measured here:
frames sent and how late the generator sent them, and on the outbound side, per bot reply,
how the chunks arrived against real-time playback (pacing jitter, and underruns: the buffer
ran dry in the middle of a reply, an audible gap).

    python bench/media_load.py --url ws://127.0.0.1:8000/twilio/media --calls 50 --duration 20
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import random
import resource
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from telephony.messages import inbound_media_text  # noqa: E402

FRAME_S = 0.020
PHASES = 5
MASK = b"\x00\x00\x00\x00"
REPLY_GAP_S = 0.5  # media arriving this long after the buffer ran dry starts a new reply
CALLER_WAV = ROOT / "tests" / "fixtures" / "open_hours.wav"  # what every caller says


def script_payloads(wav: Path, speech_every_s: float,
                    noise_dbfs: float | None = None) -> list[str]:
    """One call's cycle as base64 μ-law frames: silence, then the WAV, repeated.

    The silence is digital (what Twilio sends for a muted or quiet line), or with
    `noise_dbfs` a line hiss at that level, on every frame (added to the speech too): above
    the VAD's -50 dBFS gate, it makes the model score every window, as on a noisy line."""
    import numpy as np

    from media.mulaw import pcm16_to_ulaw, ulaw_silence
    from telephony.simulator import wav_to_frames

    speech = list(wav_to_frames(wav))
    gap = max(0, int(speech_every_s / FRAME_S) - len(speech)) if speech_every_s > 0 else 1
    frames = [ulaw_silence(20)] * gap + (speech if speech_every_s > 0 else [])
    if noise_dbfs is not None:
        from media.mulaw import ulaw_to_pcm16

        rng = np.random.default_rng(7)
        amplitude = 32768 * 10 ** (noise_dbfs / 20)
        frames = [pcm16_to_ulaw(np.clip(ulaw_to_pcm16(f) + rng.normal(0, amplitude, 160),
                                        -32768, 32767).astype(np.int16)) for f in frames]
    return [base64.b64encode(f).decode() for f in frames]


def media_text(stream_sid: str, k: int, payload: str) -> str:
    """The k-th (from 0) `media` message of a stream, laid out as Twilio sends it."""
    return inbound_media_text(stream_sid, k + 2, k + 1, k * 20, payload)


def ws_frame(text: str, opcode: int = 0x1) -> bytes:
    payload = text.encode()
    n = len(payload)
    if n < 126:
        header = bytes((0x80 | opcode, 0x80 | n))
    elif n < 65536:
        header = bytes((0x80 | opcode, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        header = bytes((0x80 | opcode, 0x80 | 127)) + n.to_bytes(8, "big")
    return header + MASK + payload


@dataclass
class CallStats:
    sent: int = 0
    late_sends: int = 0
    send_lag_max_ms: float = 0.0  # in the window: how late this generator sent a frame
    media_in: int = 0
    marks_echoed: int = 0
    clears: int = 0
    replies: int = 0
    underruns: int = 0  # in the window
    ramp_underruns: int = 0  # before it
    underrun_ms: list[float] = field(default_factory=list)
    jitter_ms: list[float] = field(default_factory=list)
    greeting_s: float | None = None
    refused: bool = False
    closed_early: bool = False


class LoadCall(asyncio.Protocol):
    """One simulated call over a raw socket."""

    def __init__(self, gen: LoadGenerator, payloads: list[str], offset: int) -> None:
        self.gen = gen
        self.payloads = payloads
        self.offset = offset
        self.call_sid = "CA" + uuid.uuid4().hex
        self.stream_sid = "MZ" + uuid.uuid4().hex
        self.stats = CallStats()
        self.transport: asyncio.Transport | None = None
        self.upgraded = asyncio.get_running_loop().create_future()
        self._buffer = bytearray()
        self._open = False
        self.frame = 0
        self.t0 = 0.0
        self.stopped = False
        # Playback, as Twilio does it.
        self._play_until = 0.0
        self._last_arrival = 0.0
        self._prev_duration = 0.0
        self._chunk_in_reply = 0
        self._marks: list[tuple[float, str]] = []

    # -- connection ---------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass
        url = urlsplit(self.gen.url)
        request = (f"GET {url.path} HTTP/1.1\r\nHost: {url.netloc}\r\nUpgrade: websocket\r\n"
                   "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                   "Sec-WebSocket-Version: 13\r\n\r\n")
        transport.write(request.encode())

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.stopped and self._open:
            self.stats.closed_early = True
        self._open = False
        if not self.upgraded.done():
            self.upgraded.set_result(False)

    def send_text(self, text: str) -> None:
        if self._open and self.transport is not None:
            self.transport.write(ws_frame(text))

    def start(self) -> None:
        self.send_text('{"event":"connected","protocol":"Call","version":"1.0.0"}')
        self.t0 = time.monotonic()
        start = {"event": "start", "sequenceNumber": "1", "streamSid": self.stream_sid,
                 "start": {"streamSid": self.stream_sid, "callSid": self.call_sid,
                           "accountSid": "AC" + "0" * 32, "tracks": ["inbound"],
                           "customParameters": {"direction": "simulated", "from": "+15550100001"},
                           "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000,
                                           "channels": 1}}}
        self.send_text(json.dumps(start))

    def send_frame(self, now: float) -> None:
        """Send the next 20 ms frame (called on this call's phase of the tick)."""
        k = self.frame
        self.frame = k + 1
        due = self.t0 + k * FRAME_S
        if now - due > 0.010:
            self.stats.late_sends += 1
            if self.gen.in_window and (now - due) * 1000 > self.stats.send_lag_max_ms:
                self.stats.send_lag_max_ms = (now - due) * 1000
        self.send_text(media_text(self.stream_sid, k,
                                  self.payloads[(k + self.offset) % len(self.payloads)]))
        self.stats.sent += 1
        if self._marks:
            self._echo_due(now)

    def stop(self) -> None:
        self.stopped = True
        self.send_text(json.dumps({"event": "stop", "streamSid": self.stream_sid,
                                   "stop": {"callSid": self.call_sid}}))
        if self.transport is not None:
            self.transport.write(bytes((0x88, 0x82)) + MASK + (1000).to_bytes(2, "big"))

    # -- receiving ----------------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        self._buffer += data
        if not self._open:
            end = self._buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self._buffer[:end])
            del self._buffer[: end + 4]
            ok = head.startswith(b"HTTP/1.1 101")
            self._open = ok
            self.stats.refused = not ok
            if not self.upgraded.done():
                self.upgraded.set_result(ok)
            if not ok:
                assert self.transport is not None
                self.transport.close()
                return
        buf = self._buffer
        pos = 0
        while len(buf) - pos >= 2:
            opcode = buf[pos] & 0x0F
            n = buf[pos + 1] & 0x7F
            head = 2
            if n == 126:
                if len(buf) - pos < 4:
                    break
                n = int.from_bytes(buf[pos + 2 : pos + 4], "big")
                head = 4
            elif n == 127:
                if len(buf) - pos < 10:
                    break
                n = int.from_bytes(buf[pos + 2 : pos + 10], "big")
                head = 10
            if len(buf) - pos < head + n:
                break
            payload = bytes(buf[pos + head : pos + head + n])
            pos += head + n
            if opcode == 0x1:
                self._on_text(payload)
            elif opcode == 0x9:  # ping → pong (masked, like every client frame)
                assert self.transport is not None
                self.transport.write(bytes((0x8A, 0x80 | len(payload))) + MASK + payload)
            elif opcode == 0x8:
                self._open = False
        del buf[:pos]

    def _on_text(self, payload: bytes) -> None:
        now = time.monotonic()
        if payload.startswith(b'{"event":"media"'):
            start = payload.find(b'"payload":"') + 11
            end = payload.find(b'"', start)
            b64 = end - start
            nbytes = b64 * 3 // 4 - payload.count(b"=", end - 2, end)
            self._on_media(now, nbytes / 8000.0)
            return
        message = json.loads(payload)
        event = message.get("event")
        if event == "mark":
            name = message["mark"]["name"]
            if self._play_until <= now:
                self._echo(name)
            else:
                self._marks.append((self._play_until, name))
        elif event == "clear":
            self.stats.clears += 1
            self._play_until = now
            self._chunk_in_reply = 0  # what follows a clear is new audio, not a late chunk
            for _, name in self._marks:
                self._echo(name)
            self._marks.clear()

    def _on_media(self, now: float, duration: float) -> None:
        stats = self.stats
        stats.media_in += 1
        if stats.greeting_s is None:
            stats.greeting_s = now - self.t0
        dry_for = now - self._play_until
        if self._chunk_in_reply == 0 or dry_for > REPLY_GAP_S:
            stats.replies += 1
            self._chunk_in_reply = 1
        else:
            self._chunk_in_reply += 1
            if not self.gen.in_window:  # the ramp-up: counted apart, like the server's lag
                stats.ramp_underruns += dry_for > 0.005 and not self.gen.window_end
            elif dry_for > 0.005:
                stats.underruns += 1
                stats.underrun_ms.append(dry_for * 1000)
            if self._chunk_in_reply > 2 and self.gen.in_window:
                # Steady state: one chunk per chunk of audio played.
                expected = self._prev_duration
                stats.jitter_ms.append(abs((now - self._last_arrival) - expected) * 1000)
        self._last_arrival = now
        self._prev_duration = duration
        self._play_until = max(self._play_until, now) + duration

    def _echo_due(self, now: float) -> None:
        due = [m for m in self._marks if m[0] <= now]
        if due:
            self._marks = [m for m in self._marks if m[0] > now]
            for _, name in due:
                self._echo(name)

    def _echo(self, name: str) -> None:
        self.stats.marks_echoed += 1
        self.send_text(f'{{"event":"mark","streamSid":"{self.stream_sid}",'
                       f'"mark":{{"name":"{name}"}}}}')


class LoadGenerator:
    """Opens `calls` calls over `ramp_s`, streams for `duration_s`, then stops them."""

    def __init__(self, url: str, calls: int, *, ramp_s: float, payloads: list[str],
                 settle_s: float = 0.0) -> None:
        self.url = url
        self.calls_wanted = calls
        self.ramp_s = ramp_s
        self.settle_s = settle_s  # after the ramp, before the window: the last greetings
        self.payloads = payloads
        self.calls: list[LoadCall] = []
        self._phases: list[list[LoadCall]] = [[] for _ in range(PHASES)]
        self.connect_failures = 0
        self._grid0 = time.monotonic()
        self.window_end = 0.0  # set when the calls are being stopped: nothing counts after
        self.in_window = False  # between the ramp-up and the end

    async def _open_call(self, index: int) -> None:
        loop = asyncio.get_running_loop()
        url = urlsplit(self.url)
        call = LoadCall(self, self.payloads, offset=random.randrange(len(self.payloads)))
        try:
            await loop.create_connection(lambda: call, url.hostname, url.port)
            if not await asyncio.wait_for(call.upgraded, 10):
                self.calls.append(call)
                return
        except (OSError, TimeoutError):
            self.connect_failures += 1
            return
        call.start()
        self.calls.append(call)
        # Visit the call on the tick phase its own 20 ms schedule falls in.
        tick = FRAME_S / PHASES
        phase = int(((call.t0 - self._grid0) % FRAME_S) / tick) % PHASES
        self._phases[phase].append(call)

    async def run(self, duration_s: float, on_window: object = None,
                  on_end: object = None) -> float:
        """Ramp up, settle, stream until `duration_s` after that, stop; returns the window
        start."""
        tick = FRAME_S / PHASES
        begin = self._grid0 = time.monotonic()
        openers: list[asyncio.Task[None]] = []
        next_open = 0
        visited = 0  # tick slots served so far (a slot is one phase's turn)
        window_start = 0.0
        end = begin + self.ramp_s + self.settle_s + duration_s
        while True:
            now = time.monotonic()
            while next_open < self.calls_wanted and now >= begin + (
                    next_open * self.ramp_s / max(1, self.calls_wanted)):
                openers.append(asyncio.create_task(self._open_call(next_open)))
                next_open += 1
            if not window_start and now >= begin + self.ramp_s + self.settle_s:
                await asyncio.gather(*openers)
                window_start = time.monotonic()
                self.in_window = True
                if on_window is not None:
                    await on_window()  # type: ignore[operator]
            if now >= end:
                self.window_end = time.monotonic()
                self.in_window = False
                if on_end is not None:
                    await on_end()  # type: ignore[operator]
                break
            # Serve every phase whose turn has come since the last pass (one pass per tick
            # when the generator keeps up; a call that fell behind catches up, 5 frames max).
            slot = int((now - begin) / tick)
            while visited <= slot:
                for call in self._phases[visited % PHASES]:
                    sent = 0
                    while call._open and now >= call.t0 + call.frame * FRAME_S - tick and sent < 5:
                        call.send_frame(now)
                        sent += 1
                visited += 1
            await asyncio.sleep(max(0.0, begin + (slot + 1) * tick - time.monotonic()))
        for call in self.calls:
            if call._open:
                call.stop()
        await asyncio.sleep(1.0)
        for call in self.calls:
            if call.transport is not None:
                call.transport.close()
        return window_start

    def summary(self) -> dict[str, object]:
        stats = [c.stats for c in self.calls]
        jitter = sorted(j for s in stats for j in s.jitter_ms)
        underruns = [u for s in stats for u in s.underrun_ms]

        def p(values: list[float], q: float) -> float | None:
            if not values:
                return None
            return values[min(len(values) - 1, int(q * (len(values) - 1) + 0.5))]

        usage = resource.getrusage(resource.RUSAGE_SELF)
        return {
            "generator_cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
            "calls": len(self.calls),
            "refused": sum(s.refused for s in stats) + self.connect_failures,
            "closed_early": sum(s.closed_early for s in stats),
            "frames_sent": sum(s.sent for s in stats),
            "late_sends": sum(s.late_sends for s in stats),
            "send_lag_max_ms": round(max((s.send_lag_max_ms for s in stats), default=0.0), 1),
            "media_in": sum(s.media_in for s in stats),
            "replies": sum(s.replies for s in stats),
            "marks_echoed": sum(s.marks_echoed for s in stats),
            "clears": sum(s.clears for s in stats),
            "underruns": len(underruns),
            "ramp_underruns": sum(s.ramp_underruns for s in stats),
            "underrun_max_ms": max(underruns, default=0.0),
            "jitter_p50_ms": p(jitter, 0.5),
            "jitter_p99_ms": p(jitter, 0.99),
            "jitter_max_ms": jitter[-1] if jitter else None,
            "greeting_p99_s": p(sorted(s.greeting_s for s in stats if s.greeting_s), 0.99),
        }


async def run_load(url: str, calls: int, duration_s: float, *, ramp_s: float, wav: Path,
                   speech_every_s: float, stats_dir: str | None,
                   noise_dbfs: float | None = None, settle_s: float = 0.0) -> dict[str, object]:
    """Run the load. With `stats_dir`, mark the steady window for the bench server's workers
    (they reset their counters on `reset` and write their final numbers on `end`)."""
    payloads = script_payloads(wav, speech_every_s, noise_dbfs)
    generator = LoadGenerator(url, calls, ramp_s=ramp_s, payloads=payloads, settle_s=settle_s)

    def mark(name: str) -> None:
        if stats_dir:
            (Path(stats_dir) / name).write_text(uuid.uuid4().hex)

    async def window_start() -> None:
        mark("reset")

    async def window_end() -> None:
        mark("end")

    window = await generator.run(duration_s, on_window=window_start, on_end=window_end)
    summary = generator.summary()
    summary["window_s"] = round(generator.window_end - window, 2) if window else 0.0
    return summary


async def _main(args: argparse.Namespace) -> dict[str, object]:
    return await run_load(args.url, args.calls, args.duration, ramp_s=args.ramp_s,
                          wav=Path(args.wav), speech_every_s=args.speech_every_s,
                          noise_dbfs=args.noise_dbfs, settle_s=args.settle_s,
                          stats_dir=args.stats_dir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--calls", type=int, default=10)
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--ramp-s", type=float, default=5.0)
    parser.add_argument("--settle-s", type=float, default=4.0,
                        help="after the ramp-up and before the window: the last calls' "
                             "greetings (3.2 s of audio by default) play out")
    parser.add_argument("--wav", default=str(CALLER_WAV))
    parser.add_argument("--speech-every-s", type=float, default=8.0)
    parser.add_argument("--noise-dbfs", type=float, help="line hiss at this level (default: "
                        "digital silence between the sentences)")
    parser.add_argument("--stats-dir", help="the bench server's BENCH_DIR")
    args = parser.parse_args()
    try:
        import uvloop  # the generator must be cheaper than the server it loads

        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    print(json.dumps(runner(_main(args)), indent=2))


if __name__ == "__main__":
    main()
