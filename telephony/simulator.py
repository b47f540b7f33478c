"""A simulated Twilio caller: plays WAV files into `/twilio/media` the way Twilio would.

It sends `connected`, `start`, then 20 ms μ-law `media` frames on a real-time schedule (divided
by `pace`, so tests can run faster than real time), silence between turns, and `stop` at the
end. It also behaves like Twilio's player: bot audio is "played" at the same pace, each `mark` is
echoed once the audio before it has played (at once if nothing is buffered), and `clear` drops
the buffer and echoes pending marks at once. It records when each turn's speech ended, when the
bot's answer started arriving, and every `clear`, so latency can be measured from outside.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from media.audiofile import read_wav
from media.mulaw import FRAME_BYTES, pcm16_to_ulaw, ulaw_silence
from telephony.messages import inbound_media_text

FRAME_MS = 20
SPEECH_DBFS = -40.0


@dataclass(slots=True)
class CallerTurn:
    """One thing the caller says: a WAV file, or a DTMF digit."""

    wav: str | None = None
    digit: str | None = None
    barge_in_after_ms: float | None = None  # start talking this long into the bot's reply
    pause_before_ms: float = 0.0
    raw: list[str | bytes] | None = None  # frames sent as they are before the turn (fuzzing)
    silence_ms: float = 0.0  # say nothing for this long (a silent caller), then go on


@dataclass(slots=True)
class TurnResult:
    label: str
    speech_started_at: float = 0.0
    speech_ended_at: float = 0.0
    first_reply_audio_at: float | None = None
    reply_audio_ms: float = 0.0
    clear_at: float | None = None

    @property
    def latency_ms(self) -> float | None:
        if self.first_reply_audio_at is None:
            return None
        return (self.first_reply_audio_at - self.speech_ended_at) * 1000


@dataclass(slots=True)
class SimulationResult:
    call_sid: str
    stream_sid: str
    pace: float
    greeting_latency_ms: float | None = None
    turns: list[TurnResult] = field(default_factory=list)
    received_audio: bytearray = field(default_factory=bytearray)
    clears: list[float] = field(default_factory=list)
    marks_echoed: int = 0
    closed_by_server: bool = False


def wav_to_frames(path: str | Path) -> list[bytes]:
    """A WAV file as 20 ms μ-law frames (the last one padded with silence)."""
    samples = read_wav(path, 8000)
    ulaw = pcm16_to_ulaw(samples)
    if len(ulaw) % FRAME_BYTES:
        ulaw += ulaw_silence(FRAME_MS)[: FRAME_BYTES - len(ulaw) % FRAME_BYTES]
    return [ulaw[i : i + FRAME_BYTES] for i in range(0, len(ulaw), FRAME_BYTES)]


def _voiced(frame: bytes) -> bool:
    from media.mulaw import ulaw_to_pcm16

    pcm = ulaw_to_pcm16(frame).astype(np.float64)
    rms = np.sqrt(np.mean(pcm * pcm)) / 32768.0
    return rms > 0 and 20 * np.log10(rms) > SPEECH_DBFS


class _Player:
    """Twilio's side of playback: a buffer drained in (paced) real time, with marks."""

    def __init__(self, pace: float) -> None:
        self.pace = pace
        self.buffered = 0  # bytes of audio waiting to play
        self.marks: deque[tuple[int, str]] = deque()  # (bytes still ahead of the mark, name)
        self.played_total = 0
        self.last_audio_at = 0.0

    def add_audio(self, nbytes: int) -> None:
        self.buffered += nbytes
        self.last_audio_at = time.monotonic()

    def add_mark(self, name: str) -> list[str]:
        if self.buffered == 0:
            return [name]
        self.marks.append((self.buffered, name))
        return []

    def clear(self) -> list[str]:
        echoed = [name for _, name in self.marks]
        self.marks.clear()
        self.buffered = 0
        return echoed

    def advance(self, nbytes: int) -> list[str]:
        played = min(nbytes, self.buffered)
        self.buffered -= played
        self.played_total += played
        echoed: list[str] = []
        remaining: deque[tuple[int, str]] = deque()
        for ahead, name in self.marks:
            if ahead - played <= 0:
                echoed.append(name)
            else:
                remaining.append((ahead - played, name))
        self.marks = remaining
        return echoed

    @property
    def idle(self) -> bool:
        return self.buffered == 0


