"""The capacity benchmark's server: the real app with instant engines, instrumented.

Engines are test doubles that are honest about it (a fixed transcript, a fixed reply streamed
word by word, `ToneTts`), so what is left is the server's own work per call. Every inbound
media frame's lag is measured where it is processed: `TwilioStream` is replaced (in
`voicebot.media_endpoint`, for this process only) by a subclass that times `_dispatch` (a frame's synchronous work) and
compares the moment a frame was processed with its media timestamp.

Every worker process reports through files in `BENCH_DIR`, so several workers sharing one
socket can be measured together: a worker resets its counters when `reset` changes, writes
`<pid>.json` twice a second, and `<pid>.final.json` when `end` changes (the end of the
window). Configured by environment (the factory `app_from_env` runs in each worker):
BENCH_DIR, BENCH_DATABASE_URL, BENCH_VAD (silero|energy), BENCH_LATE_MS, BENCH_RECORD (0: do
not store calls), BENCH_REPLY, BENCH_TRANSCRIPT, BENCH_STALL_MS, BENCH_GC_THRESHOLD0,
BENCH_GC_THRESHOLD2.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gc
import json
import os
import resource
import statistics
import sys
import threading
import time
import traceback
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import anyio
from starlette.applications import Starlette

import voicebot.media_endpoint as media_endpoint
from pipeline.conversation import Engines
from pipeline.engines import ChatMessage
from pipeline.factory import build_vad_factory
from pipeline.tts_piper import ToneTts
from telephony.stream import TwilioStream
from voicebot.admission import thread_schedstat_s
from voicebot.app import create_app
from voicebot.settings import load_settings

BUCKETS_PER_MS = 2
MAX_MS = 10_000


class FixedStt:
    """A test double: every utterance "says" the same words, at once."""

    name = "scripted"

    def __init__(self, text: str) -> None:
        self.text = text

    def transcribe(self, audio: object) -> str:
        return self.text


class InstantLlm:
    """A test double: the same reply for everything, streamed word by word without delay."""

    name = "scripted"
    tools = None

    def __init__(self, reply: str) -> None:
        self.reply = reply

    async def stream(self, messages: Sequence[ChatMessage]) -> AsyncIterator[str]:
        for index, word in enumerate(self.reply.split(" ")):
            yield word if index == 0 else " " + word

    async def complete(self, messages: Sequence[ChatMessage]) -> str:
        return self.reply


def _runqueue_wait_s() -> float:
    """Seconds the calling thread (the event loop's) has waited for a CPU while runnable
    (`thread_schedstat_s`; 0 where there is none)."""
    stat = thread_schedstat_s()
    return stat[1] if stat is not None else 0.0


class BenchStats:
    """This worker's counters for the window: frame lag histogram, work time, loop lag, CPU."""

    def __init__(self, late_ms: float) -> None:
        self.late_ms = late_ms
        self.frames_total = 0
        self.late = 0
        self.lag_max = 0.0
        self.reset()

    def reset(self) -> None:
        # What went late before the window (the ramp-up), kept apart.
        self.before_late = self.late
        self.before_lag_max = self.lag_max
        self.hist = [0] * (MAX_MS * BUCKETS_PER_MS + 1)
        self.frames = 0
        self.held = 0  # of them, frames the quiet hold kept (no Python ran for them)
        self.late = 0
        self.lag_max = 0.0
        self.work_s = 0.0
        self.work_max = 0.0
        self.slow = 0  # frames whose own processing took over 20 ms (an await that stalled)
        self.loop_lags: list[float] = []
        self.loop_busy: list[float] = []  # admission's loop busy share, every report
        self.beat = time.monotonic()  # the loop's last round, for the stall watch
        self.gc_s = 0.0  # time in the cyclic garbage collector (it stops the event loop)
        self.gc_max = 0.0
        # generation → [collections, longest ms, most objects one collection found unreachable
        # (freeing them is part of its time), longest in CPU ms (this thread's: the wall time
        # less the time the loop's thread waited for a CPU)]
        self.gc_runs: dict[str, list[float]] = {}
        usage = resource.getrusage(resource.RUSAGE_SELF)
        self.cpu0 = usage.ru_utime + usage.ru_stime
        self.wait0 = _runqueue_wait_s()
        self.t0 = time.monotonic()

    def add_work(self, work_s: float) -> None:
        """Work that went with frames already observed (a quiet hold's block)."""
        self.work_s += work_s
        if work_s > self.work_max:
            self.work_max = work_s
        if work_s > 0.020:
            self.slow += 1

    def observe(self, lag_s: float, work_s: float) -> None:
        ms = lag_s * 1000
        self.frames += 1
        self.frames_total += 1
        self.work_s += work_s
        if work_s > self.work_max:
            self.work_max = work_s
        if work_s > 0.020:
            self.slow += 1
        self.hist[min(int(ms * BUCKETS_PER_MS), MAX_MS * BUCKETS_PER_MS)] += 1
        if ms > self.lag_max:
            self.lag_max = ms
        if ms > self.late_ms:
            self.late += 1

    def snapshot(self, active_calls: int, final: bool = False, light: bool = False
                 ) -> dict[str, Any]:
        """The counters as `merge` reads them. `light`: without the lag histogram and the
        loop's samples (the periodic report, written four times a second, from which the
        bench reads only the frame count; dumping the window's whole history there cost a
        few per cent of a worker by the end of the window)."""
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return {
            "pid": os.getpid(),
            "frames_total": self.frames_total,
            "frames": self.frames,
            "held_frames": self.held,
            "window_s": time.monotonic() - self.t0,
            "cpu_s": usage.ru_utime + usage.ru_stime - self.cpu0,
            "hist": {} if light else {str(i): n for i, n in enumerate(self.hist) if n},
            "lag_max_ms": self.lag_max,
            "late_frames": self.late,
            "before_late_frames": self.before_late,
            "before_lag_max_ms": self.before_lag_max,
            "work_s": self.work_s,
            "work_max_ms": self.work_max * 1000,
            "slow_frames": self.slow,
            "loop_lags": [] if light else self.loop_lags,
            "loop_busy": [] if light else self.loop_busy,
            "active_calls": active_calls,
            "max_rss_mb": usage.ru_maxrss / 1024,
            "gc_s": self.gc_s,
            "gc_max_ms": self.gc_max * 1000,
            "gc_runs": self.gc_runs,
            "runqueue_wait_s": _runqueue_wait_s() - self.wait0,
            "gc_tracked": [len(gc.get_objects(g)) for g in range(3)] if final else None,
            # What the oldest generation holds (a full collection walks all of it).
            "gc_old_types": _top_types(gc.get_objects(2), 15) if final else None,
        }

    def on_gc(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._gc_t0 = time.perf_counter()
            self._gc_cpu0 = time.thread_time()
            return
        took = time.perf_counter() - getattr(self, "_gc_t0", time.perf_counter())
        cpu = time.thread_time() - getattr(self, "_gc_cpu0", time.thread_time())
        self.gc_s += took
        self.gc_max = max(self.gc_max, took)
        runs = self.gc_runs.setdefault(str(info["generation"]), [0, 0.0, 0, 0.0])
        runs[0] += 1
        runs[1] = max(runs[1], round(took * 1000, 1))
        runs[2] = max(runs[2], info.get("collected", 0))
        runs[3] = max(runs[3], round(cpu * 1000, 1))


def _top_types(objects: list[Any], count: int) -> dict[str, int]:
    """The most common types among `objects`, by name, with how many of each (coroutines by
    their function's name)."""
    def name(o: Any) -> str:
        kind = type(o).__name__
        return f"{kind} {o.__qualname__}" if kind == "coroutine" else kind

    return dict(collections.Counter(name(o) for o in objects).most_common(count))


def merge(snapshots: list[dict[str, Any]]) -> dict[str, Any]:
    """One window's numbers from every worker's snapshot."""
    hist: dict[int, int] = {}
    for snap in snapshots:
        for key, count in snap["hist"].items():
            hist[int(key)] = hist.get(int(key), 0) + count
    frames = sum(s["frames"] for s in snapshots)

    def lag_percentile(q: float) -> float | None:
        seen = 0
        for index in sorted(hist):
            seen += hist[index]
            if seen >= q * frames:
                return round(index / BUCKETS_PER_MS, 1)
        return None

    loops = sorted(lag for s in snapshots for lag in s["loop_lags"])
    work = sum(s["work_s"] for s in snapshots)
    return {
        "workers": len(snapshots),
        "frames_total": sum(s["frames_total"] for s in snapshots),
        "frames": frames,
        "held_frames": sum(s.get("held_frames", 0) for s in snapshots),
        "window_s": round(max((s["window_s"] for s in snapshots), default=0.0), 2),
        "cpu_s": round(sum(s["cpu_s"] for s in snapshots), 3),
        "lag_p50_ms": lag_percentile(0.50),
        "lag_p99_ms": lag_percentile(0.99),
        "lag_max_ms": round(max((s["lag_max_ms"] for s in snapshots), default=0.0), 1),
        "late_frames": sum(s["late_frames"] for s in snapshots),
        "before_late_frames": sum(s.get("before_late_frames", 0) for s in snapshots),
        "before_lag_max_ms": round(max((s.get("before_lag_max_ms", 0.0)
                                        for s in snapshots), default=0.0), 1),
        "frame_work_us": round(work / frames * 1e6, 1) if frames else None,
        "frame_work_max_ms": round(max((s["work_max_ms"] for s in snapshots), default=0.0), 1),
        "slow_frames": sum(s["slow_frames"] for s in snapshots),
        "loop_lag_p99_ms": round(loops[int(0.99 * (len(loops) - 1))] * 1000, 1) if loops
        else None,
        "loop_lag_max_ms": round(loops[-1] * 1000, 1) if loops else None,
        "active_calls": sum(s["active_calls"] for s in snapshots),
        "cpu_s_per_worker": sorted(round(s["cpu_s"], 2) for s in snapshots),
        "frames_per_worker": sorted(s["frames"] for s in snapshots),
        "max_rss_mb": round(max((s["max_rss_mb"] for s in snapshots), default=0.0), 1),
        "gc_ms": round(1000 * sum(s.get("gc_s", 0.0) for s in snapshots), 1),
        "gc_max_ms": round(max((s.get("gc_max_ms", 0.0) for s in snapshots), default=0.0), 1),
        "gc_runs_per_worker": [s.get("gc_runs") for s in snapshots],
        "runqueue_wait_s_per_worker": [round(s.get("runqueue_wait_s", 0.0), 2)
                                       for s in snapshots],
        # The share of a second each worker's loop thread ran or waited for a CPU (what
        # SHED_LOOP_BUSY looks at), sampled through the window: median and highest.
        "loop_busy_p50_max_per_worker": [
            [round(statistics.median(s["loop_busy"]), 3), round(max(s["loop_busy"]), 3)]
            if s.get("loop_busy") else None for s in snapshots],
        "gc_tracked_per_worker": [s.get("gc_tracked") for s in snapshots],
        "gc_old_types_per_worker": [s.get("gc_old_types") for s in snapshots],
    }


STATS = BenchStats(float(os.environ.get("BENCH_LATE_MS", "60")))
gc.callbacks.append(STATS.on_gc)
if os.environ.get("BENCH_GC_THRESHOLD0"):  # capacity_media.py --gc-threshold0
    gc.set_threshold(int(os.environ["BENCH_GC_THRESHOLD0"]), *gc.get_threshold()[1:])
if os.environ.get("BENCH_GC_THRESHOLD2"):  # capacity_media.py --gc-threshold2
    gc.set_threshold(*gc.get_threshold()[:2], int(os.environ["BENCH_GC_THRESHOLD2"]))


class InstrumentedStream(TwilioStream):
    """`TwilioStream` that measures each inbound frame's processing lag and work time."""

    _base: float | None = None

    def _on_media(self, payload: bytes, timestamp_ms: int) -> Any:
        start = time.perf_counter()
        pending = super()._on_media(payload, timestamp_ms)
        STATS.observe(self._lag(time.monotonic() - timestamp_ms / 1000),
                      time.perf_counter() - start)
        return pending

    def _lag(self, offset: float) -> float:
        """A frame handled `offset` seconds after its timestamp: how late it was, against when
        it was due by its own clock (this call's best offset plus its timestamp)."""
        if self._base is None or offset < self._base:
            self._base = offset
        return offset - self._base

    def _flush_hold(self, hold: Any) -> Any:
        # Frames the quiet hold kept (no Python ran for them): each one's lag from when the
        # protocol read it, and the block's work on the last.
        start = time.perf_counter()
        pending = super()._flush_hold(hold)
        STATS.add_work(time.perf_counter() - start)
        return pending

    def _count_held(self, stamps: list[int], arrivals: list[float]) -> None:
        super()._count_held(stamps, arrivals)
        STATS.held += len(stamps)
        for stamp, arrival in zip(stamps, arrivals, strict=True):
            STATS.observe(self._lag(arrival - stamp / 1000), 0.0)


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


async def _report_loop(app: Starlette, directory: Path) -> None:
    """Reset on `reset`, write snapshots, write the final one on `end` (see module doc)."""
    seen_reset, seen_end = _read(directory / "reset"), _read(directory / "end")
    pid = os.getpid()
    while True:
        await asyncio.sleep(0.25)
        services = getattr(app.state, "services", None)
        active = services.active_calls if services is not None else 0
        admission = getattr(app.state, "admission", None)
        busy = admission.loop_busy() if admission is not None else None
        if busy is not None:
            STATS.loop_busy.append(busy)
        reset, end = _read(directory / "reset"), _read(directory / "end")
        if reset != seen_reset:
            seen_reset = reset
            STATS.reset()
        if end != seen_end:
            seen_end = end
            _write_whole(directory / f"{pid}.final.json", STATS.snapshot(active, True))
        _write_whole(directory / f"{pid}.json", STATS.snapshot(active, light=True))


def _write_whole(path: Path, snapshot: dict) -> None:  # type: ignore[type-arg]
    """Write then rename: the bench reads these files while the workers rewrite them, and a
    file caught half-written (empty) broke its JSON parse."""
    part = path.with_name(path.name + ".part")
    part.write_text(json.dumps(snapshot))
    part.replace(path)


async def _loop_lag_monitor() -> None:
    loop = asyncio.get_running_loop()
    while True:
        due = loop.time() + 0.02
        await asyncio.sleep(0.02)
        STATS.loop_lags.append(max(0.0, loop.time() - due))
        STATS.beat = time.monotonic()


def _stall_watch(directory: Path, stall_ms: float) -> None:
    """A thread that, whenever the event loop has not come round for `stall_ms`, writes every
    thread's stack to `<pid>.stalls.txt` (every 10 ms while the stall lasts): what the loop was
    doing when frames went late. BENCH_STALL_MS turns it on (`capacity_media.py --stalls`)."""
    main = threading.main_thread().ident
    out = directory / f"{os.getpid()}.stalls.txt"
    STATS.beat = time.monotonic()
    while True:
        time.sleep(0.01)
        stalled_ms = (time.monotonic() - STATS.beat) * 1000
        if stalled_ms < stall_ms:
            continue
        # Seconds since the counters' last reset: the worker's start, then the window's.
        lines = [f"--- loop stalled {stalled_ms:.0f} ms, {time.monotonic() - STATS.t0:.3f} s "
                 "after the last reset\n"]
        for ident, frame in sys._current_frames().items():
            if ident == threading.get_ident():
                continue
            lines.append(f"thread {'main' if ident == main else ident}:\n")
            lines.extend(traceback.format_stack(frame, limit=12))
        with out.open("a") as file:
            file.writelines(lines)


def app_from_env() -> Starlette:
    """The bench app, built in each worker from BENCH_* variables."""
    settings = load_settings(
        database_url=os.environ["BENCH_DATABASE_URL"], db_spool_dir="./bench-spool",
        public_url=None, max_concurrent_calls=100_000, shed_queue_depth=0,
        shed_loop_busy=float(os.environ.get("BENCH_SHED_LOOP_BUSY") or 0),
        llm_base_url="http://127.0.0.1:9/v1", llm_model="bench", log_level="WARNING",
        max_calls_per_address=100_000,
    )
    engines = Engines(
        stt=FixedStt(os.environ.get("BENCH_TRANSCRIPT", "I would like a table for two")),
        llm=InstantLlm(os.environ.get("BENCH_REPLY", "Sure. What time would you like?")),  # type: ignore[arg-type]
        tts=ToneTts(), vad=build_vad_factory(settings, os.environ.get("BENCH_VAD", "silero")),
        stt_limiter=anyio.CapacityLimiter(8))
    if hasattr(engines, "turn_model"):
        # The end-of-turn model is a model like STT: left out of the media-path numbers
        # (bench/capacity_full.py runs it). Without it, the words and the silence decide.
        engines.turn_model = None  # type: ignore[attr-defined]
    media_endpoint.TwilioStream = InstrumentedStream  # type: ignore[misc]
    app = create_app(settings, engines=engines)
    directory = Path(os.environ["BENCH_DIR"])
    record = os.environ.get("BENCH_RECORD", "1") != "0"
    inner = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[Any]:
        async with inner(app) as state:
            if not record:  # to see what storing calls costs: drop the recorder's subscription
                app.state.services.bus.unsubscribe("db")
            tasks = [asyncio.create_task(_report_loop(app, directory)),
                     asyncio.create_task(_loop_lag_monitor())]
            if stall_ms := float(os.environ.get("BENCH_STALL_MS", "0")):
                threading.Thread(target=_stall_watch, args=(directory, stall_ms),
                                 daemon=True).start()
            try:
                yield state
            finally:
                for task in tasks:
                    task.cancel()

    app.router.lifespan_context = lifespan
    return app
