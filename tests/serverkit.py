"""`voicebot serve` as a real subprocess on a loopback port, for drain and deployment tests."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
# The app factory with admission, metrics and draining wired in (see tests/capacitykit.py).
FACTORY = "tests.capacitykit:create_app_from_env"


async def eventually(check: Callable[[], bool | Awaitable[bool]], within_s: float,
                     interval_s: float = 0.05) -> None:
    """Poll `check` until it holds (for state in another process, which sends no event)."""
    async with asyncio.timeout(within_s):
        while True:
            result = check()
            if inspect.isawaitable(result):
                result = await result
            if result:
                return
            await asyncio.sleep(interval_s)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServerProcess:
    """One `python -m voicebot.workers` process (what `voicebot serve` runs)."""

    def __init__(self, workdir: Path, env: dict[str, str], *, workers: int = 1,
                 port: int | None = None, name: str = "server") -> None:
        self.workdir = workdir
        self.port = port or free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.media_url = f"ws://127.0.0.1:{self.port}/twilio/media"
        self.log_path = workdir / f"{name}.log"
        self._env = {**os.environ, "PYTHONPATH": str(ROOT), **env}
        for key in ("TWILIO_AUTH_TOKEN", "PUBLIC_URL", "REDIS_URL"):
            if key not in env:
                self._env.pop(key, None)
        self._args = [sys.executable, "-m", "voicebot.workers", "--host", "127.0.0.1",
                      "--port", str(self.port), "--workers", str(workers), "--factory", FACTORY]
        self.process: subprocess.Popen[bytes] | None = None

    def _spawn(self) -> subprocess.Popen[bytes]:
        self.workdir.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as log:
            # Its own process group, so `kill` reaches the workers too.
            return subprocess.Popen(self._args, cwd=self.workdir, env=self._env, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)

    async def start(self, ready_within_s: float = 120.0) -> None:
        self.process = await asyncio.to_thread(self._spawn)
        deadline = time.monotonic() + ready_within_s
        async with httpx.AsyncClient(base_url=self.base_url, timeout=2) as http:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(f"server exited at start-up:\n{self.log()}")
                try:
                    if (await http.get("/readyz")).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.1)
        self.kill()
        raise RuntimeError(f"server not ready within {ready_within_s} s:\n{self.log()}")

    def signal(self, sig: int = signal.SIGTERM) -> None:
        assert self.process is not None
        self.process.send_signal(sig)

    async def wait_exit(self, within_s: float) -> int:
        assert self.process is not None
        deadline = time.monotonic() + within_s
        while self.process.poll() is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"server still running after {within_s} s:\n{self.log()}")
            await asyncio.sleep(0.05)
        return int(self.process.returncode)

    def kill(self) -> None:
        """SIGKILL the server and its workers (their own process group)."""
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-6000:]
        except OSError:
            return ""


# Which process holds which connection of a real server: for the workers' balancing tests.

def _established(port: int) -> dict[str, int]:
    """The server's side of the established TCP connections to `port`: each socket's inode
    and the client's port (from /proc/net/tcp)."""
    held = {}
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].split(":")[1], 16) == port and fields[3] == "01":  # ESTABLISHED
            held[fields[9]] = int(fields[2].split(":")[1], 16)
    return held


def _socket_inodes(pid: int | str) -> set[str]:
    """The inodes of the sockets process `pid` has open (from its /proc descriptors)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):  # closed meanwhile
            if m := re.fullmatch(r"socket:\[(\d+)\]", os.readlink(f"/proc/{pid}/fd/{fd}")):
                inodes.add(m.group(1))
    return inodes


def connections_by_pid(port: int) -> dict[int, int]:
    """Established TCP connections on the server's side of `port`, by the process that
    holds them."""
    inodes = _established(port).keys()
    counts = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            held = len(_socket_inodes(pid) & inodes)
        except OSError:
            continue  # the process is gone, or not ours to read
        if held:
            counts[int(pid)] = held
    return counts


def client_ports_held_by(pid: int, port: int) -> list[int]:
    """The clients' ports of the connections to `port` that process `pid` holds."""
    mine = _socket_inodes(pid)
    return [client for inode, client in _established(port).items() if inode in mine]
