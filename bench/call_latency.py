"""Voice-to-voice latency of simulated calls, end to end, on real models.

Runs simulated Twilio calls (real-time pace) against a running server, or against the app
started in-process on the embedded defaults, and prints per-turn numbers and p50/p95 of:
greeting latency, V2V as the simulated caller measured it (end of its speech → first bot
audio received), and the server's own breakdown (endpointing wait, STT wait after the
endpoint, STT compute, LLM first token / first sentence, TTS first chunk, own overhead).

    .venv/bin/python bench/call_latency.py --calls 5
    .venv/bin/python bench/call_latency.py --url http://127.0.0.1:8000 --calls 5

The server's numbers for a caller turn are those of the server turn that answered it: the
last caller utterance the server stored that began while the caller was speaking that turn
(wall clock: the server runs on this machine). So a turn the server heard as two (it replied
to "Great." before the rest came) is matched to its second part, the one the caller's V2V
runs to, and the turns after it stay matched; a caller turn the server stored nothing for
shows none ("server_turn" null in the JSON).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import statistics
import sys
import time
from collections.abc import AsyncIterator, Sequence
from datetime import datetime
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from telephony.simulator import CallerTurn, SimulatedCaller, TurnResult  # noqa: E402

FIXTURES = ROOT / "tests" / "fixtures"
DEFAULT_WAVS = ["open_hours.wav", "book_table.wav", "prices.wav", "goodbye.wav"]
PARTS = ["endpoint_ms", "stt_wait_ms", "stt_ms", "llm_first_token_ms", "llm_first_sentence_ms",
         "tts_first_chunk_ms", "overhead_ms", "v2v_ms"]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


def server_turns(turns: Sequence[TurnResult], utterances: Sequence[dict[str, object]],
                 wall_minus_monotonic: float) -> list[int | None]:
    """For each caller turn (the simulator's monotonic clock), the number of the server turn
    that answered it: the last caller utterance the server heard begin between the turn's
    first voiced frame (less 0.2 s of slack) and 0.3 s after its last (a window is heard when
    the frame that completes it arrives), or None."""
    heard = [(datetime.fromisoformat(str(u["started_at"])).timestamp(), int(u["turn"]))  # type: ignore[call-overload]
             for u in utterances if u.get("role") == "caller"]
    out: list[int | None] = []
    for turn in turns:
        start = turn.speech_started_at + wall_minus_monotonic - 0.2
        end = turn.speech_ended_at + wall_minus_monotonic + 0.3
        inside = [number for at, number in heard if start <= at <= end]
        out.append(inside[-1] if inside else None)
    return out


@contextlib.asynccontextmanager
async def target(url: str | None) -> AsyncIterator[str]:
    if url:
        yield url.rstrip("/")
        return
    from voicebot.app import create_app
    from voicebot.local_server import running_server
    from voicebot.settings import load_settings

    settings = load_settings(database_url=f"sqlite:///{ROOT}/build/bench-latency.db")
    async with running_server(create_app(settings)) as base:
        yield base


async def run(args: argparse.Namespace) -> dict[str, object]:
    rows: list[dict[str, object]] = []
    greetings: list[float] = []
    client_v2v: list[float] = []
    async with target(args.url) as base, httpx.AsyncClient(base_url=base, timeout=10) as http:
        media_url = base.replace("http://", "ws://").replace("https://", "wss://")
        media_url += "/twilio/media"
        for n in range(args.calls):
            caller = SimulatedCaller(media_url, pace=args.pace)
            turns = [CallerTurn(wav=str(FIXTURES / w)) for w in args.wavs]
            wall_minus_monotonic = time.time() - time.monotonic()
            result = await caller.run(turns)
            if result.greeting_latency_ms is not None:
                greetings.append(result.greeting_latency_ms)
            await asyncio.sleep(0.5)  # let the recorder write the last turn
            detail = (await http.get(f"/api/calls/{caller.call_sid}")).json()
            metrics = {m["turn"]: m for m in detail.get("metrics", [])}
            utterances = detail.get("utterances", [])
            caller_texts = [u["text"] for u in utterances if u["role"] == "caller"]
            matched = server_turns(result.turns, utterances, wall_minus_monotonic)
            for index, (turn, number) in enumerate(zip(result.turns, matched, strict=True),
                                                   start=1):
                server = metrics.get(number, {}) if number is not None else {}
                row = {"call": n, "turn": index, "server_turn": number, "wav": turn.label,
                       "client_v2v_ms": turn.latency_ms,
                       **{part: server.get(part) for part in PARTS}}
                rows.append(row)
                if turn.latency_ms is not None:
                    client_v2v.append(turn.latency_ms)
                print(f"call {n} turn {index} {turn.label:16s} client v2v "
                      f"{turn.latency_ms or float('nan'):7.0f} ms | server v2v "
                      f"{server.get('v2v_ms') or float('nan'):7.0f} | endpoint "
                      f"{server.get('endpoint_ms') or float('nan'):5.0f} | stt wait "
                      f"{server.get('stt_wait_ms') or float('nan'):5.0f} | llm 1st sentence "
                      f"{server.get('llm_first_sentence_ms') or float('nan'):5.0f} | tts "
                      f"{server.get('tts_first_chunk_ms') or float('nan'):5.0f} | overhead "
                      f"{server.get('overhead_ms') or float('nan'):5.1f}")
            print(f"  heard: {caller_texts}")
    summary: dict[str, dict[str, float]] = {}
    series = {"greeting_ms": greetings, "client_v2v_ms": client_v2v}
    for part in PARTS:
        series[part] = [r[part] for r in rows if isinstance(r.get(part), int | float)]
    print()
    print(f"{'metric':24s} {'p50':>8s} {'p95':>8s} {'n':>4s}")
    for name, values in series.items():
        if not values:
            continue
        summary[name] = {"p50": statistics.median(values), "p95": percentile(values, 0.95),
                         "n": len(values)}
        print(f"{name:24s} {summary[name]['p50']:8.1f} {summary[name]['p95']:8.1f} "
              f"{len(values):4d}")
    return {"when": time.strftime("%Y-%m-%dT%H:%M:%S"), "pace": args.pace, "calls": args.calls,
            "wavs": args.wavs, "summary": summary, "turns": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="http://host:port of a running server (default: in-process)")
    parser.add_argument("--calls", type=int, default=5)
    parser.add_argument("--pace", type=float, default=1.0)
    parser.add_argument("--wavs", nargs="+", default=DEFAULT_WAVS)
    parser.add_argument("--json", default=str(ROOT / "bench" / "results" / "call_latency.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    (ROOT / "build").mkdir(exist_ok=True)
    report = asyncio.run(run(args))
    Path(args.json).write_text(json.dumps(report, indent=2))
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
