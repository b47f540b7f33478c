from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError, OperationalError

from db.engine import DatabaseUrlError, async_database_url, create_db_engine, is_outage


def test_sqlite_url_gets_the_async_driver() -> None:
    url = async_database_url("sqlite:///./data/voicebot.db")
    assert url.drivername == "sqlite+aiosqlite"
    assert url.database == "./data/voicebot.db"


@pytest.mark.parametrize("scheme", ["postgresql", "postgres"])
def test_postgres_urls_get_asyncpg(scheme: str) -> None:
    url = async_database_url(f"{scheme}://bot:p%40ss@db.example:6543/calls")
    assert url.drivername == "postgresql+asyncpg"
    assert (url.username, url.password, url.host, url.port, url.database) == (
        "bot",
        "p@ss",
        "db.example",
        6543,
        "calls",
    )


def test_libpq_sslmode_becomes_asyncpg_ssl() -> None:
    url = async_database_url("postgresql://u@h/db?sslmode=require")
    assert dict(url.query) == {"ssl": "require"}


def test_other_schemes_are_refused() -> None:
    with pytest.raises(DatabaseUrlError) as caught:
        async_database_url("mysql://u@h/db")
    assert caught.value.scheme == "mysql"


async def test_sqlite_engine_creates_the_directory_and_uses_wal(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "dir" / "voicebot.db"
    engine = create_db_engine(f"sqlite:///{path}")
    try:
        async with engine.connect() as connection:
            journal = await connection.scalar(text("PRAGMA journal_mode"))
            busy = await connection.scalar(text("PRAGMA busy_timeout"))
            foreign_keys = await connection.scalar(text("PRAGMA foreign_keys"))
    finally:
        await engine.dispose()
    assert path.parent.is_dir()
    assert (journal, busy, foreign_keys) == ("wal", 5000, 1)


def test_outages_are_told_apart_from_bad_data() -> None:
    assert is_outage(ConnectionRefusedError())
    assert is_outage(TimeoutError())
    assert is_outage(OperationalError("SELECT 1", {}, Exception("database is locked")))
    assert not is_outage(IntegrityError("INSERT", {}, Exception("duplicate key")))
    assert not is_outage(ValueError("bad"))