class SimulatedCaller:
    """Drives one simulated call against a Media Streams WebSocket URL."""

    def __init__(
        self,
        url: str,
        *,
        pace: float = 1.0,
        from_number: str = "+15550100001",
        to_number: str = "+15550100002",
        direction: str = "simulated",
        parameters: dict[str, str] | None = None,
        reply_timeout_s: float = 30.0,
        quiet_after_reply_ms: float = 700.0,
        headers: dict[str, str] | None = None,
        auth_token: str | None = None,
        signed_url: str | None = None,
        call_sid: str | None = None,
    ) -> None:
        """`call_sid`: the call this stream belongs to (a new one by default; an earlier
        call's for a stream connected again after a drop)."""
        self.url = url
        self.pace = pace
        self.call_sid = call_sid or "CA" + uuid.uuid4().hex
        self.stream_sid = "MZ" + uuid.uuid4().hex
        self.parameters = {"from": from_number, "to": to_number, "direction": direction,
                           **(parameters or {})}
        self.reply_timeout_s = reply_timeout_s
        self.quiet_after_reply_ms = quiet_after_reply_ms
        self.headers = dict(headers or {})
        if auth_token:
            # Twilio signs the upgrade: HMAC-SHA1 of the public wss:// URL (no params).
            from twilio.request_validator import RequestValidator

            target = signed_url or url.replace("ws://", "wss://", 1)
            self.headers["X-Twilio-Signature"] = RequestValidator(auth_token).compute_signature(
                target, {})
        self.result = SimulationResult(self.call_sid, self.stream_sid, pace)
        self._player = _Player(pace)
        self._seq = itertools.count(1)
        self._chunk = 0
        self._ws: object = None
        self._current: TurnResult | None = None
        self._reply_audio = asyncio.Event()
        self._started_at = 0.0

    # Sending ---------------------------------------------------------------------------------
    async def _send(self, payload: dict[str, object]) -> None:
        payload.setdefault("sequenceNumber", str(next(self._seq)))
        await self._ws.send(json.dumps(payload))  # type: ignore[attr-defined]

    async def _send_frame(self, frame: bytes) -> None:
        # Laid out as Twilio lays it out (compact, its keys in its order): the server's hot
        # path for the caller's audio reads exactly that (`telephony.messages.inbound_media`).
        self._chunk += 1
        await self._ws.send(inbound_media_text(  # type: ignore[attr-defined]
            self.stream_sid, next(self._seq), self._chunk, int(self._chunk * FRAME_MS),
            base64.b64encode(frame).decode("ascii")))

    async def _stream_frames(self, frames: list[bytes], on_voiced=None) -> None:
        interval = FRAME_MS / 1000 / self.pace
        start = time.monotonic()
        for index, frame in enumerate(frames):
            delay = start + index * interval - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            await self._send_frame(frame)
            self._player_tick()
            await self._flush_marks()
            if on_voiced is not None and _voiced(frame):
                on_voiced(time.monotonic())

    def _player_tick(self) -> None:
        """Advance playback by one frame's worth (the caller's clock drives both)."""
        for name in self._player.advance(FRAME_BYTES):
            self._echo_mark(name)

    def _echo_mark(self, name: str) -> None:
        self.result.marks_echoed += 1
        payload = {"event": "mark", "streamSid": self.stream_sid, "mark": {"name": name},
                   "sequenceNumber": str(next(self._seq))}
        self._pending_sends.append(json.dumps(payload))

    async def _flush_marks(self) -> None:
        while self._pending_sends:
            await self._ws.send(self._pending_sends.popleft())  # type: ignore[attr-defined]

    async def _silence_until_reply_done(self, turn: TurnResult | None, max_s: float) -> None:
        """Keep the line open with silence until the bot has answered and gone quiet."""
        frame = ulaw_silence(FRAME_MS)
        interval = FRAME_MS / 1000 / self.pace
        start = time.monotonic()
        quiet_frames = 0
        needed = int(self.quiet_after_reply_ms / FRAME_MS)
        index = 0
        while time.monotonic() - start < max_s:
            delay = start + index * interval - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            index += 1
            await self._send_frame(frame)
            self._player_tick()
            await self._flush_marks()
            heard_reply = turn is None or turn.first_reply_audio_at is not None
            quiet_frames = quiet_frames + 1 if self._player.idle else 0
            if heard_reply and quiet_frames >= needed:
                return

    async def _silence_until_played(self, ms: float, turn: TurnResult) -> None:
        """Silence until the bot has been heard for `ms` (for a barge-in)."""
        frame = ulaw_silence(FRAME_MS)
        interval = FRAME_MS / 1000 / self.pace
        start = time.monotonic()
        index = 0
        played_at_reply = None
        while time.monotonic() - start < self.reply_timeout_s:
            delay = start + index * interval - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            index += 1
            await self._send_frame(frame)
            before = self._player.played_total
            self._player_tick()
            await self._flush_marks()
            if turn.first_reply_audio_at is not None:
                if played_at_reply is None:
                    played_at_reply = before
                if (self._player.played_total - played_at_reply) / 8 >= ms:
                    return

    # Receiving -------------------------------------------------------------------------------
    async def _receive(self) -> None:
        try:
            async for raw in self._ws:  # type: ignore[attr-defined]
                message = json.loads(raw)
                event = message.get("event")
                now = time.monotonic()
                if event == "media":
                    audio = base64.b64decode(message["media"]["payload"])
                    self.result.received_audio += audio
                    self._player.add_audio(len(audio))
                    turn = self._current
                    if turn is not None and now >= turn.speech_ended_at > 0:
                        if turn.first_reply_audio_at is None:
                            turn.first_reply_audio_at = now
                        turn.reply_audio_ms += len(audio) / 8
                    elif turn is None and self.result.greeting_latency_ms is None:
                        self.result.greeting_latency_ms = (now - self._started_at) * 1000
                elif event == "mark":
                    for name in self._player.add_mark(message["mark"]["name"]):
                        self._echo_mark(name)
                elif event == "clear":
                    self.result.clears.append(now)
                    if self._current is not None and self._current.clear_at is None:
                        self._current.clear_at = now
                    for name in self._player.clear():
                        self._echo_mark(name)
        except Exception:
            self.result.closed_by_server = True

    # The call ------------------------------------------------------------------------------
    async def run(self, turns: list[CallerTurn], *, hang_up_early_ms: float | None = None
                  ) -> SimulationResult:
        """Place the call, say each turn, wait for each reply, then send `stop`.

        `hang_up_early_ms`: after the last turn, hang up (close the socket without `stop`)
        this long after the bot's reply starts, to simulate a caller hanging up mid-reply.
        """
        import websockets

        self._pending_sends: deque[str] = deque()
        # No compression: Twilio does not offer permessage-deflate, and with it the server
        # reads every frame the general way, never its frame reader or quiet hold.
        async with websockets.connect(self.url, additional_headers=self.headers,
                                      max_size=2**22, compression=None) as ws:
            self._ws = ws
            receiver = asyncio.create_task(self._receive())
            try:
                await self._send({"event": "connected", "protocol": "Call", "version": "1.0.0"})
                self._started_at = time.monotonic()
                await self._send({
                    "event": "start",
                    "streamSid": self.stream_sid,
                    "start": {
                        "streamSid": self.stream_sid, "callSid": self.call_sid,
                        "accountSid": "AC" + "0" * 32, "tracks": ["inbound"],
                        "customParameters": self.parameters,
                        "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000,
                                        "channels": 1},
                    },
                })
                # Let the greeting play out before the caller speaks.
                await self._silence_until_reply_done(None, self.reply_timeout_s)
                for index, turn in enumerate(turns):
                    await self._say(turn)
                    last = index == len(turns) - 1
                    if last and hang_up_early_ms is not None:
                        assert self._current is not None
                        await self._silence_until_played(hang_up_early_ms, self._current)
                        await ws.close()
                        return self.result
                    next_barges = (not last) and turns[index + 1].barge_in_after_ms is not None
                    if next_barges:
                        assert self._current is not None
                        await self._silence_until_played(
                            turns[index + 1].barge_in_after_ms or 0.0, self._current)
                    else:
                        await self._silence_until_reply_done(self._current, self.reply_timeout_s)
                await self._flush_marks()
                await self._send({"event": "stop", "streamSid": self.stream_sid,
                                  "stop": {"accountSid": "AC" + "0" * 32,
                                           "callSid": self.call_sid}})
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(asyncio.shield(receiver), timeout=5)
            except websockets.ConnectionClosed:
                # The server ended the call (the bot hung up or transferred it).
                self.result.closed_by_server = True
            finally:
                receiver.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await receiver
        return self.result

    async def _say(self, turn: CallerTurn) -> None:
        if turn.pause_before_ms:
            frames = int(turn.pause_before_ms / FRAME_MS)
            await self._stream_frames([ulaw_silence(FRAME_MS)] * frames)
        if turn.silence_ms and turn.wav is None and turn.digit is None:
            self.result.turns.append(TurnResult(label=f"silence {turn.silence_ms:g} ms"))
            await self._stream_frames([ulaw_silence(FRAME_MS)] * int(turn.silence_ms / FRAME_MS))
            return
        label = (turn.wav and Path(turn.wav).name) or f"dtmf {turn.digit}"
        result = TurnResult(label=label)
        self.result.turns.append(result)
        if turn.digit is not None:
            result.speech_started_at = result.speech_ended_at = time.monotonic()
            self._current = result
            await self._send({"event": "dtmf", "streamSid": self.stream_sid,
                              "dtmf": {"track": "inbound_track", "digit": turn.digit}})
            return
        assert turn.wav is not None
        frames = wav_to_frames(turn.wav)

        def on_voiced(at: float) -> None:
            if result.speech_started_at == 0.0:
                result.speech_started_at = at
            result.speech_ended_at = at

        # Until this turn's speech ends, bot audio still belongs to the previous reply.
        await self._stream_frames(frames, on_voiced)
        await self._flush_marks()
        self._current = result
