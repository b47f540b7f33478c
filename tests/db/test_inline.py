"""SQLite writes in one thread hop per transaction (db/inline.py), on a real file database."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from datetime import UTC, datetime

import pytest
from sqlalchemy import select, text
from sqlalchemy.exc import IntegrityError

from db.engine import create_db_engine
from db.inline import InlineSession, InlineWriter, drive
from db.models import Call
from db.repository import CallNotFound, CallRepository

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


async def test_a_file_database_writes_through_its_writer_thread(sqlite_url: str) -> None:
    engine = create_db_engine(sqlite_url)
    try:
        writer = InlineWriter.for_engine(engine)
        assert writer is not None and InlineWriter.for_engine(engine) is writer
        seen: list[str] = []

        async def work(session: InlineSession) -> int:
            seen.append(threading.current_thread().name)
            await session.execute(text("INSERT INTO calls (call_sid, status, started_at, "
                                       "created_at) VALUES ('CA1', 'queued', :t, :t)"),
                                  {"t": T0})
            return 7

        assert await writer.transaction(work) == 7
        assert seen[0].startswith("sqlite-writer") and seen[0] != threading.current_thread().name
        # Committed: the async engine (another connection) reads it at once.
        repo = CallRepository(engine)
        assert (await repo.get_call("CA1")).call.status == "queued"
    finally:
        await engine.dispose()


async def test_a_failed_transaction_is_rolled_back_and_raises_here(sqlite_url: str) -> None:
    engine = create_db_engine(sqlite_url)
    try:
        writer = InlineWriter.for_engine(engine)
        assert writer is not None
        insert = text("INSERT INTO calls (call_sid, status, started_at, created_at) "
                      "VALUES (:sid, 'queued', :t, :t)")

        async def twice(session: InlineSession) -> None:
            await session.execute(insert, {"sid": "CA2", "t": T0})
            await session.execute(insert, {"sid": "CA1", "t": T0})
            await session.execute(insert, {"sid": "CA1", "t": T0})  # call_sid is unique

        with pytest.raises(IntegrityError):
            await writer.transaction(twice)

        async def count(session: InlineSession) -> int:
            return len(list(await session.scalars(select(Call.call_sid))))

        assert await writer.transaction(count) == 0  # CA2 went with the rest
    finally:
        await engine.dispose()


async def test_work_that_suspends_is_refused_and_leaves_nothing_behind(sqlite_url: str) -> None:
    engine = create_db_engine(sqlite_url)
    try:
        writer = InlineWriter.for_engine(engine)
        assert writer is not None

        async def suspends(session: InlineSession) -> None:
            await session.execute(text("INSERT INTO calls (call_sid, status, started_at, "
                                       "created_at) VALUES ('CA1', 'queued', :t, :t)"),
                                  {"t": T0})
            await asyncio.sleep(0)  # not a statement: there is no event loop in the thread

        with pytest.raises(RuntimeError, match="other than a statement"):
            await writer.transaction(suspends)
        with pytest.raises(CallNotFound):
            await CallRepository(engine).get_call("CA1")
    finally:
        await engine.dispose()


def test_drive_returns_what_a_coroutine_that_never_suspends_returns() -> None:
    async def plain() -> str:
        return "done"

    assert drive(plain()) == "done"


async def test_the_event_loop_runs_while_a_write_waits_for_the_file(sqlite_url: str) -> None:
    engine = create_db_engine(sqlite_url)
    other = sqlite3.connect(sqlite_url.removeprefix("sqlite:///"), isolation_level=None)
    try:
        repo = CallRepository(engine)
        other.execute("BEGIN IMMEDIATE")  # another process holds the write lock
        write = asyncio.create_task(repo.update_status("CA1", "ringing", at=T0))
        ticks = 0
        started = time.monotonic()
        while time.monotonic() - started < 0.3:
            await asyncio.sleep(0.01)
            ticks += 1
        assert not write.done()  # waiting on SQLite's busy timeout, in the writer's thread
        assert ticks >= 15  # ... while the loop went round every 10 ms or so
        other.execute("COMMIT")
        await asyncio.wait_for(write, 5)
        assert (await repo.get_call("CA1")).call.status == "ringing"
    finally:
        other.close()
        await engine.dispose()


async def test_writes_go_on_after_the_engine_is_disposed(sqlite_url: str) -> None:
    engine = create_db_engine(sqlite_url)
    repo = CallRepository(engine)
    await repo.update_status("CA1", "ringing", at=T0)
    await engine.dispose()  # closes the writer's thread and connection too
    await repo.update_status("CA1", "in-progress", at=T0)
    assert (await repo.get_call("CA1")).call.status == "in-progress"
    await engine.dispose()


async def test_an_in_memory_database_keeps_the_async_path() -> None:
    engine = create_db_engine("sqlite://")
    try:
        assert InlineWriter.for_engine(engine) is None
    finally:
        await engine.dispose()
