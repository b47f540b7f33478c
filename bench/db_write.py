"""CPU cost of storing calls' events: the recorder's batched writes against one at a time.

Plays a typical call's events (CallStarted, the greeting, 10 turns of turn_end event, caller
utterance, TurnMetrics, its heard-V2V completion and bot utterance, a barge-in or backchannel
every few turns, end_call and CallEnded) for `--calls` calls interleaved: each round publishes
the next event of every call on an `EventBus` (as concurrent calls do at about the same
moment), then waits until `CallRecorder` has stored them. Reports the CPU time of this process
per event (`time.process_time`: the event loop, SQLAlchemy, the driver and aiosqlite's thread;
not the PostgreSQL server's own CPU) and the wall time. Compare CPU, not wall time, on a busy
machine.

    .venv/bin/python bench/db_write.py                    # SQLite (a temp file), batched
    .venv/bin/python bench/db_write.py --no-batch         # one event per transaction
    .venv/bin/python bench/db_write.py --runs 3 --database-url \\
        postgresql://postgres@127.0.0.1:5432/voicebot_bench   # a scratch database: migrated

`--burst N` publishes N events per round instead of one per call (`--burst 1`: nothing ever
waits, so there is nothing to batch). `--no-batch` only uses `EventBus.subscribe` and
`CallRecorder.handle`, so it runs on older trees too (copy this file into one).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from db.engine import create_db_engine  # noqa: E402
from db.migrate import upgrade_to_head_async  # noqa: E402
from db.recorder import CallRecorder  # noqa: E402
from db.repository import CallRepository  # noqa: E402
from pipeline.events import (  # noqa: E402
    CallEnded,
    CallEvent,
    CallStarted,
    EventBus,
    PipelineEvent,
    TurnMetrics,
    UtteranceDone,
)

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


@dataclass
class Run:
    database: str
    mode: str
    calls: int
    events: int
    writes: int
    cpu_ms_per_event: float
    wall_s: float


def a_call(sid: str, turns: int) -> list[PipelineEvent]:
    """One call's events, in the order the pipeline publishes them."""
    clock = T0

    def at(step_s: float) -> datetime:
        nonlocal clock
        clock += timedelta(seconds=step_s)
        return clock

    events: list[PipelineEvent] = [
        CallStarted(sid, f"MZ{sid}", "+15550100", "+18005550000", "inbound", at(0)),
        UtteranceDone(sid, 0, "bot", "Hello! Thanks for calling, how can I help?", at(0.1),
                      at(2.5)),
    ]
    for turn in range(1, turns + 1):
        start, end = at(1.0), at(2.0)
        events += [
            CallEvent(sid, "turn_end", {"turn": turn, "eou_delay_ms": 480.0, "reason": "eou",
                                        "probability": 0.91, "during_bot": False}, at(0.5)),
            UtteranceDone(sid, turn, "caller", f"Question {turn}: when do you open on "
                          "Saturday and can I book a table?", start, end),
            TurnMetrics(sid, turn, endpoint_ms=480.0, stt_ms=61.5, stt_wait_ms=0.0,
                        llm_first_token_ms=210.0, llm_first_sentence_ms=390.0,
                        tts_first_chunk_ms=95.0, v2v_ms=980.0, overhead_ms=15.0),
            TurnMetrics(sid, turn, heard_v2v_ms=1040.0),
            UtteranceDone(sid, turn, "bot", "We open at nine on Saturdays; yes, I can book it.",
                          at(0.9), at(3.0), "We open at nine on Saturdays; yes, I can book it.",
                          False),
        ]
        if turn % 3 == 0:
            kind = "barge_in" if turn % 2 else "backchannel"
            events.append(CallEvent(sid, kind, {"cause": "speech", "turn": turn}, at(0.3)))
    events += [CallEvent(sid, "end_call", {"reason": "goodbye"}, at(1.0)),
               CallEnded(sid, at(0.5), "bot_hangup")]
    return events


def interleaved(calls: int, turns: int) -> list[PipelineEvent]:
    run = uuid.uuid4().hex[:8]  # a scratch database may be reused: new call ids every run
    per_call = [a_call(f"CA{run}{n:05d}", turns) for n in range(calls)]
    return [event for step in zip(*per_call, strict=True) for event in step]


async def one_run(url: str, args: argparse.Namespace) -> Run:
    engine = create_db_engine(url)
    events = interleaved(args.calls, args.turns)
    burst = args.burst or args.calls
    writes = 0
    with tempfile.TemporaryDirectory() as spool:
        recorder = CallRecorder(CallRepository(engine), Path(spool))
        bus = EventBus(queue_size=max(10_000, burst))
        if args.no_batch:

            async def each(event: PipelineEvent) -> None:
                nonlocal writes
                writes += 1
                await recorder.handle(event)

            bus.subscribe("db", each)
        else:

            async def batch(batch: list[PipelineEvent]) -> None:
                nonlocal writes
                writes += 1
                await recorder.handle_batch(batch)

            bus.subscribe_batch("db", batch, max_batch=args.batch_size)
        await bus.start()
        await recorder.start()
        cpu, wall = time.process_time(), time.perf_counter()
        for start in range(0, len(events), burst):
            for event in events[start : start + burst]:
                bus.publish(event)
            await bus.drain()
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        await bus.stop()
        await recorder.stop()
        assert not recorder.spool.pending(), "events were spooled: is the database up?"
        assert not recorder.spool.rejected_path.exists(), "the database refused events"
    await engine.dispose()
    return Run(
        database=engine.dialect.name,
        mode="per-event" if args.no_batch else f"batched (max {args.batch_size})",
        calls=args.calls,
        events=len(events),
        writes=writes,
        cpu_ms_per_event=round(cpu * 1000 / len(events), 4),
        wall_s=round(wall, 3),
    )


async def main(args: argparse.Namespace) -> None:
    runs: list[Run] = []
    for n in range(args.runs):
        with tempfile.TemporaryDirectory() as scratch:
            url = args.database_url or f"sqlite:///{Path(scratch) / 'bench.db'}"
            await upgrade_to_head_async(url)
            run = await one_run(url, args)
        runs.append(run)
        print(f"run {n + 1}: {run.database} {run.mode}: {run.events} events in {run.writes} "
              f"writes, {run.cpu_ms_per_event:.3f} CPU ms/event, {run.wall_s:.2f} s wall",
              flush=True)
    summary = {
        **{k: v for k, v in asdict(runs[0]).items() if k not in ("cpu_ms_per_event", "wall_s")},
        "runs": args.runs,
        "median_cpu_ms_per_event": round(statistics.median(r.cpu_ms_per_event for r in runs), 4),
        "median_wall_s": round(statistics.median(r.wall_s for r in runs), 3),
        "events_per_write": round(runs[0].events / runs[0].writes, 1),
    }
    print(json.dumps(summary) if args.json else
          f"median of {args.runs}: {summary['median_cpu_ms_per_event']:.3f} CPU ms/event, "
          f"{summary['median_wall_s']:.2f} s wall, {summary['events_per_write']} events/write")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--database-url", help="default: a new SQLite file per run")
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--burst", type=int, default=0,
                        help="events published per round (default: one per call)")
    parser.add_argument("--batch-size", type=int, default=200, help="most events per write")
    parser.add_argument("--no-batch", action="store_true", help="one event per transaction")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    return parser.parse_args(argv)


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
