"""Media-path capacity: how many simultaneous calls one server process carries in real time.

N simulated calls stream real-time audio at once (a caller utterance every 8 s, real Silero
VAD on it) against the real app, whose STT, LLM and TTS are instant test doubles (a fixed
transcript, a fixed reply, a tone), so the numbers measure the server itself: WebSocket and
JSON handling, μ-law decoding, resampling, VAD, turn-taking, outbound pacing with marks, the
event bus and the database writes. The server runs in its own process (`--serve`); the load
comes from `bench/media_load.py` in another process (a raw-socket client, cheap per frame).

For each N (10, 25, 50, 100, 200, 300, 500, ... until a step fails) it reports, over a steady
window after the ramp-up:

- server CPU per call: ms of server-process CPU per second of call audio (getrusage);
- inbound frame lag p99: how far behind its media timestamp a frame was when the server had
  processed it (per call, relative to that call's best frame), measured inside the server;
- outbound pacing jitter p99: how far each reply chunk's arrival strayed from real-time
  playback, at the caller;
- dropped frames (sent, never processed), late inbound frames (lag over `--late-ms`) and
  outbound underruns (the caller's buffer ran dry in the middle of a reply: a gap).

A step passes with zero dropped, late and underrun frames. The table goes to stdout, the JSON
to bench/results/capacity_media.json.

    .venv/bin/python bench/capacity_media.py                  # 10, 25, 50, ... until failure
    .venv/bin/python bench/capacity_media.py --steps 50 100 --duration 20
    .venv/bin/python bench/capacity_media.py --noise-dbfs -45      # hiss: the VAD scores all
    .venv/bin/python bench/capacity_media.py --speech-every-s 0    # silence: no turns at all
    .venv/bin/python bench/capacity_media.py --reply "Sure."       # the bot says one word

With `--shed-loop-busy SHARE` the workers shed new calls as `SHED_LOOP_BUSY` makes them (off by
default here, so that a step measures what the server carries): refused calls count against
the step (`connected` < N), and CPU per call-second is over the calls taken. `--ramp-per-s`
sets how fast calls connect before the window (100 a second by default).

Before each run, the machine's speed of the moment is taken with `bench/frame_path.py --calls
200 --repeats 1 --vad-kernel onnx` (about 8 s; `--no-reference` skips it): the in-process media path's µs per
frame, reported as `reference_us_per_frame` ("ref µs"). Virtual machines here have differed
by a third in speed, and one machine has drifted by as much between two runs; the reference
says which runs can be compared.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.capacity_server import merge  # noqa: E402
from bench.media_load import CALLER_WAV, script_payloads  # noqa: E402
from bench.vad_model import cpu_model  # noqa: E402

DEFAULT_STEPS = [10, 25, 50, 100, 200, 300, 500, 750, 1000]
REPLY = "Sure, a table for two tonight. What time would you like?"
TRANSCRIPT = "I would like a table for two tonight please"


# -- the server process -----------------------------------------------------------------------

def serve(port: int, workers: int, profile: str | None) -> None:
    """`--serve`: the real app (bench.capacity_server) in 1..N worker processes."""
    import logging

    from voicebot.workers import serve as serve_workers

    logging.basicConfig(level=logging.WARNING)
    def run() -> None:
        database_url = os.environ["BENCH_DATABASE_URL"]
        if not database_url.startswith("sqlite"):
            # As a deployment's release step (`voicebot db upgrade`): the server migrates only
            # the embedded SQLite itself, and every write to a bare database would fail.
            from db.migrate import upgrade_to_head

            upgrade_to_head(database_url)
        serve_workers(host="127.0.0.1", port=port, workers=workers, grace_s=5.0,
                      log_level="warning", ws_max_size=1 << 16,
                      factory="bench.capacity_server:app_from_env",
                      sqlite_url=database_url if database_url.startswith("sqlite") else None)

    if profile and workers == 1:
        import cProfile
        import signal

        # The server exits on SIGTERM after draining; exit through SystemExit so cProfile
        # writes its file.
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        cProfile.runctx("run()", globals(), {"run": run}, profile)
    else:
        run()


# -- the driver ------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_ready(port: int, process: subprocess.Popen[bytes], within_s: float = 60) -> None:
    import httpx

    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError("bench server exited at start-up")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError("bench server not ready")


def busy_cpus(sample_s: float = 2.0) -> float:
    """How many CPUs other processes keep busy (from /proc/stat), sampled over `sample_s`."""

    def read() -> tuple[int, int]:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
        idle = fields[3] + fields[4]
        return sum(fields) - idle, sum(fields)

    busy0, total0 = read()
    time.sleep(sample_s)
    busy1, total1 = read()
    return round((os.cpu_count() or 1) * (busy1 - busy0) / max(1, total1 - total0), 2)


def wait_quiet(max_busy: float, max_wait_s: float) -> float:
    """Wait (up to `max_wait_s`) until the machine is nearly idle; returns the busy CPUs seen."""
    deadline = time.monotonic() + max_wait_s
    busy = busy_cpus()
    while busy > max_busy and time.monotonic() < deadline:
        busy = busy_cpus()
    return busy


def run_step(n: int, args: argparse.Namespace) -> dict[str, object]:
    background = wait_quiet(args.max_background, args.wait_quiet_s)

    port = free_port()
    build = ROOT / "build"
    build.mkdir(exist_ok=True)
    db = build / f"bench-capacity-{n}.db"
    for path in (db, Path(f"{db}-wal"), Path(f"{db}-shm")):
        path.unlink(missing_ok=True)
    database_url = args.database_url or f"sqlite:///{db}"
    stats_dir = Path(tempfile.mkdtemp(prefix="bench-capacity-"))
    server_cmd = [sys.executable, __file__, "--serve", "--port", str(port),
                  "--workers", str(args.workers)]
    if args.profile:
        server_cmd += ["--profile-out", str(build / f"capacity-{n}.prof")]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "BENCH_DIR": str(stats_dir),
           "BENCH_DATABASE_URL": database_url, "BENCH_VAD": args.vad,
           "BENCH_LATE_MS": str(args.late_ms), "BENCH_RECORD": "0" if args.no_db else "1",
           "BENCH_REPLY": args.reply, "BENCH_TRANSCRIPT": TRANSCRIPT,
           "BENCH_STALL_MS": str(args.stalls or 0),
           "BENCH_GC_THRESHOLD0": str(args.gc_threshold0 or ""),
           "BENCH_GC_THRESHOLD2": str(args.gc_threshold2 or ""),
           "BENCH_SHED_LOOP_BUSY": str(args.shed_loop_busy or 0)}
    server = subprocess.Popen(server_cmd, cwd=build, env=env)
    try:
        wait_ready(port, server)
        ramp_s = max(3.0, n / args.ramp_per_s)  # --ramp-per-s calls a second (3 s at least)
        load_cmd = [sys.executable, str(ROOT / "bench" / "media_load.py"),
                    "--url", f"ws://127.0.0.1:{port}/twilio/media",
                    "--duration", str(args.duration), "--ramp-s", str(ramp_s),
                    "--settle-s", str(args.settle_s),
                    "--speech-every-s", str(args.speech_every_s),
                    *(["--noise-dbfs", str(args.noise_dbfs)] if args.noise_dbfs is not None else [])]
        generators = max(1, min(args.generators, n // 50 or 1))
        per = [n // generators + (1 if i < n % generators else 0) for i in range(generators)]
        if args.generator == "c":
            payload_file = stats_dir / "payloads.txt"
            payload_file.write_text("\n".join(script_payloads(
                CALLER_WAV, args.speech_every_s, args.noise_dbfs)) + "\n")
            commands = [[str(c_generator()), "127.0.0.1", str(port), "/twilio/media", str(k),
                         str(args.duration), str(ramp_s), str(args.settle_s),
                         str(payload_file), str(stats_dir) if i == 0 else "-"]
                        for i, k in enumerate(per)]
        else:
            marks = ["--stats-dir", str(stats_dir)]
            commands = [[*load_cmd, "--calls", str(k), *(marks if i == 0 else [])]
                        for i, k in enumerate(per)]
        procs = [subprocess.Popen(command, stdout=subprocess.PIPE, env=env)
                 for command in commands]
        recorder = PerfRecorder(server.pid, stats_dir, build / f"perf-{n}.data", args.duration
                                ) if args.perf else None
        outputs = [json.loads(p.communicate(timeout=args.duration + 120)[0]) for p in procs]
        perf = recorder.report() if recorder is not None else None
        time.sleep(2.0)  # the server finishes the calls it was sent `stop` for
        window = merge(read_snapshots(stats_dir, "*.final.json"))
        final = merge(read_snapshots(stats_dir, "[0-9]*[0-9].json"))
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        for stalls in stats_dir.glob("*.stalls.txt"):
            shutil.copy(stalls, build / f"stalls-{n}-{stalls.name}")
            print(f"loop stalls: {build / f'stalls-{n}-{stalls.name}'}", flush=True)
        shutil.rmtree(stats_dir, ignore_errors=True)
    row = summarize(n, outputs, window, final)
    row["background_cpus"] = background
    if perf is not None:
        row["perf_cpu_by_object_pct"] = perf
    return row


class PerfRecorder:
    """`--perf`: samples the server's processes with Linux `perf` over the steady window, and
    reports where their CPU went by shared object (the interpreter, onnxruntime, numpy, the
    kernel, ...): a view cProfile cannot give, since it sees Python calls only and slows them."""

    def __init__(self, server_pid: int, stats_dir: Path, out: Path, seconds: float) -> None:
        if shutil.which("perf") is None:
            raise SystemExit("--perf needs Linux perf (apt-get install linux-perf)")
        self.out = out
        self._thread = threading.Thread(target=self._record,
                                        args=(server_pid, stats_dir, seconds), daemon=True)
        self._thread.start()

    def _record(self, server_pid: int, stats_dir: Path, seconds: float) -> None:
        deadline = time.monotonic() + 300
        while not (stats_dir / "reset").exists() and time.monotonic() < deadline:
            time.sleep(0.05)  # the window starts after the ramp-up
        children = Path(f"/proc/{server_pid}/task/{server_pid}/children")
        pids = [server_pid, *(int(p) for p in children.read_text().split())]  # the workers
        subprocess.run(["perf", "record", "-q", "-F", "499", "-o", str(self.out),
                        "-p", ",".join(map(str, pids)), "--", "sleep", str(seconds)],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)

    def report(self) -> dict[str, float]:
        self._thread.join()
        text = subprocess.run(["perf", "report", "-i", str(self.out), "--stdio", "--sort", "dso",
                               "-g", "none", "--percent-limit", "0.5"],
                              capture_output=True, text=True, check=False).stdout
        shares: dict[str, float] = {}
        for line in text.splitlines():
            fields = line.split()
            if len(fields) == 2 and fields[0].endswith("%") and not line.startswith("#"):
                shares[fields[1]] = float(fields[0].rstrip("%"))
        return shares


def c_generator() -> Path:
    """bench/media_load.c, built into build/ when missing or older than its source."""
    source = ROOT / "bench" / "media_load.c"
    binary = ROOT / "build" / "media_load_c"
    if not binary.exists() or binary.stat().st_mtime < source.stat().st_mtime:
        binary.parent.mkdir(exist_ok=True)
        subprocess.run(["cc", "-O2", "-o", str(binary), str(source), "-lm"], check=True)
    return binary


def read_snapshots(directory: Path, pattern: str) -> list[dict]:  # type: ignore[type-arg]
    return [json.loads(path.read_text()) for path in sorted(directory.glob(pattern))]


def summarize(n: int, outputs: list[dict], window: dict, final: dict) -> dict:  # type: ignore[type-arg]
    total = {key: sum(o[key] or 0 for o in outputs)
             for key in ("calls", "refused", "closed_early", "frames_sent", "late_sends",
                         "media_in", "replies", "marks_echoed", "clears", "underruns")}
    jitter_p99 = max((o["jitter_p99_ms"] or 0.0) for o in outputs)
    window_s = float(window.get("window_s") or outputs[0]["window_s"] or 1.0)
    if not window.get("workers"):
        raise RuntimeError("the bench server wrote no numbers for the window")
    connected = total["calls"] - total["refused"]
    audio_s = max(1, connected) * window_s  # the calls the server took (--shed-loop-busy)
    dropped = total["frames_sent"] - int(final["frames_total"])
    late = int(window["late_frames"])
    result = {
        "calls": n,
        "connected": connected,
        "cpu_ms_per_call_s": round(float(window["cpu_s"]) * 1000 / audio_s, 2),
        "server_cpu_pct": round(100 * float(window["cpu_s"]) / window_s, 1),
        "frame_lag_p50_ms": window["lag_p50_ms"],
        "frame_lag_p99_ms": window["lag_p99_ms"],
        "frame_lag_max_ms": window["lag_max_ms"],
        "loop_lag_p99_ms": window["loop_lag_p99_ms"],
        "frame_work_us": window["frame_work_us"],
        "frame_work_max_ms": window["frame_work_max_ms"],
        "slow_frames": window["slow_frames"],
        "gc_ms": window.get("gc_ms"),
        "gc_max_ms": window.get("gc_max_ms"),
        "jitter_p99_ms": round(jitter_p99, 1),
        "dropped": dropped,
        "late": late,
        # Before the window (calls connecting at 100 a second, their greetings): not part of
        # the pass/fail, reported so that the ramp's cost stays visible.
        "ramp_late_frames": window.get("before_late_frames"),
        "ramp_lag_max_ms": window.get("before_lag_max_ms"),
        "ramp_underruns": sum(int(o.get("ramp_underruns") or 0) for o in outputs),
        "underruns": total["underruns"],
        "generator_late_sends": total["late_sends"],
        # The latest the generator sent a frame in the window: a frame it sent late arrives
        # late, and the server's lag above counts that too.
        "generator_send_lag_max_ms": max(float(o.get("send_lag_max_ms") or 0.0) for o in outputs),
        "loop_lag_max_ms": window.get("loop_lag_max_ms"),
        # Whole run (ramp-up and ending included): the load shares the machine's CPUs.
        "generator_cpu_s": round(sum(float(o.get("generator_cpu_s") or 0.0) for o in outputs), 1),
        "closed_early": total["closed_early"],
        "replies": total["replies"],
        "cpu_s_per_worker": window.get("cpu_s_per_worker"),
        "frames_per_worker": window.get("frames_per_worker"),  # ∝ calls per worker
        # Of the window's frames, those the quiet hold kept in C (`TwilioStream`).
        "held_frames": window.get("held_frames"),
        # Per worker: collections by generation ([count, longest ms]) in the window, and the
        # objects the cyclic collector tracks at its end (per generation), with the most
        # common types in the oldest (what a full collection walks).
        "gc_runs_per_worker": window.get("gc_runs_per_worker"),
        "gc_tracked_per_worker": window.get("gc_tracked_per_worker"),
        "gc_old_types_per_worker": window.get("gc_old_types_per_worker"),
        # Seconds each worker's event-loop thread waited for a CPU while it had work (the
        # machine's other processes, the load generator included, had the cores).
        "runqueue_wait_s_per_worker": window.get("runqueue_wait_s_per_worker"),
        "loop_busy_p50_max_per_worker": window.get("loop_busy_p50_max_per_worker"),
        "window_s": window_s,
    }
    result["ok"] = (total["frames_sent"] > 0 and dropped == 0 and late == 0 and total["underruns"] == 0
                    and total["closed_early"] == 0 and result["connected"] == n)
    return result


COLUMNS = [("calls", "N", 5), ("connected", "took", 5), ("cpu_ms_per_call_s", "cpu ms/s", 9),
           ("server_cpu_pct", "cpu %", 6), ("frame_lag_p99_ms", "lag p99", 8),
           ("frame_lag_max_ms", "lag max", 8), ("loop_lag_max_ms", "loop max", 8),
           ("frame_work_us", "µs/frame", 8), ("jitter_p99_ms", "jit p99", 8),
           ("dropped", "drop", 5), ("late", "late", 5), ("underruns", "gaps", 5),
           ("ramp_late_frames", "ramp late", 9),
           ("generator_send_lag_max_ms", "gen lag", 8), ("background_cpus", "bg cpu", 6),
           ("reference_us_per_frame", "ref µs", 6), ("ok", "ok", 4)]


def reference_us_per_frame() -> float | None:
    """The machine's speed now: `bench/frame_path.py`'s µs per frame for 200 calls (one run,
    in a process of its own, before the server starts); None if it could not run. Silero runs
    in ONNX Runtime there (`--vad-kernel onnx`), as it did for every reference before the
    compiled forward pass, so references stay comparable across sessions."""
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "frame_path.py"), "--calls",
                           "200", "--repeats", "1", "--vad-kernel", "onnx"],
                          capture_output=True, text=True,
                          timeout=300, check=False)
    try:
        return float(done.stdout.strip().splitlines()[-1].split()[2])
    except (IndexError, ValueError):
        print(f"reference run failed: {done.stderr.strip()[-300:]}", file=sys.stderr)
        return None


def print_row(row: dict) -> None:  # type: ignore[type-arg]
    print(" ".join(f"{row.get(key)!s:>{width}}" for key, _, width in COLUMNS), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--profile", action="store_true",
                        help="cProfile the server's main thread into build/capacity-N.prof")
    parser.add_argument("--profile-out", help=argparse.SUPPRESS)
    parser.add_argument("--settle-s", type=float, default=4.0,
                        help="seconds between the ramp-up and the window, for the last calls' "
                             "greetings; what went late before the window is reported apart "
                             "(ramp_late_frames)")
    parser.add_argument("--gc-threshold0", type=int, metavar="N",
                        help="the workers' young-generation GC threshold (Python's is 700): "
                             "to see what the collector's pauses cost")
    parser.add_argument("--gc-threshold2", type=int, metavar="N",
                        help="the cyclic collector's third threshold in the workers (young "
                             "collections between full ones; 10 by default): how often a "
                             "full collection may stop a worker's loop")
    parser.add_argument("--stalls", type=float, metavar="MS",
                        help="when a worker's event loop has not come round for MS ms, write "
                             "every thread's stack to build/stalls-N-<pid>.stalls.txt")
    parser.add_argument("--perf", action="store_true",
                        help="sample the server with Linux perf over the window: its CPU by "
                             "shared object (interpreter, onnxruntime, kernel, ...)")
    parser.add_argument("--shed-loop-busy", type=float, metavar="SHARE",
                        help="the workers refuse a new call when it would keep their event "
                             "loop SHARE of a core busy (SHED_LOOP_BUSY; default: never)")
    parser.add_argument("--ramp-per-s", type=float, default=100.0,
                        help="calls connecting per second before the window (default 100)")
    parser.add_argument("--steps", type=int, nargs="+", default=DEFAULT_STEPS)
    parser.add_argument("--duration", type=float, default=20.0, help="steady window, s")
    parser.add_argument("--late-ms", type=float, default=60.0,
                        help="an inbound frame processed later than this is late")
    parser.add_argument("--speech-every-s", type=float, default=8.0,
                        help="each call says a sentence this often (0: silence only)")
    parser.add_argument("--reply", default=REPLY,
                        help="what the bot says every turn (the tone double: 60 ms of audio "
                             "a character, a sentence at a time); default: 3.3 s in two "
                             "sentences")
    parser.add_argument("--noise-dbfs", type=float,
                        help="line hiss at this level on every call (-45: the VAD model "
                             "scores every window); default digital silence between sentences")
    parser.add_argument("--vad", choices=["silero", "energy"], default="silero")
    parser.add_argument("--generators", type=int, default=1, help="load processes")
    parser.add_argument("--generator", choices=("python", "c"), default="python",
                        help="the load generator: bench/media_load.py, or bench/media_load.c "
                             "(the same calls for a fraction of the CPU; built with cc)")
    parser.add_argument("--database-url",
                        help="default: a fresh SQLite file per step; another database (PostgreSQL)"
                             " is brought to the newest schema first, as `voicebot db upgrade`"
                             " does")
    parser.add_argument("--no-db", action="store_true",
                        help="do not store calls (to see what the database writes cost)")
    parser.add_argument("--workers", type=int, default=1, help="server worker processes")
    parser.add_argument("--max-background", type=float, default=0.3,
                        help="before a step, wait until other processes use fewer CPUs")
    parser.add_argument("--wait-quiet-s", type=float, default=120.0)
    parser.add_argument("--keep-going", action="store_true", help="run every step")
    parser.add_argument("--no-reference", action="store_true",
                        help="do not take the machine's speed (bench/frame_path.py) before "
                             "each run")
    parser.add_argument("--repeat", type=int, default=1,
                        help="runs per step; a step passes when all of them do")
    parser.add_argument("--json", default=str(ROOT / "bench" / "results" /
                                              "capacity_media.json"))
    args = parser.parse_args()
    if args.serve:
        serve(args.port, args.workers, args.profile_out)
        return
    print(f"server: {args.workers} worker(s); load: {args.generators} process(es); "
          f"{os.cpu_count()} CPUs; "
          f"VAD {args.vad}; window {args.duration:.0f} s; late > {args.late_ms:.0f} ms")
    print(" ".join(f"{title:>{width}}" for _, title, width in COLUMNS))
    rows = []
    verdicts: dict[int, bool] = {}
    for n in args.steps:
        runs = []
        for _ in range(args.repeat):
            reference = None if args.no_reference else reference_us_per_frame()
            row = run_step(n, args)
            row["reference_us_per_frame"] = reference
            runs.append(row)
            print_row(row)
            for name, share in (row.get("perf_cpu_by_object_pct") or {}).items():
                print(f"{'':>7}{share:6.1f} %  {name}")
        rows.extend(runs)
        passed = sum(1 for r in runs if r["ok"])
        # A step passes when every run of it does: one run at the edge passes or fails with
        # the machine's noise.
        verdicts[n] = verdicts.get(n, True) and passed == len(runs)
        if args.repeat > 1:
            print(f"{'':>7}{n} calls: {passed} of {len(runs)} runs passed", flush=True)
        if not verdicts[n] and not args.keep_going:
            break
    passing = [n for n, ok in verdicts.items() if ok]
    best = max(passing) if passing else 0
    print(f"\nlargest N with no dropped, late or gapped frames"
          f"{' in every run' if args.repeat > 1 else ''}: {best}")
    report = {"when": time.strftime("%Y-%m-%dT%H:%M:%S"), "machine": platform.platform(),
              "cpu_model": cpu_model(), "cpus": os.cpu_count(), "load_average_before": os.getloadavg(),
              "vad": args.vad, "workers": args.workers, "store_calls": not args.no_db,
              "generator": args.generator, "reply": args.reply, "window_s": args.duration, "settle_s": args.settle_s,
              "late_ms": args.late_ms,
              "repeat": args.repeat, "largest_passing_n": best, "steps": rows}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
