"""`voicebot forget +15550100001`: erase what the bot keeps about one phone number.

Two places hold it: the caller memory (the summary of earlier calls, in Redis when `REDIS_URL`
is set) and the database (calls to or from the number, with their transcripts, metrics and
events). With the in-process caller memory (no `REDIS_URL`) the summary lives inside the
running server and is gone when it restarts; this command cannot reach it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from sqlalchemy import make_url

from db.engine import create_db_engine, sqlite_file
from db.repository import CallRepository
from pipeline.caller_memory import (
    CallerMemoryStore,
    CallerMemoryUnavailable,
    build_caller_store,
    normalize_number,
)

log = logging.getLogger(__name__)


async def forget_caller(
    settings: Any,
    number: str,
    *,
    store: CallerMemoryStore | None = None,
    repository: CallRepository | None = None,
) -> dict[str, Any]:
    """Erase `number`'s caller memory and stored calls; returns what was done.

    Result keys: `number` (normalized), `caller_memory` ("erased", "none", "in_process" when
    the memory lives only inside the server process, or "error"), `calls_deleted`, and
    `errors` (empty when everything was erased). Raises `InvalidNumber` for input that is not
    a phone number. `store` and `repository` default to the ones the settings describe.
    """
    normalized = normalize_number(number)
    result: dict[str, Any] = {
        "number": normalized, "caller_memory": "none", "calls_deleted": 0, "errors": [],
    }
    await _forget_memory(settings, normalized, store, result)
    await _forget_calls(settings, {normalized, number.strip()}, repository, result)
    return result


async def _forget_memory(
    settings: Any, number: str, store: CallerMemoryStore | None, result: dict[str, Any]
) -> None:
    if store is None and not getattr(settings, "redis_url", None):
        result["caller_memory"] = "in_process"
        return
    own = store is None
    active = store or build_caller_store(settings, op_timeout_s=5.0)
    try:
        result["caller_memory"] = "erased" if await active.forget(number) else "none"
    except CallerMemoryUnavailable as exc:
        result["caller_memory"] = "error"
        result["errors"].append(f"caller memory: {exc}")
    finally:
        if own:
            await active.aclose()


async def _forget_calls(
    settings: Any, numbers: set[str], repository: CallRepository | None, result: dict[str, Any]
) -> None:
    engine = None
    if repository is None:
        url = settings.database_url
        path = _sqlite_path(url)
        if path is not None and not path.exists():
            return  # no database yet, so nothing stored
        engine = create_db_engine(url)
        repository = CallRepository(engine)
    try:
        for each in sorted(numbers):
            result["calls_deleted"] += await repository.forget_number(each)
    except Exception as exc:  # reported to the operator, who runs the command again
        log.warning("could not delete calls: %s", type(exc).__name__)
        result["errors"].append(f"database: {type(exc).__name__}: {exc}")
    finally:
        if engine is not None:
            await engine.dispose()


def _sqlite_path(database_url: str) -> Path | None:
    return sqlite_file(make_url(database_url))
