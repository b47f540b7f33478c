"""Running the server: one or N uvicorn worker processes, and draining them on SIGTERM.

`voicebot serve --workers N` starts N processes. The supervisor listens, accepts each
connection and hands it to the worker with the fewest connections open (`voicebot.balancer`),
so calls spread evenly by load, not by the kernel's hash. Each worker builds its own app from
the environment
(`create_app_from_env`); what calls share lives in Redis when `REDIS_URL` is set (admission
leases, the live viewer feed, caller memory). Metrics from all workers are merged through
`PROMETHEUS_MULTIPROC_DIR` (see `voicebot.metrics`).

Draining. Uvicorn's own shutdown closes every open WebSocket at once (code 1012), which would
cut calls off mid-sentence. So the first SIGTERM (or Ctrl-C) does not reach uvicorn: the
worker stops admitting (`/readyz` answers 503, `/twilio/voice` busy TwiML, new media streams
1013), waits until its calls have ended or `DRAIN_GRACE_S` has passed, and only then lets
uvicorn shut down. A second Ctrl-C leaves at once. The supervisor forwards SIGTERM to every
worker and exits when they all have; it restarts a worker that dies on its own, and gives
back the Redis admission leases the dead worker held (`free_worker_leases`), so its calls,
connected again through `/twilio/stream-ended`, find their lines free.

Two bounds make sure a worker does exit. Once its shutdown has begun, a watchdog thread gives
its `run` `EXIT_LIMIT_S` to return (uvicorn's own graceful shutdown and the app's lifespan fit
well inside): a worker still in it then logs every task left on its loop, with where each is waiting, and
leaves with `os._exit`. And a worker asks the kernel for SIGTERM when its supervisor dies
(`PR_SET_PDEATHSIG`), so a supervisor killed outright does not leave workers serving on its
port, with no one to stop them.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import logging
import multiprocessing
import os
import secrets
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from types import FrameType
from typing import Any

import uvicorn
from uvicorn.config import STARTUP_FAILURE

from voicebot.admission import free_worker_leases
from voicebot.balancer import Balancer, Inbox
from voicebot.ws_protocol import DirectTextProtocol

log = logging.getLogger(__name__)

FACTORY = "voicebot.workers:create_app_from_env"
LISTEN_HOST_ENV = "VOICEBOT_LISTEN_HOST"
LOG_FORMAT = "%(asctime)s %(levelname)s %(process)d %(name)s: %(message)s"
# How long a worker may take to exit once its shutdown has begun (after the drain): uvicorn's
# graceful shutdown (5 s), the app's lifespan and cancelling what is left fit well inside.
EXIT_LIMIT_S = 30.0


def create_app_from_env() -> Any:
    """The app factory uvicorn calls in every worker (`factory=True`): settings from the
    environment, the listening host from `VOICEBOT_LISTEN_HOST` (the viewer asks for a login
    off loopback)."""
    from voicebot.app import create_app
    from voicebot.settings import load_settings

    app = create_app(load_settings())
    app.state.listen_host = os.environ.get(LISTEN_HOST_ENV, "127.0.0.1")
    return app


def find_admission(app: Any) -> Any:
    """`app.state.admission` of the Starlette app inside uvicorn's middleware wrappers."""
    for _ in range(16):
        state = getattr(app, "state", None)
        admission = getattr(state, "admission", None) if state is not None else None
        if admission is not None:
            return admission
        app = getattr(app, "app", None)
        if app is None:
            break
    return None


