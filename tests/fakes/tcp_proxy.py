"""A loopback TCP proxy a test can take down and bring back (a server restart or a hang, as
the client sees it), for PostgreSQL and Redis outage tests."""

from __future__ import annotations

import asyncio
import contextlib

from tests.conftest_db import PG_HOST, PG_PORT


class TcpProxy:
    """A loopback TCP proxy in front of a server (PostgreSQL by default) that a test can take down and bring back.

    `down()` closes the listener and cuts every open connection (a database restart, as the
    client sees it); `blackhole = True` accepts connections and never answers (a hung server).
    """

    def __init__(self, target_host: str = PG_HOST, target_port: int = PG_PORT) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self.blackhole = False
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def up(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def down(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._writers):
            writer.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            if self.blackhole:
                await asyncio.Event().wait()
            up_reader, up_writer = await asyncio.open_connection(*self.target)
            self._writers.add(up_writer)
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            self._tasks.discard(task)
            writer.close()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    finally:
        with contextlib.suppress(OSError):
            writer.close()


