"""Run Alembic migrations from code: `voicebot db upgrade` and the server lifespan.

The Alembic scripts live in the repository's top-level `alembic/` folder, found relative to this
file, so migrations work whatever the process's working directory is.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from sqlalchemy.engine import Connection
from sqlalchemy.pool import NullPool

from alembic import command
from db.engine import create_db_engine

REPO_ROOT = Path(__file__).resolve().parents[1]
ALEMBIC_DIR = REPO_ROOT / "alembic"
ALEMBIC_INI = REPO_ROOT / "alembic.ini"


def alembic_config(database_url: str) -> Config:
    """An Alembic config pointing at this repository's scripts and at `database_url`."""
    config = Config(str(ALEMBIC_INI)) if ALEMBIC_INI.exists() else Config()
    config.set_main_option("script_location", str(ALEMBIC_DIR))
    # Passed as an attribute, not a main option: configparser would choke on '%' in passwords.
    config.attributes["database_url"] = database_url
    config.attributes["configure_logger"] = False
    return config


async def upgrade_to_head_async(database_url: str) -> None:
    """Upgrade the schema to the newest revision, on the running event loop."""
    await _run(database_url, lambda config: command.upgrade(config, "head"))


async def downgrade_async(database_url: str, revision: str) -> None:
    """Downgrade the schema to `revision` ("base" removes every table)."""
    await _run(database_url, lambda config: command.downgrade(config, revision))


async def current_revision_async(database_url: str) -> str | None:
    """The revision the database is at, or None before the first migration."""
    engine = create_db_engine(database_url, poolclass=NullPool)
    try:
        async with engine.connect() as connection:
            return await connection.run_sync(
                lambda sync: MigrationContext.configure(sync).get_current_revision()
            )
    finally:
        await engine.dispose()


def upgrade_to_head(database_url: str) -> None:
    """Blocking form for the CLI (no event loop running in this thread)."""
    asyncio.run(upgrade_to_head_async(database_url))


def downgrade(database_url: str, revision: str) -> None:
    """Blocking form for the CLI (no event loop running in this thread)."""
    asyncio.run(downgrade_async(database_url, revision))


async def _run(database_url: str, action: Callable[[Config], None]) -> None:
    config = alembic_config(database_url)
    engine = create_db_engine(database_url, poolclass=NullPool)

    def run(connection: Connection) -> None:
        config.attributes["connection"] = connection
        action(config)

    try:
        async with engine.begin() as connection:
            await connection.run_sync(run)
    finally:
        await engine.dispose()