class DrainingServer(uvicorn.Server):
    """A uvicorn server whose first exit signal drains calls before shutting down."""

    def __init__(self, config: uvicorn.Config, grace_s: float = 30.0,
                 channel: socket.socket | None = None) -> None:
        super().__init__(config)
        self.grace_s = grace_s
        self._channel = channel  # the supervisor hands connections over it (no listener)
        self._inbox: Inbox | None = None
        self.drain_requested = False
        self._deadline: float | None = None
        self._admission: Any = None
        self._next_report = 0.0
        self._ran: threading.Event | None = None  # the exit watchdog's stand-down

    def run(self, sockets: list[socket.socket] | None = None) -> None:
        try:
            super().run(sockets=sockets)
        finally:
            if self._ran is not None:
                self._ran.set()  # `asyncio.run` has returned: the watchdog stands down

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        if self._channel is None:
            await super().startup(sockets)
            return
        await super().startup([])  # the app's lifespan, and no listener of its own
        self._admission = admission = find_admission(self.config.loaded_app)
        self._inbox = Inbox(
            self._channel, self._create_protocol, lambda: self.server_state.connections,
            ssl=self.config.ssl,
            refusing=None if admission is None else lambda: admission.local_refusal() is not None)
        self._inbox.start()

    def _create_protocol(self) -> asyncio.Protocol:
        """A connection's protocol, as uvicorn's own listener makes it."""
        return self.config.http_protocol_class(  # type: ignore[call-arg]
            config=self.config, server_state=self.server_state, app_state=self.lifespan.state,
            _loop=None)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self._ran = _exit_watchdog(asyncio.get_running_loop(), EXIT_LIMIT_S)
        if self._inbox is not None:
            self._inbox.close()  # as uvicorn closes its listener: the others take new ones
        await super().shutdown(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.should_exit:
            super().handle_exit(sig, frame)  # already shutting down: uvicorn's own rules
        elif not self.drain_requested:
            self.drain_requested = True  # acted on by the next tick, on the event loop
        elif sig == signal.SIGINT:
            log.warning("second interrupt: leaving without waiting for calls")
            self.should_exit = True

    async def on_tick(self, counter: int) -> bool:
        if self._inbox is not None:
            self._inbox.report()  # connections that closed since the last tick
        if self.drain_requested and not self.should_exit:
            self._drain_step()
        return await super().on_tick(counter)

    def _drain_step(self) -> None:
        now = time.monotonic()
        if self._deadline is None:
            self._deadline = now + self.grace_s
            if self._admission is None:  # with a channel, `startup` has found it already
                self._admission = find_admission(self.config.loaded_app)
            if self._admission is not None:
                self._admission.begin_drain()
            log.info("draining: up to %.0f s for calls in progress to end", self.grace_s)
        active = self._admission.local_active if self._admission is not None else 0
        if active == 0:
            log.info("drained: no call in progress; shutting down")
            self.should_exit = True
        elif now >= self._deadline:
            log.warning("drain grace of %.0f s is over; ending %d call(s)", self.grace_s, active)
            self.should_exit = True
        elif now >= self._next_report:
            self._next_report = now + 5.0
            log.info("draining: %d call(s) in progress, %.0f s left", active,
                     self._deadline - now)


def _exit_watchdog(loop: asyncio.AbstractEventLoop, limit_s: float) -> threading.Event:
    """A daemon thread that ends this process `limit_s` from now unless the returned event is
    set first (the server's `run` returned): it has the loop log the tasks still on it (what
    kept the worker from exiting), then leaves with exit code 1. A process that exits in time
    takes the thread with it."""
    ran = threading.Event()

    def log_tasks() -> None:
        tasks = asyncio.all_tasks(loop)
        log.error("worker did not exit within %.0f s of its shutdown; %d task(s) left:",
                  limit_s, len(tasks))
        for task in tasks:
            frames = task.get_stack(limit=8)
            where = " <- ".join(f"{f.f_code.co_name} ({os.path.basename(f.f_code.co_filename)}"
                                f":{f.f_lineno})" for f in reversed(frames))
            log.error("  %s: %s", task.get_name(), where or task.get_coro())

    def watch() -> None:
        if ran.wait(limit_s):
            return
        logged = threading.Event()

        def log_and_signal() -> None:
            try:
                log_tasks()
            finally:
                logged.set()

        try:
            loop.call_soon_threadsafe(log_and_signal)
            logged.wait(2.0)  # a loop that is stuck in a blocking call cannot answer
        except RuntimeError:
            pass  # the loop is closed: the process is on its way out
        logging.shutdown()
        os._exit(1)

    threading.Thread(target=watch, name="exit-watchdog", daemon=True).start()
    return ran


PR_SET_PDEATHSIG = 1


def _die_with_parent(parent: int) -> None:
    """SIGTERM this process (a drain, as for the supervisor's own) when `parent` dies
    (Linux; elsewhere nothing)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
            return
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # it died before the request was in
        os.kill(os.getpid(), signal.SIGTERM)


def _run_worker(config: uvicorn.Config, channel: socket.socket, grace_s: float,
                log_level: str, parent: int | None = None) -> None:
    """A worker process: its own logging, then the draining server on the connections the
    supervisor hands it over `channel`."""
    logging.basicConfig(level=log_level.upper(), format=LOG_FORMAT, stream=sys.stderr)
    if parent is not None:
        _die_with_parent(parent)
    try:
        DrainingServer(config, grace_s, channel=channel).run()
    except SystemExit:
        raise
    except Exception:
        log.exception("worker failed")  # the supervisor starts another
        sys.exit(1)


def listen_socket(config: uvicorn.Config) -> socket.socket:
    """The supervisor's listening socket, which its `Balancer` accepts on for all workers.

    A TCP address is bound without SO_REUSEPORT, so a server already listening there
    (another voicebot included) makes this fail at once instead of quietly sharing its
    calls. A Unix socket or an inherited descriptor comes from uvicorn's `bind_socket`."""
    if config.uds is not None or config.fd is not None:
        sock = config.bind_socket()
    else:
        host = config.host
        family = socket.AF_INET6 if host and ":" in host else socket.AF_INET
        try:
            sock = _bound(family, host, config.port)
        except OSError as exc:
            log.error("cannot listen on %s:%d: %s", host, config.port, exc)
            sys.exit(STARTUP_FAILURE)
        log.info("listening on %s:%d", host, sock.getsockname()[1])
    sock.listen(config.backlog)
    return sock


def _bound(family: socket.AddressFamily, host: str, port: int) -> socket.socket:
    """A TCP socket bound to (host, port); closed if it cannot bind."""
    sock = socket.socket(family=family)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


class Supervisor:
    """Keeps N worker processes running and hands each of them its share of the connections
    (`Balancer`); on SIGTERM/SIGINT forwards it and waits for them."""

    def __init__(self, config: uvicorn.Config, workers: int, grace_s: float, log_level: str,
                 redis_url: str | None = None, redis_namespace: str = "voicebot"):
        self.config = config
        self.workers = workers
        self.grace_s = grace_s
        self.log_level = log_level
        self.redis_url = redis_url
        self.redis_namespace = redis_namespace
        self._context = multiprocessing.get_context("spawn")
        self._stop_signals: list[int] = []
        self._processes: list[Any] = []
        self.balancer: Balancer | None = None

    def _spawn(self, slot: int) -> Any:
        assert self.balancer is not None
        channel = self.balancer.attach(slot)
        try:
            process = self._context.Process(
                target=_run_worker,
                args=(self.config, channel, self.grace_s, self.log_level, os.getpid()),
                name="voicebot-worker",
            )
            process.start()
        finally:
            channel.close()  # the worker has its own copy
        log.info("started worker %d", process.pid)
        return process

    def _on_signal(self, sig: int, frame: FrameType | None) -> None:
        self._stop_signals.append(sig)

    def run(self) -> int:
        self.balancer = balancer = Balancer(listen_socket(self.config))
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        self._processes = [self._spawn(slot) for slot in range(self.workers)]
        forwarded = 0
        rc = 0
        restarts: list[float] = []
        reaped: set[int] = set()
        while True:
            balancer.poll(0.2)  # connections in, each to the least loaded worker
            if len(self._stop_signals) > forwarded:
                sig = self._stop_signals[forwarded]
                forwarded += 1
                log.info("received %s: workers drain and stop", signal.Signals(sig).name)
                for process in self._processes:
                    if process.is_alive():
                        os.kill(process.pid, sig)
            stopping = forwarded > 0
            for index, process in enumerate(self._processes):
                if process.exitcode is None or process.pid in reaped:
                    continue  # running, or already dealt with
                reaped.add(process.pid)
                balancer.detach(index)
                _mark_dead(process.pid)
                if self.redis_url and process.exitcode != 0:
                    # Its calls' lines, now rather than when their leases expire.
                    freed = free_worker_leases(self.redis_url, self.redis_namespace, process.pid)
                    if freed:
                        log.warning("freed %d line(s) of dead worker %d", freed, process.pid)
                if stopping:
                    continue
                if process.exitcode == STARTUP_FAILURE:
                    log.error("worker %d failed to start; stopping", process.pid)
                    self._stop_signals.append(signal.SIGTERM)
                    rc = 1
                    continue
                now = time.monotonic()
                restarts = [t for t in restarts if now - t < 60] + [now]
                if len(restarts) > 5 * self.workers:
                    log.error("workers keep dying; stopping")
                    self._stop_signals.append(signal.SIGTERM)
                    rc = 1
                    continue
                log.warning("worker %d died (exit %s); starting another", process.pid,
                            process.exitcode)
                self._processes[index] = self._spawn(index)
            if stopping and not any(p.is_alive() for p in self._processes):
                break
        for process in self._processes:
            process.join(timeout=1)
        balancer.close()
        log.info("all workers stopped")
        return rc


def _mark_dead(pid: int | None) -> None:
    if pid is not None and os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)


