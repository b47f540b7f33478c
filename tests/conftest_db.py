"""Database helpers shared by `tests/db` and `tests/web` (plain functions, not fixtures).

PostgreSQL tests talk to the real server `.ci/run` starts (127.0.0.1:5432, user postgres, trust
auth). Each test session works in its own freshly created database, dropped at the end.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import asyncpg

from db.migrate import upgrade_to_head_async

PG_HOST = os.environ.get("TEST_PG_HOST", "127.0.0.1")
PG_PORT = int(os.environ.get("TEST_PG_PORT", "5432"))
PG_USER = os.environ.get("TEST_PG_USER", "postgres")
PG_ADMIN_DB = os.environ.get("TEST_PG_DB", "test")


def pg_url(database: str, port: int = PG_PORT) -> str:
    return f"postgresql://{PG_USER}@{PG_HOST}:{port}/{database}"


async def _admin() -> asyncpg.Connection:
    try:
        return await asyncpg.connect(
            host=PG_HOST, port=PG_PORT, user=PG_USER, database=PG_ADMIN_DB, timeout=5
        )
    except (OSError, asyncpg.PostgresError) as exc:
        raise RuntimeError(
            f"PostgreSQL is not reachable at {PG_HOST}:{PG_PORT} ({exc}); "
            'start it, or deselect these tests with -m "not postgres"'
        ) from exc


async def create_pg_database(prefix: str = "voicebot_test") -> str:
    """Create an empty, uniquely named database; returns its name."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = await _admin()
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    return name


async def drop_pg_database(name: str) -> None:
    admin = await _admin()
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


async def migrated_sqlite_url(directory: Path) -> str:
    """A new SQLite file under `directory`, upgraded to the newest schema."""
    url = f"sqlite:///{directory / 'voicebot.db'}"
    await upgrade_to_head_async(url)
    return url
