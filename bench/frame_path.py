"""The media path's own cost per inbound frame, in-process: no sockets, no event loop.

N calls, each a real `TwilioStream` on a real `Conversation` (Silero VAD, echo guard,
turn-taking), are fed Twilio `media` messages as their text, scripted as the capacity
benchmark's callers are (`bench/media_load.py`'s `script_payloads`): silence, then an
utterance, every 8 s, each call at its own place in that cycle. The utterance is the fixture
"one two three" (2.7 s), where the capacity benchmark's callers say "open hours" (3.3 s):
kept so that the figures stay comparable from session to session. The frames of all calls are interleaved as the server sees them, so with many calls
each frame finds its call's state out of the CPU's caches. What is timed is
`TwilioStream._take` (parse, dispatch, `Conversation.hear`), the synchronous part of a
frame; the turn-taking actions it returns are not carried out, so no reply is spoken.

    .venv/bin/python bench/frame_path.py                       # 1, 20 and 200 calls
    .venv/bin/python bench/frame_path.py --calls 200 --repeats 5
    .venv/bin/python bench/frame_path.py --calls 200 --repeats 4 --defer both

Where a frame's time goes: `--by-kind` times each frame of the second cycle on its own and
sorts them by what the frame did (only held; released a block of held frames, so the
listening path ran; heard on its own):

    .venv/bin/python bench/frame_path.py --calls 200 --by-kind

A step for A/B comparisons between commits, steadier than a whole server under load (run
both sides alternately all the same: the machine's speed drifts). Steadier still, where the
machine is noisy: instructions counted by valgrind, which do not drift. `--once N` builds N
calls and runs their two cycles with nothing printed; the count for 1 call is the start-up's
(and one call's), so (count(50) - count(1)) / (49 × 800) is the instructions per frame:

    valgrind --tool=callgrind --callgrind-out-file=/tmp/cg50 .venv/bin/python bench/frame_path.py --once 50
    valgrind --tool=callgrind --callgrind-out-file=/tmp/cg1 .venv/bin/python bench/frame_path.py --once 1
    callgrind_annotate /tmp/cg50 | grep "PROGRAM TOTALS"       # about 6 minutes each
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import anyio  # noqa: E402
from websockets.frames import apply_mask  # noqa: E402

from bench.capacity_server import FixedStt, InstantLlm  # noqa: E402
from bench.media_load import media_text, script_payloads  # noqa: E402
from media.vad import SileroSession, SileroVad  # noqa: E402
from pipeline.call_setup import CallInfo, ConversationConfig, Engines  # noqa: E402
from pipeline.conversation import Conversation  # noqa: E402
from pipeline.events import EventBus  # noqa: E402
from pipeline.listener import EndpointConfig  # noqa: E402
from pipeline.tts_piper import ToneTts  # noqa: E402
from telephony.stream import StreamState, TwilioStream  # noqa: E402
from voicebot.ws_protocol import DirectText, DirectTextProtocol  # noqa: E402

FIXTURE = ROOT / "tests" / "fixtures" / "one_two_three.wav"
CYCLE_S = 8.0


class _Sink:
    """Where the bot's audio would go (nothing is said here: actions are not carried out)."""

    busy = False

    def play(self, segment: object) -> None:
        return None

    async def clear(self) -> bool:
        return False


def make_calls(calls: int, silero: SileroSession,
               resampler: str = "soxr") -> list[tuple[TwilioStream, list[str]]]:
    cycle = script_payloads(FIXTURE, CYCLE_S)  # the capacity benchmark's script, as base64
    engines = Engines(stt=FixedStt("hello"), llm=InstantLlm("Okay."), tts=ToneTts(),  # type: ignore[arg-type]
                      vad=lambda: SileroVad(silero), stt_limiter=anyio.CapacityLimiter(1),
                      turn_model=None)
    config = ConversationConfig(greeting="", system_prompt="Be brief.", apology="Sorry.",
                                endpoint=EndpointConfig(resampler=resampler),  # type: ignore[arg-type]
                                idle_reprompt_s=1e9,
                                idle_hangup_s=1e9)
    out = []
    for call in range(calls):
        stream = TwilioStream(object(), None)  # type: ignore[arg-type]
        stream.state = StreamState.STARTED
        stream.stream_sid = stream._media_sid = f"MZ{call:032d}"
        sink = _Sink()
        stream.conversation = Conversation(CallInfo(f"CA{call:032d}", stream.stream_sid),
                                           engines, sink, EventBus(),  # type: ignore[arg-type]
                                           dataclasses.replace(config))
        offset = (call * 397) % len(cycle)  # each call at its own place in the cycle
        texts = [media_text(stream.stream_sid, i, cycle[(i + offset) % len(cycle)])
                 for i in range(2 * len(cycle))]
        out.append((stream, texts))
    return out


