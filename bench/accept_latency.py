"""What a new connection costs to reach a worker: connect, `GET /healthz`, answer, close.

Starts `python -m voicebot.workers --workers N` (what `voicebot serve` runs) on a loopback
port with a throwaway SQLite database, waits until it is ready, then times `--requests`
connections one after another, each a fresh TCP connection with one request on it (what
Twilio's webhook and each media stream's handshake cost before the call's own work). With
several workers the supervisor accepts each connection and hands it to a worker
(`voicebot/balancer.py`); with one, the worker accepts it itself. Prints the median and p99
in milliseconds and writes a JSON file.

    .venv/bin/python bench/accept_latency.py --workers 2 --requests 2000
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.capacity_media import free_port, wait_ready  # noqa: E402

REQUEST = b"GET /healthz HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n"


def one(port: int) -> float:
    """Seconds from connect to the whole answer read (the server closes)."""
    start = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(REQUEST)
        answer = b""
        while chunk := sock.recv(4096):
            answer += chunk
    elapsed = time.perf_counter() - start
    if not answer.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"unexpected answer: {answer[:80]!r}")
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--settle-s", type=float, default=5.0,
                        help="wait after ready, for every worker to finish starting")
    parser.add_argument("--json", default=str(ROOT / "bench" / "results" / "accept_latency.json"))
    args = parser.parse_args()

    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "DATABASE_URL": f"sqlite:///{tmp}/calls.db",
               "DB_SPOOL_DIR": f"{tmp}/spool", "LOG_LEVEL": "WARNING"}
        server = subprocess.Popen(
            [sys.executable, "-m", "voicebot.workers", "--host", "127.0.0.1", "--port",
             str(port), "--workers", str(args.workers)],
            cwd=tmp, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)
        try:
            wait_ready(port, server, within_s=120)
            time.sleep(args.settle_s)
            for _ in range(100):  # warm-up
                one(port)
            times = sorted(one(port) for _ in range(args.requests))
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=60)
    ms = [t * 1000 for t in times]
    result = {
        "workers": args.workers, "requests": args.requests,
        "median_ms": round(statistics.median(ms), 3),
        "p99_ms": round(ms[int(0.99 * (len(ms) - 1))], 3),
        "max_ms": round(ms[-1], 3),
    }
    print(f"workers {result['workers']}: median {result['median_ms']} ms, "
          f"p99 {result['p99_ms']} ms, max {result['max_ms']} ms "
          f"over {args.requests} connections")
    Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
