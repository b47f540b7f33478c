"""A fault run: simulated calls on the real models while faults are injected, then an audit.

The chaos scenario of `tests/calls/test_chaos.py`, standalone, against the app in this
process: waves of calls (a few at a time) meet caller hang-ups and dropped sockets, LLM
errors / timeouts / slow and empty replies, TTS and STT errors, Redis and PostgreSQL restarts
and a full spool disk (see tests/calls/chaoskit.py). It prints calls run, faults injected by
kind, calls finalized, utterances lost (must be 0) and crashes (0), and writes
bench/results/fault_run.json (its log: build/fault_run.log). Needs PostgreSQL
(127.0.0.1:5432) and Redis (127.0.0.1:6379), as ./test.sh starts them; the full-disk fault
needs root (a tmpfs mount) and is skipped without it. Exits 1 when anything was lost or broke.

    .venv/bin/python bench/fault_run.py --calls 36
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import platform
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.stt import WhisperStt  # noqa: E402
from pipeline.tts_piper import PiperTts  # noqa: E402
from tests.calls.chaoskit import ChaosRun, chaos_engines, chaos_env, fault_kinds  # noqa: E402
from tests.fakes.engines import FaultSwitch  # noqa: E402
from tests.fakes.openai_server import FakeOpenAi  # noqa: E402
from voicebot.settings import load_settings  # noqa: E402

FIXTURES = ROOT / "tests" / "fixtures"
RESULTS = ROOT / "bench" / "results"


async def run(args: argparse.Namespace) -> dict[str, object]:
    with FakeOpenAi() as fake, tempfile.TemporaryDirectory() as tmp:
        settings = load_settings(llm_base_url=fake.base_url, llm_model="scripted",
                                 public_url=None, database_url=f"sqlite:///{tmp}/unused.db")
        switch = FaultSwitch()
        engines = chaos_engines(settings, WhisperStt(), PiperTts(), switch)
        kinds = fault_kinds(args.calls, args.per_wave)
        async with chaos_env(settings, engines, switch, fake, FIXTURES, Path(tmp)) as env:
            report = await ChaosRun(env, per_wave=args.per_wave, pace=args.pace).run(kinds)
    result = report.as_json(details=20)
    result["ok"] = report.ok
    result["setup"] = {"calls": args.calls, "per_wave": args.per_wave, "pace": args.pace,
                       "models": "faster-whisper tiny.en, Piper joe-medium, Silero VAD; "
                                 "scripted OpenAI-compatible LLM on loopback",
                       "machine": f"{platform.machine()}, {platform.python_version()}",
                       "at": datetime.now(UTC).isoformat(timespec="seconds")}
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=36)
    parser.add_argument("--per-wave", type=int, default=3, help="calls at once")
    parser.add_argument("--pace", type=float, default=6.0, help="times faster than real time")
    parser.add_argument("--out", type=Path, default=RESULTS / "fault_run.json")
    args = parser.parse_args(argv)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (ROOT / "build").mkdir(exist_ok=True)
    logging.basicConfig(level=logging.INFO, filename=str(ROOT / "build" / "fault_run.log"),
                        filemode="w", format="%(asctime)s %(levelname)s %(name)s %(message)s")
    result = asyncio.run(run(args))
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    faults = ", ".join(f"{k} {v}" for k, v in result["faults_injected"].items())  # type: ignore[union-attr]
    print(f"calls run           {result['calls_run']}")
    print(f"faults injected     {faults}")
    if result["faults_skipped"]:
        print(f"faults skipped      {', '.join(result['faults_skipped'])}")  # type: ignore[arg-type]
    print(f"calls finalized     {result['calls_finalized']}")
    print(f"utterances stored   {result['utterances_stored']} of {result['utterances_spoken']}")
    print(f"utterances lost     {result['utterances_lost']}")
    print(f"crashes             {result['crashes']}")
    print(f"turns answered      {result['turns'] - result['turns_unanswered']} of "  # type: ignore[operator]
          f"{result['turns']}, slowest {result['max_turn_latency_ms']} ms")
    print(f"wrote {args.out.relative_to(ROOT)} in {result['seconds']} s: "
          f"{'OK' if result['ok'] else 'FAILED'}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
