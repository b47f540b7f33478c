"""A worker always exits: its watchdog ends a shutdown that hangs, and the kernel stops it
when its supervisor dies (`voicebot.workers`)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.fakes.openai_server import FakeOpenAi
from tests.serverkit import ServerProcess, eventually
from tests.test_drain import server_env

ROOT = Path(__file__).resolve().parents[1]

STUBBORN = textwrap.dedent("""
    import asyncio, logging, sys
    from voicebot import workers

    logging.basicConfig(level="INFO", stream=sys.stderr)

    async def stubborn() -> None:  # swallows every cancellation: asyncio.run never returns
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                pass

    async def main() -> None:
        asyncio.create_task(stubborn(), name="stubborn-task")
        workers._exit_watchdog(asyncio.get_running_loop(), float(sys.argv[1]))

    asyncio.run(main())
    print("returned", flush=True)
""")


def _run(limit_s: float, code: str = STUBBORN) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", code, str(limit_s)], cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
                          text=True, timeout=60)
    return done, time.monotonic() - started


def test_a_shutdown_that_hangs_is_ended_and_the_task_that_held_it_is_named() -> None:
    done, took = _run(1.0)
    assert done.returncode == 1
    assert "returned" not in done.stdout
    assert "did not exit within 1 s of its shutdown; 1 task(s) left" in done.stderr
    # The task, and where it was waiting.
    assert "stubborn-task: stubborn (<string>:" in done.stderr
    assert took < 15


QUICK = textwrap.dedent("""
    import asyncio, logging, sys, time
    from voicebot import workers

    logging.basicConfig(level="INFO", stream=sys.stderr)
    limit = float(sys.argv[1])

    async def main() -> None:
        global ran
        ran = workers._exit_watchdog(asyncio.get_running_loop(), limit)

    asyncio.run(main())
    ran.set()  # what DrainingServer.run does once asyncio.run has returned
    time.sleep(limit + 1)  # the process goes on (a caller of `serve`): not cut short
    print("returned", flush=True)
""")


def test_a_shutdown_that_finishes_is_not_cut_short() -> None:
    done, _ = _run(1.0, QUICK)
    assert done.returncode == 0, done.stderr
    assert "returned" in done.stdout
    assert "did not exit" not in done.stderr


def _workers(supervisor: int) -> list[int]:
    """The supervisor's worker processes (not multiprocessing's resource tracker)."""
    path = Path(f"/proc/{supervisor}/task/{supervisor}/children")
    children = [int(p) for p in path.read_text().split()] if path.exists() else []
    return [pid for pid in children
            if b"resource_tracker" not in Path(f"/proc/{pid}/cmdline").read_bytes()]


def _running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's zombie waits for whoever adopted it to reap it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
async def test_workers_stop_when_their_supervisor_is_killed(tmp_path: Path,
                                                            fake_openai: FakeOpenAi) -> None:
    """Before: a supervisor killed outright (SIGKILL, the OOM killer) left its workers
    serving on the port, with no one to stop them, and the next server could not bind it."""
    server = ServerProcess(tmp_path, server_env(tmp_path, fake_openai), workers=2)
    await server.start()
    try:
        assert server.process is not None
        workers = _workers(server.process.pid)
        assert len(workers) == 2
        os.kill(server.process.pid, signal.SIGKILL)  # the supervisor alone
        server.process.wait(timeout=10)
        await eventually(lambda: not any(_running(pid) for pid in workers), within_s=30)
        await eventually(lambda: _port_free(server.port), within_s=10)
        assert "draining" in server.log()  # they drained, as for the supervisor's SIGTERM
    finally:
        server.kill()