def share_login_secret(workers: int, environ: dict[str, str] | None = None) -> None:
    """Several workers must sign viewer logins with one key, or a login made on one worker
    is refused by the next: without `UI_SECRET`, make one for this run and hand it to them
    (through the environment they read their settings from; never logged)."""
    env = os.environ if environ is None else environ
    if workers > 1 and not env.get("UI_SECRET"):
        env["UI_SECRET"] = secrets.token_urlsafe(32)
        log.info("UI_SECRET is unset: %d workers share a random one for this run (viewer "
                 "logins end when the server restarts; set UI_SECRET to keep them)", workers)


def serve(
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    workers: int = 1,
    grace_s: float = 30.0,
    log_level: str = "info",
    ws_max_size: int = 64 * 1024,
    factory: str = FACTORY,
    redis_url: str | None = None,
    sqlite_url: str | None = None,
    redis_namespace: str = "voicebot",
) -> int:
    """Serve until SIGTERM/SIGINT, then drain; returns the process exit code.

    `sqlite_url`: the embedded SQLite database, brought to the newest schema here, once,
    before several workers start (each worker's start-up would otherwise race to create the
    same tables)."""
    if workers > 1 and sqlite_url:
        from db.migrate import upgrade_to_head

        upgrade_to_head(sqlite_url)
    if workers > 1 and not redis_url:
        log.warning("%d workers without REDIS_URL: MAX_CONCURRENT_CALLS holds per worker and "
                    "the viewer shows each worker's own calls; set REDIS_URL to share them",
                    workers)
    share_login_secret(workers)
    os.environ[LISTEN_HOST_ENV] = host
    metrics_dir: str | None = None
    if workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        metrics_dir = tempfile.mkdtemp(prefix="voicebot-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    config = uvicorn.Config(
        factory, factory=True, host=host, port=port, workers=workers,
        log_level=log_level.lower(), ws_max_size=ws_max_size, proxy_headers=False,
        lifespan="on", timeout_graceful_shutdown=5, ws=DirectTextProtocol,
    )
    try:
        if workers <= 1:
            DrainingServer(config, grace_s).run()
            return 0
        return Supervisor(config, workers, grace_s, log_level, redis_url, redis_namespace).run()
    finally:
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m voicebot.workers`: what `voicebot serve` runs (also used by tests)."""
    from voicebot.settings import load_settings

    parser = argparse.ArgumentParser(prog="voicebot-serve", description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--factory", default=FACTORY, help="module:function building the app")
    args = parser.parse_args(argv)
    settings = load_settings()
    logging.basicConfig(level=settings.log_level.upper(), format=LOG_FORMAT, stream=sys.stderr)
    return serve(host=args.host, port=args.port, workers=max(1, args.workers),
                 grace_s=float(getattr(settings, "drain_grace_s", 30.0)),
                 log_level=settings.log_level, ws_max_size=settings.max_message_bytes,
                 factory=args.factory, redis_url=settings.redis_url,
                 sqlite_url=settings.database_url if settings.sqlite_path else None,
                 redis_namespace=settings.redis_namespace)


if __name__ == "__main__":
    sys.exit(main())
