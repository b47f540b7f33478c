"""Full-stack capacity: how many simultaneous calls the embedded models serve with V2V p95
under 2 s on this machine.

The server runs as `voicebot serve` would (a subprocess, the embedded defaults: faster-whisper
tiny.en, SmolLM2 via llama.cpp, Piper, Silero VAD), one fresh server per step. N simulated
Twilio callers (telephony.simulator, real-time pace) each say three things from
tests/fixtures and wait for the answers; their starts are spread over the first seconds, as
real calls would be. V2V is measured at the caller (end of its speech → first bot audio
received) and by the server (stored per turn, read back from /api/calls/{sid}), with the
server's parts (end-of-turn wait, STT, LLM first sentence, TTS first chunk) and what follows
the end-of-turn decision (V2V minus that wait: the part that load changes; the wait is the
turn detector's choice). Every turn's parts are in the JSON (`server_turns`). Steps 1, 2, 3, 4, 6, 8, stopping
after the first step whose client-measured V2V p95 is over `--limit-ms` (2000) unless
`--keep-going`.

    .venv/bin/python bench/capacity_full.py
    .venv/bin/python bench/capacity_full.py --steps 1 2 --turns open_hours.wav prices.wav
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from telephony.simulator import CallerTurn, SimulatedCaller  # noqa: E402
from voicebot.settings import Settings  # noqa: E402

FIXTURES = ROOT / "tests" / "fixtures"
DEFAULT_TURNS = ["open_hours.wav", "book_table.wav", "prices.wav"]
PARTS = ["v2v_ms", "endpoint_ms", "stt_ms", "stt_wait_ms", "llm_first_sentence_ms", "tts_first_chunk_ms",
         "overhead_ms"]


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process so far (from /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def spawn_server(port: int, workdir: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DATABASE_URL": f"sqlite:///{workdir}/calls.db",
           "DB_SPOOL_DIR": str(workdir / "spool"), "MAX_CONCURRENT_CALLS": "1000",
           "SHED_QUEUE_DEPTH": "0", "SHED_LOOP_BUSY": "0", "MAX_CALLS_PER_ADDRESS": "1000", "LOG_LEVEL": "WARNING"}
    # The embedded stack, whatever this shell points the server at.
    for key in ("REDIS_URL", "TWILIO_AUTH_TOKEN", "PUBLIC_URL", "LLM_PROVIDER", "LLM_BASE_URL",
                "LLM_API_KEY", "LLM_MODEL", "STT_PROVIDER", "STT_BASE_URL", "STT_MODEL",
                "STT_API_KEY", "TTS_ENGINE", "TTS_VOICE"):
        env.pop(key, None)
    with (workdir / "server.log").open("wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "voicebot.workers", "--port", str(port)], cwd=workdir,
            env=env, stdout=log, stderr=subprocess.STDOUT)


async def start_server(port: int, workdir: Path) -> subprocess.Popen[bytes]:
    process = await asyncio.to_thread(spawn_server, port, workdir)
    async with httpx.AsyncClient(timeout=2) as http:
        for _ in range(1200):
            if process.poll() is not None:
                raise RuntimeError(f"server exited; see {workdir / 'server.log'}")
            try:
                if (await http.get(f"http://127.0.0.1:{port}/readyz")).status_code == 200:
                    return process
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError("server not ready after 120 s")


async def one_call(base: str, turns: list[str], delay_s: float) -> SimulatedCaller:
    await asyncio.sleep(delay_s)
    caller = SimulatedCaller(base.replace("http://", "ws://") + "/twilio/media", pace=1.0)
    await caller.run([CallerTurn(wav=str(FIXTURES / name)) for name in turns])
    return caller


async def run_step(n: int, args: argparse.Namespace) -> dict[str, object]:
    from bench.capacity_media import wait_quiet

    background = await asyncio.to_thread(wait_quiet, args.max_background, args.wait_quiet_s)
    workdir = ROOT / "build" / f"capacity-full-{n}"
    workdir.mkdir(parents=True, exist_ok=True)
    for stale in workdir.glob("calls.db*"):
        stale.unlink()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = await start_server(port, workdir)
    try:
        cpu0, t0 = cpu_seconds(server.pid), time.monotonic()
        delays = sorted(random.uniform(0, args.spread_s) for _ in range(n))
        callers = await asyncio.gather(*(one_call(base, args.turns, d) for d in delays))
        elapsed, cpu = time.monotonic() - t0, cpu_seconds(server.pid) - cpu0
        await asyncio.sleep(1.0)  # the recorder writes the last turns
        client: list[float] = []
        unanswered = 0
        per_turn: list[dict[str, object]] = []  # every turn's parts, to see what the tail is
        async with httpx.AsyncClient(base_url=base, timeout=10) as http:
            for caller in callers:
                for turn in caller.result.turns:
                    if turn.latency_ms is None:
                        unanswered += 1
                    else:
                        client.append(turn.latency_ms)
                detail = (await http.get(f"/api/calls/{caller.call_sid}")).json()
                for metric in detail.get("metrics", []):
                    per_turn.append({"call": caller.call_sid, "turn": metric.get("turn"),
                                     **{part: metric.get(part) for part in PARTS}})
    finally:
        server.terminate()
        server.wait(timeout=60)
    p95 = percentile(client, 0.95)
    row: dict[str, object] = {
        "calls": n, "turns": len(client) + unanswered, "unanswered": unanswered,
        "client_v2v_p50_ms": percentile(client, 0.5), "client_v2v_p95_ms": p95,
        "client_v2v_max_ms": max(client, default=None),
        "server_cpu_pct": round(100 * cpu / elapsed, 1),
        "background_cpus": background,
    }
    numbers = [{part: float(value) for part, value in turn.items()  # type: ignore[arg-type]
                if part in PARTS and isinstance(value, int | float)} for turn in per_turn]
    for part in PARTS:
        row[f"{part.removesuffix('_ms')}_p95_ms"] = percentile(
            [turn[part] for turn in numbers if part in turn], 0.95)
    # What load changes: from the end-of-turn decision to the first audio (V2V minus the
    # end-of-turn wait, which is the turn detector's choice and the same at any load).
    row["after_eot_p95_ms"] = percentile([turn["v2v_ms"] - turn["endpoint_ms"] for turn in numbers
                                          if "v2v_ms" in turn and "endpoint_ms" in turn], 0.95)
    row["ok"] = unanswered == 0 and p95 is not None and p95 < args.limit_ms
    row["server_turns"] = per_turn
    return row


COLUMNS = [("calls", "N", 4), ("turns", "turns", 6), ("client_v2v_p50_ms", "v2v p50", 8),
           ("client_v2v_p95_ms", "v2v p95", 8), ("v2v_p95_ms", "srv p95", 8),
           ("endpoint_p95_ms", "eot p95", 8), ("after_eot_p95_ms", "rest p95", 8),
           ("stt_p95_ms", "stt p95", 8), ("llm_first_sentence_p95_ms", "llm p95", 8),
           ("tts_first_chunk_p95_ms", "tts p95", 8), ("overhead_p95_ms", "own p95", 8),
           ("server_cpu_pct", "cpu %", 6), ("background_cpus", "bg cpu", 6), ("ok", "ok", 5)]


def cell(value: object, width: int) -> str:
    if isinstance(value, float):
        return f"{value:>{width}.0f}"
    return f"{value!s:>{width}}"


async def main_async(args: argparse.Namespace) -> dict[str, object]:
    print(f"embedded models; {os.cpu_count()} CPUs; turns {args.turns}; "
          f"pass: caller-measured V2V p95 < {args.limit_ms:.0f} ms", flush=True)
    print(" ".join(f"{title:>{width}}" for _, title, width in COLUMNS), flush=True)
    rows = []
    for n in args.steps:
        row = await run_step(n, args)
        rows.append(row)
        print(" ".join(cell(row.get(key), width) for key, _, width in COLUMNS), flush=True)
        if not row["ok"] and not args.keep_going:
            break
    best = max((int(r["calls"]) for r in rows if r["ok"]), default=0)  # type: ignore[call-overload]
    print(f"\nlargest N with V2V p95 under {args.limit_ms:.0f} ms: {best}")
    return {"when": time.strftime("%Y-%m-%dT%H:%M:%S"), "machine": platform.platform(),
            "cpus": os.cpu_count(), "load_average_before": os.getloadavg(),
            "turns": args.turns, "limit_ms": args.limit_ms, "largest_passing_n": best,
            # The server's settings that the bench leaves to the environment and that move V2V.
            "settings": {name.upper(): os.environ.get(name.upper(),
                                                      str(Settings.model_fields[name].default))
                         for name in ("prepare_lead_ms", "llm_local_parallel", "vad_resampler")},
            "steps": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 2, 3, 4, 6, 8])
    parser.add_argument("--turns", nargs="+", default=DEFAULT_TURNS)
    parser.add_argument("--limit-ms", type=float, default=2000.0)
    parser.add_argument("--spread-s", type=float, default=4.0,
                        help="call starts are spread at random over this many seconds")
    parser.add_argument("--keep-going", action="store_true")
    parser.add_argument("--max-background", type=float, default=0.3,
                        help="before a step, wait until other processes use fewer CPUs")
    parser.add_argument("--wait-quiet-s", type=float, default=180.0)
    parser.add_argument("--json", default=str(ROOT / "bench" / "results" / "capacity_full.json"))
    args = parser.parse_args()
    report = asyncio.run(main_async(args))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
