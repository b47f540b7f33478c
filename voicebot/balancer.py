"""Least-connections balancing: the supervisor accepts, the worker with the fewest open
connections serves.

With one listening socket per worker (SO_REUSEPORT), the kernel picks a worker by a hash of
the caller's address and port: even on average, but blind to load. On the capacity benchmark
it split 500 calls as unevenly as 217 against 284, and a server's capacity is that of its
busiest worker. So with several workers the supervisor owns the one listening socket
(`Balancer`). It accepts each connection and hands its descriptor (SCM_RIGHTS, over a Unix
socket pair per worker) to the worker with the fewest connections open or on their way, as
nginx's `least_conn` does across servers. The worker (`Inbox`) wraps it in its event loop
with `loop.connect_accepted_socket`, exactly as if it had accepted it itself.

Each worker reports back on the same socket pair whenever it changes: how many connections
it has been handed so far, how many it has open, and whether it is refusing new calls (its
event loop or work queues are full, or it is draining). The supervisor adds what it has
handed since that report, so a burst of calls is spread by the count of the moment, not by
a report 100 ms old; and a worker that refuses gets a connection only when every worker
does (the caller then hears that the lines are busy), instead of turning away a call another
worker would have taken. A worker that has not taken a connection handed to it for a
second (its event loop is blocked) is passed over until it does.

A worker is handed nothing before its first report (its app has started), nor once its
socket pair has closed (it is shutting down, or dead). While no worker can take a
connection the supervisor stops accepting, and callers wait in the kernel's backlog, as they
would for a single server that is busy starting.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import selectors
import socket
import struct
import time
from collections.abc import Callable, Collection
from typing import Any

log = logging.getLogger(__name__)

# Worker -> supervisor: connections received so far, connections open (or being set up) now,
# flags (REFUSING).
REPORT = struct.Struct("=QII")
REFUSING = 1  # the worker would refuse a new call now (overloaded or draining)
# Supervisor -> worker: one byte of payload carrying one descriptor.
HAND = b"C"
# Connections accepted per wake-up before the supervisor reads reports again.
ACCEPT_BATCH = 64
# A worker that has not taken a connection handed to it for this long is stalled (its event
# loop is blocked): it is passed over while another worker takes connections.
STALLED_S = 1.0
# Errors sending to a worker that mean its end is gone (others, such as too many descriptors
# in flight, pass over it for this connection only).
GONE = frozenset({errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.EBADF})


class WorkerLink:
    """The supervisor's end of one worker's socket pair, and what it knows of its load."""

    def __init__(self, slot: int, sock: socket.socket) -> None:
        self.slot = slot
        self.sock = sock
        self.ready = False  # its first report has come: its app has started
        self.handed = 0  # connections sent to it
        self.received = 0  # ... of which it had received at its last report
        self.open = 0  # connections it had open at its last report
        self.refusing = False  # ... and whether it was refusing new calls
        # Since when a connection handed to it has waited to be taken (None: none waits).
        self.waiting_since: float | None = None
        self.stall_logged = False

    def stalled(self, now: float) -> bool:
        return self.waiting_since is not None and now - self.waiting_since > STALLED_S

    @property
    def load(self) -> int:
        """Connections open at the last report, plus those handed since."""
        return self.open + self.handed - self.received


class Balancer:
    """The supervisor's side: one listening socket, a socket pair per worker slot."""

    def __init__(self, listener: socket.socket) -> None:
        listener.setblocking(False)
        self.listener = listener
        self._selector = selectors.DefaultSelector()
        self._links: dict[int, WorkerLink] = {}
        self._pending: socket.socket | None = None  # accepted, not yet taken by a worker
        self._listening = False

    def attach(self, slot: int) -> socket.socket:
        """A new socket pair for the worker in `slot` (replacing its last one): the end the
        worker process is to get. The caller closes its copy once the worker has started."""
        self.detach(slot)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ours.setblocking(False)
        link = WorkerLink(slot, ours)
        self._links[slot] = link
        self._selector.register(ours, selectors.EVENT_READ, link)
        return theirs

    def detach(self, slot: int) -> None:
        """Hand nothing more to the worker in `slot` (it has exited)."""
        link = self._links.pop(slot, None)
        if link is not None:
            self._selector.unregister(link.sock)
            link.sock.close()

    def loads(self) -> dict[int, int]:
        """Each ready worker's load, by slot."""
        return {slot: link.load for slot, link in self._links.items() if link.ready}

    def refusing(self) -> set[int]:
        """The ready workers that last reported refusing new calls, by slot."""
        return {slot for slot, link in self._links.items() if link.ready and link.refusing}

    def poll(self, timeout: float) -> None:
        """Wait up to `timeout` seconds, then accept and hand over what has come, and read
        the workers' reports."""
        if self._pending is not None and self._hand(self._pending):
            self._pending = None
        self._listen(self._pending is None and any(link.ready for link in self._links.values()))
        for key, _ in self._selector.select(timeout):
            if key.data is None:
                self._accept()
            else:
                self._read_reports(key.data)

    def close(self) -> None:
        """Close every socket pair, the listener and a connection no worker took."""
        for slot in list(self._links):
            self.detach(slot)
        self._listen(False)
        self._selector.close()
        if self._pending is not None:
            self._pending.close()
            self._pending = None
        self.listener.close()

    def _listen(self, on: bool) -> None:
        if on and not self._listening:
            self._selector.register(self.listener, selectors.EVENT_READ, None)
        elif self._listening and not on:
            self._selector.unregister(self.listener)
        self._listening = on

    def _accept(self) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                conn, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # out of descriptors, or the caller already left
                log.warning("accepting a connection failed: %s", exc)
                return
            if not self._hand(conn):
                self._pending = conn  # tried again on the next poll; accept no more till then
                self._listen(False)
                return

    def _hand(self, conn: socket.socket) -> bool:
        """Send `conn` to the least loaded ready worker that is neither stalled nor refusing
        calls (or, when none is, to the least loaded of the rest); False when none could take
        it."""
        now = time.monotonic()
        ready = sorted((link for link in self._links.values() if link.ready),
                       key=lambda link: (link.stalled(now), link.refusing, link.load,
                                         link.handed))
        for link in ready:
            if link.stalled(now) and not link.stall_logged:
                link.stall_logged = True
                log.warning("worker slot %d has not taken a connection for %.1f s (its event "
                            "loop is blocked): passed over while another can take them",
                            link.slot, now - (link.waiting_since or now))
        for link in ready:
            try:
                socket.send_fds(link.sock, [HAND], [conn.fileno()], socket.MSG_DONTWAIT)
            except BlockingIOError:
                continue  # its queue is full (it is not reading): the next one
            except OSError as exc:
                if exc.errno in GONE:
                    log.warning("worker slot %d stopped taking connections: %s", link.slot, exc)
                    self.detach(link.slot)
                else:
                    log.warning("handing a connection to worker slot %d failed: %s",
                                link.slot, exc)
                continue
            if link.waiting_since is None:
                link.waiting_since = now
            link.handed += 1
            conn.close()  # the worker has its own descriptor now
            return True
        return False

    def _read_reports(self, link: WorkerLink) -> None:
        while True:
            try:
                data = link.sock.recv(REPORT.size + 1)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if not data:  # the worker closed its end: shutting down, or gone
                if self._links.get(link.slot) is link:
                    self.detach(link.slot)
                return
            if len(data) == REPORT.size:
                link.received, link.open, flags = REPORT.unpack(data)
                link.refusing = bool(flags & REFUSING)
                # It has just read its queue: what waits now was handed after that.
                link.waiting_since = time.monotonic() if link.received < link.handed else None
                link.stall_logged = False
                if not link.ready:
                    link.ready = True
                    log.info("worker slot %d is taking connections", link.slot)


