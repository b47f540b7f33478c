"""SQLite writes in one thread hop per transaction.

Through aiosqlite every statement of a transaction is a round trip to its thread and back
through the event loop: a cursor, an execute, a fetch and a close each hand the call over and
wake the loop again. A batch of a tenth of a second's events took about 30 of them and 2.6 ms
of CPU before its first event (`bench/db_write.py --calls 8` against `--calls 50`). On a file
database `InlineWriter` runs the whole transaction in one thread of its own instead, on a
synchronous connection to the same file: the event loop hands it over once and is woken once.

The transaction's code stays the one `db.writes.CallWrites` runs on PostgreSQL: its statements
are awaited, and `InlineSession` answers each await at once from the synchronous session, so
the coroutine finishes without ever suspending and is driven to its end in the thread
(`drive`). The viewer's reads keep the async engine; SQLite's WAL lets them read while this
connection writes, and its busy timeout makes the two writers wait for each other.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Awaitable, Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import Result
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.orm import Session, sessionmaker

from db.engine import sqlite_file, sqlite_on_connect

T = TypeVar("T")

_WRITERS: weakref.WeakKeyDictionary[Engine, InlineWriter] = weakref.WeakKeyDictionary()


class InlineSession:
    """What `CallWrites` awaits of a session, answered at once by a synchronous one."""

    def __init__(self, session: Session) -> None:
        self._session = session

    async def execute(self, statement: Any, params: Any = None) -> Result[Any]:
        return self._session.execute(statement, params)

    async def scalars(self, statement: Any, params: Any = None) -> Any:
        return self._session.scalars(statement, params)


def drive(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine that never suspends (it awaits only `InlineSession`) to its end."""
    try:
        coroutine.send(None)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    coroutine.close()
    raise RuntimeError("an inline database write awaited something other than a statement")


class InlineWriter:
    """One thread and one synchronous connection that run a file database's writes."""

    def __init__(self, async_engine: AsyncEngine) -> None:
        url = async_engine.url.set(drivername="sqlite+pysqlite")
        # The only thread that uses it is this writer's own.
        self._engine = create_engine(url, connect_args={"check_same_thread": False})
        event.listen(self._engine, "connect", sqlite_on_connect)
        self._sessions = sessionmaker(self._engine, expire_on_commit=False)
        self._thread: ThreadPoolExecutor | None = None  # started by the first write

    @property
    def engine(self) -> Engine:
        """The synchronous engine the writes go through (for event listeners)."""
        return self._engine

    @classmethod
    def for_engine(cls, async_engine: AsyncEngine) -> InlineWriter | None:
        """The writer of this engine's file (one per engine, closed with it), or None when
        the engine is not a file SQLite database's."""
        if sqlite_file(async_engine.url) is None:
            return None
        sync_engine = async_engine.sync_engine
        writer = _WRITERS.get(sync_engine)
        if writer is None:
            writer = _WRITERS[sync_engine] = cls(async_engine)
            event.listen(sync_engine, "engine_disposed", lambda _engine: writer.close())
        return writer

    async def transaction(self, work: Callable[[InlineSession], Awaitable[T]]) -> T:
        """`work` in one transaction in the writer's thread: committed when it returns,
        rolled back when it raises (the exception comes back here). If the caller is
        cancelled meanwhile, the transaction still ends in the thread, committed or not, as
        a statement in flight would: writes are idempotent, so a retry is safe."""
        if self._thread is None:
            self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-writer")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._thread, self._run, work)

    def _run(self, work: Callable[[InlineSession], Awaitable[T]]) -> T:
        with self._sessions() as session, session.begin():
            return drive(work(InlineSession(session)))  # type: ignore[arg-type]

    def close(self) -> None:
        """Let the thread finish what it was given, then close the connection (with its
        engine's: a write after that starts them again, as the engine's pool does)."""
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.shutdown(wait=True)
        self._engine.dispose()
