"""A bounded fuzz run of the Media Streams edge, for CI: the parser and live sessions.

Runs the properties of `tests/telephony/test_fuzz_*.py` over and over with a new seed per
round until `--seconds` have passed: any frame parses to a typed event or a `ProtocolError`;
any session against the real server (uvicorn, instant engines, limits on) ends cleanly with a
logged reason and no error. Rounds are reproducible: round r uses seed `--seed` + r. Exits 1
at the first failure, after printing Hypothesis's (shrunk) falsifying example.

    .venv/bin/python bench/fuzz_media.py --seconds 60
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hypothesis import HealthCheck, given, seed, settings  # noqa: E402

from tests.telephony.fuzzkit import (  # noqa: E402
    FuzzServer,
    LogCapture,
    check_parse,
    frames,
    run_session,
    sessions,
)

PARSE_PER_ROUND = 300
SESSIONS_PER_ROUND = 15


def _settings(examples: int) -> settings:
    return settings(max_examples=examples, deadline=None, database=None, print_blob=True,
                    suppress_health_check=list(HealthCheck))


def fuzz(seconds: float, first_seed: int) -> dict[str, int]:
    """Run rounds until `seconds` have passed; raises on the first failing example."""
    counts = {"rounds": 0, "frames": 0, "sessions": 0}
    capture = LogCapture()
    with capture.installed(), tempfile.TemporaryDirectory() as tmp:
        server = FuzzServer(Path(tmp)).start()
        try:
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                round_seed = first_seed + counts["rounds"]

                @seed(round_seed)
                @_settings(PARSE_PER_ROUND)
                @given(frames)
                def parse(frame: str | bytes) -> None:
                    check_parse(frame)
                    counts["frames"] += 1

                @seed(round_seed)
                @_settings(SESSIONS_PER_ROUND)
                @given(sessions())
                def session(one: tuple[list[str | bytes], str]) -> None:
                    run_session(server, capture, one)
                    counts["sessions"] += 1

                parse()
                session()
                counts["rounds"] += 1
            assert server.active_calls == 0, f"{server.active_calls} calls still open"
        finally:
            server.stop()
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="how long to fuzz")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first round")
    args = parser.parse_args(argv)
    # The capture (on the root logger) sees every record; nothing is printed but the summary.
    logging.getLogger("uvicorn").setLevel(logging.CRITICAL)
    started = time.monotonic()
    try:
        counts = fuzz(args.seconds, args.seed)
    except Exception:
        traceback.print_exc()
        print("fuzz_media: FAILED (crashes 1); rerun the round's seed to reproduce")
        return 1
    print(f"fuzz_media: {counts['rounds']} rounds, {counts['frames']} frames parsed, "
          f"{counts['sessions']} sessions in {time.monotonic() - started:.0f} s; crashes 0")
    return 0


if __name__ == "__main__":
    sys.exit(main())
