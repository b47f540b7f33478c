"""Alembic environment: async (aiosqlite / asyncpg), URL from the caller or from settings.

Three ways in:
- `db.migrate` (the CLI's `voicebot db upgrade`, the server lifespan) hands over an open
  connection in `config.attributes["connection"]`;
- `db.migrate` may instead pass only `config.attributes["database_url"]`;
- the plain `alembic` command reads `DATABASE_URL` through `voicebot.settings`.
"""

from __future__ import annotations

import asyncio
import sys
from logging.config import fileConfig
from pathlib import Path
from typing import Literal

from sqlalchemy import pool
from sqlalchemy.engine import Connection

from alembic import context

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from db.engine import async_database_url, create_db_engine  # noqa: E402
from db.models import Base, UtcDateTime  # noqa: E402

config = context.config
target_metadata = Base.metadata

# The server configures its own logging; only the bare `alembic` command uses alembic.ini's.
if config.config_file_name is not None and config.attributes.get("configure_logger", True):
    fileConfig(config.config_file_name, disable_existing_loggers=False)


def database_url() -> str:
    url = config.attributes.get("database_url")
    if url:
        return str(url)
    from voicebot.settings import load_settings

    return load_settings().database_url


def render_item(type_: str, obj: object, autogen_context: object) -> str | Literal[False]:
    # Migrations spell the column type plainly; UtcDateTime only adds Python-side UTC handling.
    if type_ == "type" and isinstance(obj, UtcDateTime):
        return "sa.DateTime(timezone=True)"
    return False


def configure(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        compare_type=True,
        render_item=render_item,
        # SQLite cannot ALTER most things; batch mode rebuilds the table instead.
        render_as_batch=connection.dialect.name == "sqlite",
    )


def do_run_migrations(connection: Connection) -> None:
    configure(connection)
    with context.begin_transaction():
        context.run_migrations()


async def run_async_migrations() -> None:
    engine = create_db_engine(database_url(), poolclass=pool.NullPool)
    try:
        async with engine.connect() as connection:
            await connection.run_sync(do_run_migrations)
            await connection.commit()
    finally:
        await engine.dispose()


def run_migrations_offline() -> None:
    context.configure(
        url=async_database_url(database_url()),
        target_metadata=target_metadata,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        do_run_migrations(connection)
    else:
        asyncio.run(run_async_migrations())


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
