"""The async engine, built from the plain `DATABASE_URL` forms users write.

Users write `sqlite:///path/to/file.db` or `postgresql://user:pass@host/db` (`postgres://` too);
the async driver is chosen here: aiosqlite for SQLite, asyncpg for PostgreSQL. Nothing in the
audio path ever waits on a synchronous database call.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import URL, event, make_url
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.pool import StaticPool

SQLITE_BUSY_TIMEOUT_MS = 5_000
PG_CONNECT_TIMEOUT_S = 5.0

# libpq's sslmode (what hosted Postgres URLs carry) → asyncpg's `ssl` argument.
_SSLMODES = {"disable", "allow", "prefer", "require", "verify-ca", "verify-full"}


try:  # asyncpg raises its own connection errors while connecting, unwrapped.
    from asyncpg.exceptions import InterfaceError as PgInterfaceError
    from asyncpg.exceptions import PostgresConnectionError

    _PG_OUTAGE: tuple[type[BaseException], ...] = (PostgresConnectionError, PgInterfaceError)
except ImportError:  # pragma: no cover - asyncpg is a dependency
    _PG_OUTAGE = ()

_OUTAGE = (OSError, TimeoutError, PoolTimeoutError, OperationalError, InterfaceError, *_PG_OUTAGE)


def is_outage(exc: BaseException) -> bool:
    """True when `exc` means "the database cannot be reached now", not "bad data"."""
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    return isinstance(exc, _OUTAGE)


class DatabaseUrlError(ValueError):
    """The URL is neither `sqlite:///…` nor `postgresql://…`."""

    def __init__(self, scheme: str) -> None:
        self.scheme = scheme
        super().__init__(f"unsupported database URL scheme {scheme!r}: use sqlite or postgresql")


def async_database_url(database_url: str) -> URL:
    """`sqlite:///x.db` → `sqlite+aiosqlite:///x.db`; `postgres(ql)://…` → `postgresql+asyncpg://…`."""
    url = make_url(database_url)
    backend = url.get_backend_name()
    if backend == "sqlite":
        return url.set(drivername="sqlite+aiosqlite")
    if backend in ("postgresql", "postgres"):
        url = url.set(drivername="postgresql+asyncpg")
        sslmode = url.query.get("sslmode")
        if isinstance(sslmode, str):
            url = url.difference_update_query(["sslmode"])
            if sslmode in _SSLMODES:
                url = url.update_query_dict({"ssl": sslmode})
        return url
    raise DatabaseUrlError(url.drivername)


def sqlite_file(url: URL) -> Path | None:
    """The file behind a SQLite URL, or None for an in-memory database."""
    if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
        return None
    return Path(url.database)


def create_db_engine(database_url: str, **kwargs: Any) -> AsyncEngine:
    """An async engine for `database_url`; creates a SQLite file's parent directory."""
    url = async_database_url(database_url)
    if url.get_backend_name() == "sqlite":
        path = sqlite_file(url)
        if path is None:
            # One shared connection, or every connection would see its own empty database.
            kwargs.setdefault("poolclass", StaticPool)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
        engine = create_async_engine(url, **kwargs)
        event.listen(engine.sync_engine, "connect", _sqlite_on_connect)
        return engine
    connect_args = kwargs.pop("connect_args", {})
    connect_args.setdefault("timeout", PG_CONNECT_TIMEOUT_S)
    kwargs.setdefault("pool_pre_ping", True)
    return create_async_engine(url, connect_args=connect_args, **kwargs)


def session_factory(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    """Sessions whose loaded objects stay readable after commit (no lazy reloads)."""
    return async_sessionmaker(engine, expire_on_commit=False)


def _sqlite_on_connect(dbapi_connection: Any, connection_record: Any) -> None:
    # WAL lets the viewer read while the recorder writes; busy_timeout makes a second writer
    # (the status webhook, another process) wait instead of failing with "database is locked".
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=NORMAL")
    finally:
        cursor.close()
