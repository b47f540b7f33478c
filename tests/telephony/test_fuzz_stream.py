"""Property: whatever a peer sends on `/twilio/media`, its call goes on or ends cleanly with a
logged reason (`stop` or `disconnect`), nothing raises, and a call running at the same time
does not notice. Sessions run against the real server (uvicorn, limits on) with instant
engines; a well-behaved call is placed over and over meanwhile."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings

from tests.telephony.fuzzkit import (
    FuzzServer,
    GoodCalls,
    LogCapture,
    floods,
    run_session,
    sessions,
    valid,
)

ROOT = Path(__file__).resolve().parents[2]
SESSIONS = settings(derandomize=True, max_examples=100, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def capture() -> Iterator[LogCapture]:
    with LogCapture().installed() as capture:
        yield capture


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, capture: LogCapture) -> Iterator[FuzzServer]:
    server = FuzzServer(tmp_path_factory.mktemp("fuzz")).start()
    try:
        yield server
    finally:
        server.stop()


def test_fuzzed_sessions_end_cleanly_and_a_concurrent_call_is_untouched(
    server: FuzzServer, capture: LogCapture, fixtures_dir: Path
) -> None:
    reasons: list[str] = []

    with GoodCalls(server, fixtures_dir / "open_hours.wav") as good:

        @SESSIONS
        @given(sessions())
        def one(session: tuple[list[str | bytes], str]) -> None:
            reasons.append(run_session(server, capture, session, others=good.all_sids))

        one()
    good.assert_untouched(capture)
    assert set(reasons) == {"stop", "disconnect"}  # both ways out were exercised
    assert server.active_calls == 0


@pytest.mark.parametrize("ending", ["stop", "close", "abort"])
def test_a_flood_of_marks_digits_and_clears_ends_cleanly(
    server: FuzzServer, capture: LogCapture, ending: str
) -> None:
    frames = [valid("connected"), valid("start")]
    frames += [valid("mark")] * 500 + [valid("dtmf")] * 200 + ['{"event":"clear"}'] * 500
    frames += [valid("media", b"\x00" * 160)] * 200  # loud: the listener hears speech
    assert run_session(server, capture, (frames, ending)) == (
        "stop" if ending == "stop" else "disconnect")
    assert floods  # the strategy the property test draws floods from


@pytest.mark.slow
def test_fuzz_target_runs_for_a_bounded_time() -> None:
    """CI's bounded fuzz run: `bench/fuzz_media.py --seconds N` exits 0 after about N s."""
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "fuzz_media.py"),
                           "--seconds", "20"], capture_output=True, text=True, timeout=180,
                          cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "sessions" in done.stdout and "crashes 0" in done.stdout
