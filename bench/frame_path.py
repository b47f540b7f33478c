"""The media path's own cost per inbound frame, in-process: no sockets, no event loop.

N calls, each a real `TwilioStream` on a real `Conversation` (Silero VAD, echo guard,
turn-taking), are fed Twilio `media` messages as their text: a caller utterance of 2.7 s
(the fixture "one two three") then silence, every 8 s, each call at its own place in that
cycle. The frames of all calls are interleaved as the server sees them, so with many calls
each frame finds its call's state out of the CPU's caches. What is timed is
`TwilioStream._take` (parse, dispatch, `Conversation.hear`), the synchronous part of a
frame; the turn-taking actions it returns are not carried out, so no reply is spoken.

    .venv/bin/python bench/frame_path.py                       # 1, 20 and 200 calls
    .venv/bin/python bench/frame_path.py --calls 200 --repeats 5

A step for A/B comparisons between commits, steadier than a whole server under load (run
both sides alternately all the same: the machine's speed drifts).
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import json
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import anyio  # noqa: E402

from bench.capacity_server import FixedStt, InstantLlm  # noqa: E402
from media.audiofile import read_wav  # noqa: E402
from media.mulaw import FRAME_BYTES, pcm16_to_ulaw, ulaw_silence  # noqa: E402
from media.vad import SileroSession, SileroVad  # noqa: E402
from pipeline.call_setup import CallInfo, ConversationConfig, Engines  # noqa: E402
from pipeline.conversation import Conversation  # noqa: E402
from pipeline.events import EventBus  # noqa: E402
from pipeline.listener import EndpointConfig  # noqa: E402
from pipeline.tts_piper import ToneTts  # noqa: E402
from telephony.stream import StreamState, TwilioStream  # noqa: E402

CYCLE_FRAMES = 400  # 8 s


class _Sink:
    """Where the bot's audio would go (nothing is said here: actions are not carried out)."""

    busy = False

    def play(self, segment: object) -> None:
        return None

    async def clear(self) -> bool:
        return False


def caller_cycle() -> list[bytes]:
    words = pcm16_to_ulaw(read_wav(ROOT / "tests" / "fixtures" / "one_two_three.wav", 8000))
    frames = [words[i:i + FRAME_BYTES] for i in range(0, len(words) - FRAME_BYTES + 1,
                                                       FRAME_BYTES)]
    return frames + [ulaw_silence(20)] * (CYCLE_FRAMES - len(frames))


def media_text(stream_sid: str, index: int, payload: bytes) -> str:
    return json.dumps({"event": "media", "sequenceNumber": str(index + 3),
                       "media": {"track": "inbound", "chunk": str(index + 2),
                                 "timestamp": str(index * 20),
                                 "payload": base64.b64encode(payload).decode()},
                       "streamSid": stream_sid}, separators=(",", ":"))


def make_calls(calls: int, silero: SileroSession) -> list[tuple[TwilioStream, list[str]]]:
    cycle = caller_cycle()
    engines = Engines(stt=FixedStt("hello"), llm=InstantLlm("Okay."), tts=ToneTts(),  # type: ignore[arg-type]
                      vad=lambda: SileroVad(silero), stt_limiter=anyio.CapacityLimiter(1),
                      turn_model=None)
    config = ConversationConfig(greeting="", system_prompt="Be brief.", apology="Sorry.",
                                endpoint=EndpointConfig(), idle_reprompt_s=1e9,
                                idle_hangup_s=1e9)
    out = []
    for call in range(calls):
        stream = TwilioStream(object(), None)  # type: ignore[arg-type]
        stream.state = StreamState.STARTED
        stream.stream_sid = f"MZ{call:032d}"
        sink = _Sink()
        stream.conversation = Conversation(CallInfo(f"CA{call:032d}", stream.stream_sid),
                                           engines, sink, EventBus(),  # type: ignore[arg-type]
                                           dataclasses.replace(config))
        offset = (call * 397) % CYCLE_FRAMES  # each call at its own place in the cycle
        texts = [media_text(stream.stream_sid, i, cycle[(i + offset) % CYCLE_FRAMES])
                 for i in range(2 * CYCLE_FRAMES)]
        out.append((stream, texts))
    return out


def time_cycle(calls: list[tuple[TwilioStream, list[str]]], first: int) -> float:
    """CPU µs per frame over one 8 s cycle of every call's frames, interleaved."""
    start = time.process_time()
    for index in range(first, first + CYCLE_FRAMES):
        for stream, texts in calls:
            stream._take(texts[index])
    return (time.process_time() - start) / (CYCLE_FRAMES * len(calls)) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, nargs="+", default=[1, 20, 200])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    warnings.simplefilter("ignore", RuntimeWarning)  # the actions' coroutines, never awaited
    silero = SileroSession()
    print(f"{'calls':>6} {'µs per frame (best)':>20} {'runs':>24}")
    for n in args.calls:
        runs = []
        for _ in range(args.repeats):
            calls = make_calls(n, silero)
            time_cycle(calls, 0)  # the first cycle warms up (allocations, the first fits)
            runs.append(time_cycle(calls, CYCLE_FRAMES))
        print(f"{n:>6} {min(runs):>20.2f} {' '.join(f'{r:.2f}' for r in runs):>24}", flush=True)


if __name__ == "__main__":
    main()
