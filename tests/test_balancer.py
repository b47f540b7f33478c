"""`voicebot serve --workers N`: the supervisor accepts, the least loaded worker serves.

The unit tests drive a `Balancer` against worker ends played by the test (reports written,
descriptors read, by hand); the `Inbox` test runs a worker's side on a real event loop; the
last test counts, from /proc, which worker process holds each connection of a real
two-worker server.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn

from tests.serverkit import (
    ServerProcess,
    client_ports_held_by,
    connections_by_pid,
    eventually,
)
from voicebot import balancer as balancer_module
from voicebot.balancer import HAND, REFUSING, REPORT, Balancer, Inbox
from voicebot.workers import listen_socket


def _config(port: int = 0) -> uvicorn.Config:
    return uvicorn.Config("voicebot.workers:create_app_from_env", host="127.0.0.1", port=port)


@pytest.fixture
def balancer() -> Iterator[Balancer]:
    balancer = Balancer(listen_socket(_config()))
    try:
        yield balancer
    finally:
        balancer.close()


def _port(balancer: Balancer) -> int:
    return int(balancer.listener.getsockname()[1])


def _report(worker: socket.socket, received: int, open_now: int, *,
            refusing: bool = False) -> None:
    worker.send(REPORT.pack(received, open_now, REFUSING if refusing else 0))


def _take(worker: socket.socket) -> list[socket.socket]:
    """The connections handed to this worker end so far."""
    taken = []
    worker.setblocking(False)
    while True:
        try:
            data, fds, _, _ = socket.recv_fds(worker, 16, 4)
        except BlockingIOError:
            return taken
        assert data == HAND and len(fds) == 1
        taken.append(socket.socket(fileno=fds[0]))


def _connect_and_hand(balancer: Balancer, count: int) -> list[socket.socket]:
    """Connect `count` clients one by one, each handed over before the next connects."""
    clients = []
    for _ in range(count):
        clients.append(socket.create_connection(("127.0.0.1", _port(balancer))))
        before = sum(link.handed for link in balancer._links.values())
        deadline = time.monotonic() + 5
        while sum(link.handed for link in balancer._links.values()) == before:
            assert time.monotonic() < deadline, "the connection was not handed over"
            balancer.poll(0.05)
    return clients


def _close(sockets: list[socket.socket]) -> None:
    for sock in sockets:
        sock.close()


def test_each_connection_goes_to_the_worker_with_the_fewest_open(balancer: Balancer) -> None:
    """Worker 0 reports 4 connections open, worker 1 none: the next 4 go to worker 1, and
    from there on the two take turns (the kernel's hash would have split them by chance)."""
    first, second = balancer.attach(0), balancer.attach(1)
    _report(first, 0, 4)
    _report(second, 0, 0)
    balancer.poll(0.1)
    assert balancer.loads() == {0: 4, 1: 0}
    clients = _connect_and_hand(balancer, 8)
    to_first, to_second = _take(first), _take(second)
    assert (len(to_first), len(to_second)) == (2, 6)
    assert balancer.loads() == {0: 6, 1: 6}
    # What a worker was handed is a working connection: the client's bytes arrive on it.
    clients[-1].sendall(b"ping")
    received = [conn for conn in to_first + to_second if _reads(conn) == b"ping"]
    assert len(received) == 1
    _close(clients + to_first + to_second + [first, second])


def _reads(conn: socket.socket) -> bytes:
    conn.settimeout(0.2)
    try:
        return conn.recv(16)
    except TimeoutError:
        return b""


def test_closed_connections_count_from_the_workers_next_report(balancer: Balancer) -> None:
    """Worker 0's calls ended (its report says so): new calls go to it until it is level."""
    first, second = balancer.attach(0), balancer.attach(1)
    _report(first, 0, 0)
    _report(second, 0, 0)
    balancer.poll(0.1)
    clients = _connect_and_hand(balancer, 6)
    to_first, to_second = _take(first), _take(second)
    assert (len(to_first), len(to_second)) == (3, 3)
    _report(first, 3, 0)  # all three of its connections closed
    _report(second, 3, 3)
    clients += _connect_and_hand(balancer, 3)
    assert (len(_take(first)), len(_take(second))) == (3, 0)
    _close(clients + to_first + to_second + [first, second])


def test_a_worker_refusing_calls_gets_one_only_when_every_worker_does(
        balancer: Balancer) -> None:
    """Worker 0 has fewer connections but is shedding (its event loop is full) or draining:
    new calls go to worker 1, which would admit them. Once worker 1 refuses too, the least
    loaded gets it again (and answers that the lines are busy)."""
    first, second = balancer.attach(0), balancer.attach(1)
    taken: list[socket.socket] = []

    def split(count: int) -> tuple[int, int]:
        balancer.poll(0.1)  # the reports first
        clients.extend(_connect_and_hand(balancer, count))
        to_first, to_second = _take(first), _take(second)
        taken.extend(to_first + to_second)
        return len(to_first), len(to_second)

    clients: list[socket.socket] = []
    _report(first, 0, 2, refusing=True)
    _report(second, 0, 9)
    assert split(3) == (0, 3)
    assert balancer.refusing() == {0}
    _report(second, 3, 12, refusing=True)
    assert split(2) == (2, 0)
    _report(first, 2, 4)  # no longer shedding
    assert split(1) == (1, 0)
    _close([*clients, *taken, first, second])


def test_nothing_is_accepted_until_a_worker_is_ready(balancer: Balancer) -> None:
    """A caller who connects while the workers start waits in the kernel's backlog and is
    handed over once the first worker reports."""
    worker = balancer.attach(0)
    client = socket.create_connection(("127.0.0.1", _port(balancer)))
    balancer.poll(0.2)
    assert _take(worker) == [] and balancer.loads() == {}
    _report(worker, 0, 0)
    for _ in range(3):
        balancer.poll(0.1)
    [conn] = _take(worker)
    client.sendall(b"hello")
    assert _reads(conn) == b"hello"
    _close([client, conn, worker])


def test_a_worker_that_closes_its_end_is_handed_nothing_more(balancer: Balancer) -> None:
    """A worker shutting down (or dead) closes its socket pair; the others take its share."""
    first, second = balancer.attach(0), balancer.attach(1)
    _report(first, 0, 0)
    _report(second, 0, 0)
    balancer.poll(0.1)
    first.close()
    balancer.poll(0.1)
    assert balancer.loads() == {1: 0}
    clients = _connect_and_hand(balancer, 4)
    taken = _take(second)
    assert len(taken) == 4
    _close(clients + taken + [second])


def test_a_worker_whose_queue_is_full_is_passed_over(balancer: Balancer) -> None:
    """A worker that stops reading (stuck) does not hold up callers: once its socket pair's
    queue is full, connections go to the next one."""
    first, second = balancer.attach(0), balancer.attach(1)
    _report(first, 0, 0)
    _report(second, 0, 1_000_000)  # worker 1 looks far busier: all go to 0 while it can
    balancer.poll(0.1)
    # A small send buffer on worker 0's pair, so that its queue fills after a few.
    balancer._links[0].sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    clients = []
    deadline = time.monotonic() + 20
    while not _take_some(second, clients):
        assert time.monotonic() < deadline, "worker 1 was never handed a connection"
        clients += _connect_and_hand(balancer, 1)
    assert len(clients) > 2  # worker 0's queue held some before it was full
    _close(clients + _take(first) + [first, second])


def _take_some(worker: socket.socket, into: list[socket.socket]) -> bool:
    taken = _take(worker)
    into += taken
    return bool(taken)


def test_a_worker_that_stops_taking_connections_is_passed_over(
        balancer: Balancer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A worker whose event loop is blocked leaves what it was handed in its queue: after
    `STALLED_S` it is passed over, though it has fewer connections; once it takes them (and
    reports), it is back."""
    monkeypatch.setattr(balancer_module, "STALLED_S", 0.2)
    first, second = balancer.attach(0), balancer.attach(1)
    _report(first, 0, 0)
    _report(second, 0, 5)
    balancer.poll(0.1)
    clients = _connect_and_hand(balancer, 1)  # to worker 0, which does not take it
    time.sleep(0.3)
    clients += _connect_and_hand(balancer, 2)
    assert "worker slot 0 has not taken a connection" in caplog.text
    to_first, to_second = _take(first), _take(second)
    assert (len(to_first), len(to_second)) == (1, 2)  # the one it had waited in its queue
    _report(first, 1, 1)  # it took it: no longer stalled
    balancer.poll(0.1)
    clients += _connect_and_hand(balancer, 1)
    taken = _take(first)
    assert len(taken) == 1 and _take(second) == []
    _close([*clients, *to_first, *to_second, *taken, first, second])


def test_a_port_another_server_listens_on_is_refused_not_shared() -> None:
    """The supervisor's socket is bound without SO_REUSEPORT: a second server on the same
    port fails at start-up instead of quietly taking half of the first one's calls."""
    first = listen_socket(_config())
    try:
        with pytest.raises(SystemExit):
            listen_socket(_config(first.getsockname()[1]))
    finally:
        first.close()


_ECHOING: set[asyncio.Protocol] = set()  # the open `_Echo`s, as uvicorn keeps its connections


class _Echo(asyncio.Protocol):
    """Echoes what it reads."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        _ECHOING.add(self)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[attr-defined]

    def connection_lost(self, exc: Exception | None) -> None:
        _ECHOING.discard(self)


async def test_the_inbox_serves_handed_connections_on_its_loop_and_reports_them() -> None:
    """A worker's side: each handed connection is served by the protocol, on the worker's
    event loop, and the supervisor (polling in a thread, as in its own process) learns how
    many are open, and when they close."""
    balancer = Balancer(listen_socket(_config()))
    shedding = False
    inbox = Inbox(balancer.attach(0), _Echo, lambda: _ECHOING,
                  refusing=lambda: shedding)
    stop = threading.Event()

    def supervise() -> None:
        while not stop.is_set():
            balancer.poll(0.02)

    supervisor = threading.Thread(target=supervise)
    supervisor.start()
    try:
        inbox.start()
        await eventually(lambda: balancer.loads() == {0: 0}, 5)
        clients = [await asyncio.wait_for(asyncio.open_connection("127.0.0.1",
                                                                  _port(balancer)), 5)
                   for _ in range(3)]
        for index, (reader, writer) in enumerate(clients):
            writer.write(b"call %d" % index)
            assert await asyncio.wait_for(reader.read(16), 5) == b"call %d" % index
        assert inbox.received == 3 and len(_ECHOING) == 3
        await eventually(lambda: balancer.loads() == {0: 3}, 5)
        for _, writer in clients[:2]:
            writer.close()
        await eventually(lambda: len(_ECHOING) == 1, 5)
        inbox.report()  # what the server's tick does
        await eventually(lambda: balancer.loads() == {0: 1}, 5)
        assert balancer.refusing() == set()
        shedding = True  # admission control starts shedding: the next tick says so
        inbox.report()
        await eventually(lambda: balancer.refusing() == {0}, 5)
        inbox.close()  # a worker that has closed its inbox gets nothing more
        await eventually(lambda: balancer.loads() == {}, 5)
        clients[2][1].close()
    finally:
        inbox.close()
        stop.set()
        await asyncio.to_thread(supervisor.join)
        balancer.close()


async def test_a_connection_on_its_way_is_counted_once_at_every_step() -> None:
    """From the moment its descriptor arrives to the end of its set-up task, a connection is
    counted exactly once: first as on its way, then as open (it joins the server's set a
    loop round or two before its task ends). Counted twice, a worker taking a burst looked
    busier than it was, and the burst's second half went to the other worker."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener = listen_socket(_config())
    inbox = Inbox(theirs, _Echo, lambda: _ECHOING)
    clients, counts = [], []
    try:
        inbox.start()
        for _ in range(4):
            clients.append(socket.create_connection(listener.getsockname()))
            conn, _ = listener.accept()
            socket.send_fds(ours, [HAND], [conn.fileno()])
            conn.close()
        deadline = time.monotonic() + 5
        while len(_ECHOING) < 4 or inbox._starting:  # one loop round at a time
            assert time.monotonic() < deadline
            counts.append((inbox.received, inbox.open_count()))
            await asyncio.sleep(0)
        received_then_open = [(n, n) for n in range(5)]
        assert set(counts) <= set(received_then_open), counts
        assert inbox.open_count() == 4
    finally:
        inbox.close()
        ours.close()
        listener.close()
        _close(clients)
        await asyncio.sleep(0.05)


# A real two-worker server.

@pytest.mark.slow
async def test_two_workers_hold_equal_shares_and_refill_the_emptier(tmp_path: Path) -> None:
    """20 connections split 10/10 (the kernel's hash: 18 % of the time). Then 8 of one
    worker's close, and the next 8 all go to it (the kernel's hash: 1 time in 256).
    Shedding at the event loop is off: a worker just started, busy loading models, reports
    that it refuses calls for a moment, and the other would take them all."""
    server = ServerProcess(tmp_path, {"DATABASE_URL": f"sqlite:///{tmp_path}/calls.db",
                                      "DB_SPOOL_DIR": str(tmp_path / "spool"),
                                      "LOG_LEVEL": "INFO", "SHED_LOOP_BUSY": "0"},
                           workers=2)
    await server.start()
    try:
        await eventually(lambda: all(f"worker slot {slot} is taking connections"
                                     in server.log() for slot in (0, 1)), 60)
        # A worker reports closed connections on its next tick (100 ms): the start-up
        # checks' connections are counted as gone once that has passed.
        await asyncio.sleep(0.3)
        clients = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(20)]

        def split() -> dict[int, int]:
            return connections_by_pid(server.port)

        await eventually(lambda: sum(split().values()) == 20, 10)
        assert sorted(split().values()) == [10, 10], split()
        # Close 8 of the first worker's: the clients whose server side that process holds.
        first_pid = min(split())
        ours = {w.get_extra_info("sockname")[1]: w for _, w in clients}
        closing = client_ports_held_by(first_pid, server.port)[:8]
        for port in closing:
            ours[port].close()
        await eventually(lambda: sorted(split().values()) == [2, 10], 10)
        await asyncio.sleep(0.3)  # the worker's next tick reports them closed
        clients += [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(8)]
        await eventually(lambda: sum(split().values()) == 20, 10)
        assert sorted(split().values()) == [10, 10], split()
        for _, writer in clients:
            writer.close()
    finally:
        server.kill()
