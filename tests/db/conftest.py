"""Fixtures for storage tests: a migrated database on SQLite and on real PostgreSQL."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, text
from sqlalchemy.ext.asyncio import AsyncEngine

from db.engine import create_db_engine
from db.migrate import upgrade_to_head_async
from db.repository import CallRepository
from tests.conftest_db import (
    create_pg_database,
    drop_pg_database,
    migrated_sqlite_url,
    pg_url,
)
from tests.fakes.tcp_proxy import TcpProxy

PgDatabases = Callable[[], Awaitable[str]]


@pytest.fixture(scope="session")
async def pg_databases() -> AsyncIterator[PgDatabases]:
    """Creates fresh PostgreSQL databases on demand; drops them all when the session ends."""
    created: list[str] = []

    async def make() -> str:
        name = await create_pg_database()
        created.append(name)
        return pg_url(name)

    yield make
    for name in created:
        await drop_pg_database(name)


@pytest.fixture(scope="session")
async def pg_migrated_url(pg_databases: PgDatabases) -> str:
    url = await pg_databases()
    await upgrade_to_head_async(url)
    return url


@pytest.fixture
async def pg_clean_url(pg_migrated_url: str) -> str:
    """The session's migrated PostgreSQL database, emptied for this test."""
    engine = create_db_engine(pg_migrated_url)
    async with engine.begin() as connection:
        await connection.execute(
            text("TRUNCATE calls, utterances, turn_metrics, call_events RESTART IDENTITY CASCADE")
        )
    await engine.dispose()
    return pg_migrated_url


@pytest.fixture
async def sqlite_url(tmp_path: Path) -> str:
    return await migrated_sqlite_url(tmp_path)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest) -> str:
    """A migrated, empty database: once on SQLite, once on PostgreSQL."""
    name = "sqlite_url" if request.param == "sqlite" else "pg_clean_url"
    return str(request.getfixturevalue(name))


@pytest.fixture
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_db_engine(database_url)
    yield engine
    await engine.dispose()


@pytest.fixture
def repository(engine: AsyncEngine) -> CallRepository:
    return CallRepository(engine)


@pytest.fixture
async def pg_proxy() -> AsyncIterator[TcpProxy]:
    proxy = TcpProxy()
    await proxy.up()
    yield proxy
    await proxy.down()


class SqlCounter:
    """Counts the commits and SQL statements (an executemany counts once) on an engine."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.commits = self.statements = 0
        event.listen(engine.sync_engine, "commit", self._commit)
        event.listen(engine.sync_engine, "before_cursor_execute", self._statement)

    def _commit(self, *_: Any) -> None:
        self.commits += 1

    def _statement(self, *_: Any) -> None:
        self.statements += 1
