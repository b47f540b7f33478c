"""Alembic owns the schema: migrations and models must agree, and migrations must reverse."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect

from db.engine import create_db_engine
from db.migrate import (
    current_revision_async,
    downgrade_async,
    upgrade_to_head,
    upgrade_to_head_async,
)
from db.models import Base
from tests.db.conftest import PgDatabases

TABLES = {"calls", "utterances", "turn_metrics", "call_events"}


@pytest.fixture
async def pg_empty_url(pg_databases: PgDatabases) -> str:
    return await pg_databases()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def empty_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A database with no tables at all (a fresh one per test on PostgreSQL too)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'empty.db'}"
    return str(request.getfixturevalue("pg_empty_url"))


async def _tables(url: str) -> set[str]:
    engine = create_db_engine(url)
    try:
        async with engine.connect() as connection:
            names = await connection.run_sync(lambda sync: inspect(sync).get_table_names())
    finally:
        await engine.dispose()
    return set(names) - {"alembic_version"}


async def test_models_and_migrations_agree(empty_url: str) -> None:
    await upgrade_to_head_async(empty_url)
    engine = create_db_engine(empty_url)
    try:
        async with engine.connect() as connection:
            diff = await connection.run_sync(
                lambda sync: compare_metadata(
                    MigrationContext.configure(sync, opts={"compare_type": True}), Base.metadata
                )
            )
    finally:
        await engine.dispose()
    assert diff == []


async def test_upgrade_downgrade_upgrade_round_trips(empty_url: str) -> None:
    await upgrade_to_head_async(empty_url)
    assert await _tables(empty_url) == TABLES
    head = await current_revision_async(empty_url)
    assert head is not None

    await downgrade_async(empty_url, "base")
    assert await _tables(empty_url) == set()
    assert await current_revision_async(empty_url) is None

    await upgrade_to_head_async(empty_url)
    assert await _tables(empty_url) == TABLES
    assert await current_revision_async(empty_url) == head


async def test_upgrade_works_from_another_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    # The blocking form, as `voicebot db upgrade` calls it (no event loop in its thread).
    await asyncio.to_thread(upgrade_to_head, url)
    assert await _tables(url) == TABLES