class _Conn:
    max_message_size = 1 << 20
    expect_continuation_frame = False


class ProtocolStub:
    """What `DirectTextProtocol._read_frames` reads of its protocol, for one call's
    connection, attached to `stream`'s direct path (and its quiet hold, with `hold`)."""

    close_sent = False
    conn = _Conn()
    _partial = b""

    def __init__(self, stream: TwilioStream, hold: bool) -> None:
        self.direct = DirectText(self)  # type: ignore[arg-type]
        self.direct.attach(stream._on_text)
        stream._direct = self.direct  # type: ignore[assignment]
        if hold:
            stream._attach_hold(stream.stream_sid)
            stream._arm(stream._hold)  # type: ignore[arg-type]

    read_frames = DirectTextProtocol._read_frames


def _masked(text: str) -> bytes:
    """`text` as a client's WebSocket frame (masked, as Twilio's are)."""
    payload = text.encode()
    mask = b"\x11\x22\x33\x44"
    n = len(payload)
    head = bytes((0x81, 0x80 | n)) if n < 126 else b"\x81\xfe" + n.to_bytes(2, "big")
    return head + mask + apply_mask(payload, mask)


def through_protocol(calls: list[tuple[TwilioStream, list[str]]], hold: bool
                     ) -> list[tuple[Any, list[bytes]]]:
    """Each call's frames as bytes off the socket, read by the server's protocol
    (`DirectTextProtocol._read_frames`, its C reader and, with `hold`, the quiet hold) and
    handed to the stream's direct path (`_on_text`). Actions are dropped here as elsewhere."""
    out = []
    for stream, texts in calls:
        def drop(pending: Any, *waiting: str, stream: TwilioStream = stream) -> None:
            pending.close()
            for text in waiting:
                stream._on_text(text)

        stream._begin_step = drop  # type: ignore[method-assign]
        protocol = ProtocolStub(stream, hold)
        out.append((protocol.read_frames, [_masked(text) for text in texts]))
    return out


def time_cycle(calls: list[tuple[Any, list[Any]]], second: bool) -> float:
    """CPU µs per frame over one 8 s cycle (the first or the second) of every call's frames,
    interleaved."""
    frames = len(calls[0][1]) // 2
    start = time.process_time()
    for index in range(frames * second, frames * (1 + second)):
        for take, texts in calls:
            take(texts[index])
    return (time.process_time() - start) / (frames * len(calls)) * 1e6


def by_kind(calls: list[tuple[TwilioStream, list[str]]]) -> dict[str, tuple[int, float]]:
    """The second cycle, each frame timed on its own and sorted by what it did: `held` (the
    conversation only held it: quiet, or waiting for the resampler's block), `release` (it
    released held frames: the listening path ran on a block) or `direct` (heard on its own).
    Kind → (frames, total µs). The clock around every frame adds a little to each."""
    frames = len(calls[0][1]) // 2
    clock = time.perf_counter
    out: dict[str, list[float]] = {"held": [0, 0.0], "release": [0, 0.0], "direct": [0, 0.0]}
    for index in range(frames, 2 * frames):
        for stream, texts in calls:
            held = stream.conversation._held  # type: ignore[union-attr]
            before = len(held)
            start = clock()
            stream._take(texts[index])
            took = clock() - start
            kind = ("held" if len(held) > before
                    else "release" if before and not held else "direct")
            out[kind][0] += 1
            out[kind][1] += took * 1e6
    return {kind: (int(n), total) for kind, (n, total) in out.items()}


def feed(calls: list[tuple[TwilioStream, list[str]]], through: str, hold: bool
         ) -> list[tuple[Any, list[Any]]]:
    if through == "protocol":
        return through_protocol(calls, hold)
    return [(stream._take, texts) for stream, texts in calls]