class Inbox:
    """A worker's side: takes the connections the supervisor hands over and reports its load.

    `connections` gives the connections the server has open (uvicorn's
    `server_state.connections`: each one's protocol); `protocol_factory` makes the protocol
    for a new one, as the server's own listener would; `refusing` says whether the worker
    would refuse a new call now (the app's admission control)."""

    def __init__(self, channel: socket.socket, protocol_factory: Callable[[], asyncio.Protocol],
                 connections: Callable[[], Collection[object]], ssl: Any = None,
                 refusing: Callable[[], bool] | None = None) -> None:
        self._channel = channel
        self._protocol_factory = protocol_factory
        self._connections = connections
        self._ssl = ssl
        self._refusing = refusing
        self._loop: asyncio.AbstractEventLoop | None = None
        # Connections being set up: each task's protocol once it is made. A connection is
        # in the server's set from its `connection_made` on, a loop round or two before its
        # task ends; `open_count` counts it once all along, neither missed nor twice.
        self._starting: dict[asyncio.Task[None], list[asyncio.Protocol]] = {}
        self._reported: tuple[int, int, int] | None = None
        self.received = 0

    def start(self) -> None:
        """Take connections from now on, and report (this first report makes the worker
        ready for them)."""
        self._loop = asyncio.get_running_loop()
        self._channel.setblocking(False)
        self._loop.add_reader(self._channel.fileno(), self._on_readable)
        self.report()

    @property
    def closed(self) -> bool:
        return self._channel.fileno() < 0

    def report(self) -> None:
        """Tell the supervisor what changed since the last report (nothing when nothing did;
        called after each hand-over and on the server's tick)."""
        if self.closed:
            return
        flags = REFUSING if self._refusing is not None and self._refusing() else 0
        state = (self.received, self.open_count(), flags)
        if state == self._reported:
            return
        try:
            self._channel.send(REPORT.pack(*state), socket.MSG_DONTWAIT)
        except BlockingIOError:
            return  # the supervisor is behind: the next tick tries again
        except OSError:
            self.close()
            return
        self._reported = state

    def open_count(self) -> int:
        """Connections open, or received and on their way to being served."""
        connections = self._connections()
        starting = sum(1 for made in self._starting.values()
                       if not made or made[0] not in connections)
        return len(connections) + starting

    def close(self) -> None:
        """Take no more connections (the supervisor sees the socket pair close and hands
        them to the other workers)."""
        if self.closed:
            return
        if self._loop is not None:
            self._loop.remove_reader(self._channel.fileno())
        self._channel.close()

    def _on_readable(self) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                data, fds, flags, _ = socket.recv_fds(self._channel, len(HAND), 4)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                log.warning("the supervisor's socket pair failed: %s", exc)
                self.close()
                return
            if not data and not fds:
                log.warning("the supervisor closed its socket pair: no more connections")
                self.close()
                return
            self.received += 1
            if flags & socket.MSG_CTRUNC:
                log.error("a connection was lost on its way to this worker: no descriptor "
                          "left for it (raise the open-files limit, `ulimit -n`)")
            for index, fd in enumerate(fds):
                sock = socket.socket(fileno=fd)
                if index == 0:
                    self._serve(sock)
                else:
                    sock.close()  # one connection per message; anything else is not ours
        self.report()

    def _serve(self, sock: socket.socket) -> None:
        assert self._loop is not None
        sock.setblocking(False)
        made: list[asyncio.Protocol] = []
        task = self._loop.create_task(self._connect(sock, made))
        self._starting[task] = made
        task.add_done_callback(self._forget)

    def _forget(self, task: asyncio.Task[None]) -> None:
        self._starting.pop(task, None)

    async def _connect(self, sock: socket.socket, made: list[asyncio.Protocol]) -> None:
        assert self._loop is not None

        def protocol() -> asyncio.Protocol:
            made.append(self._protocol_factory())
            return made[0]

        try:
            await self._loop.connect_accepted_socket(protocol, sock, ssl=self._ssl)
        except asyncio.CancelledError:
            sock.close()
            raise
        except Exception as exc:  # the caller left already, or a TLS handshake failed
            log.debug("a handed connection did not start: %s", exc)
            sock.close()