def print_by_kind(n: int, silero: SileroSession, resampler: str) -> None:
    calls = make_calls(n, silero, resampler)
    time_cycle(feed(calls, "stream", hold=False), second=False)  # warms up
    kinds = by_kind(calls)
    frames = sum(count for count, _ in kinds.values())
    total = sum(us for _, us in kinds.values())
    print(f"{n} calls, {frames} frames, {total / frames:.2f} µs per frame on average")
    print(f"{'kind':>8} {'share of frames':>16} {'µs each':>9} {'share of time':>14}")
    for kind, (count, us) in kinds.items():
        if count:
            print(f"{kind:>8} {count / frames:>15.1%} {us / count:>9.2f} {us / total:>13.1%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, nargs="+", default=[1, 20, 200])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--vad-kernel", choices=["native", "onnx"], default="native",
                        help="at 8 kHz, what runs Silero (VAD_KERNEL)")
    parser.add_argument("--vad-rate", type=int, choices=[8000, 16000], default=8000,
                        help="the VAD's sample rate (the VAD_RATE setting)")
    parser.add_argument("--resampler", choices=["soxr", "halfband"], default="soxr",
                        help="at --vad-rate 16000, 8 -> 16 kHz for the VAD (VAD_RESAMPLER)")
    parser.add_argument("--defer", choices=["on", "off", "both"], default="on",
                        help="frames waiting for the resampler's block (Conversation.hear): "
                             "as shipped, never (every frame heard one by one, bar the quiet "
                             "blocks), or both, alternated run by run in this process")
    parser.add_argument("--through", choices=["stream", "protocol"], default="stream",
                        help="what is timed: `TwilioStream._take` on each message's text, or "
                             "the server's protocol reading each frame's bytes "
                             "(`DirectTextProtocol._read_frames`) into the stream's direct path")
    parser.add_argument("--hold", choices=["on", "off", "both"], default="on",
                        help="with --through protocol: the quiet hold (quiet frames kept in C), "
                             "or every frame to the stream, or both alternated")
    parser.add_argument("--once", type=int, metavar="N",
                        help="N calls, their two cycles, no timing (for valgrind)")
    parser.add_argument("--by-kind", action="store_true",
                        help="each frame timed on its own, by what it did (held, released a "
                             "block, heard on its own): where a frame's time goes")
    args = parser.parse_args()
    warnings.simplefilter("ignore", RuntimeWarning)  # the actions' coroutines, never awaited
    silero = SileroSession(rate=args.vad_rate, native=args.vad_kernel == "native")
    if args.once is not None:
        calls = feed(make_calls(args.once, silero, args.resampler), args.through,
                     args.hold == "on")
        time_cycle(calls, second=False)
        time_cycle(calls, second=True)
        return
    if args.by_kind:
        for n in args.calls:
            print_by_kind(n, silero, args.resampler)
        return
    if args.through == "protocol":
        print(f"{'calls':>6} {'hold':>6} {'µs per frame (best)':>20} {'runs':>24}")
        holds = ["on", "off"] if args.hold == "both" else [args.hold]
        for n in args.calls:
            by_hold: dict[str, list[float]] = {mode: [] for mode in holds}
            for _ in range(args.repeats):
                for mode in holds:
                    calls = feed(make_calls(n, silero, args.resampler), "protocol", mode == "on")
                    time_cycle(calls, second=False)
                    by_hold[mode].append(time_cycle(calls, second=True))
            for mode, times in by_hold.items():
                print(f"{n:>6} {mode:>6} {min(times):>20.2f} "
                      f"{' '.join(f'{r:.2f}' for r in times):>24}", flush=True)
        return
    shipped = Conversation._may_defer
    modes = ["on", "off"] if args.defer == "both" else [args.defer]
    print(f"{'calls':>6} {'defer':>6} {'µs per frame (best)':>20} {'runs':>24}")
    for n in args.calls:
        runs: dict[str, list[float]] = {mode: [] for mode in modes}
        for _ in range(args.repeats):
            for mode in modes:
                Conversation._may_defer = (  # type: ignore[method-assign]
                    shipped if mode == "on" else lambda self, ulaw: False)
                calls = feed(make_calls(n, silero, args.resampler), "stream", False)
                time_cycle(calls, second=False)  # warms up (allocations, the first fits)
                runs[mode].append(time_cycle(calls, second=True))
        for mode, times in runs.items():
            print(f"{n:>6} {mode:>6} {min(times):>20.2f} "
                  f"{' '.join(f'{r:.2f}' for r in times):>24}", flush=True)
    Conversation._may_defer = shipped  # type: ignore[method-assign]


if __name__ == "__main__":
    main()
