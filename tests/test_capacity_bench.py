"""bench/capacity_media.py end to end, small: both load generators drive real calls through the
bench server, and the step's numbers come back (a smoke test of the tool, not a capacity
figure)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import asyncpg
import pytest

from tests.conftest_db import (
    PG_HOST,
    PG_PORT,
    PG_USER,
    create_pg_database,
    drop_pg_database,
    pg_url,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.parametrize("generator", ["python", "c"])
def test_a_small_step_runs_with_either_generator(generator: str, tmp_path: Path) -> None:
    out = tmp_path / "capacity.json"
    subprocess.run(
        [sys.executable, str(ROOT / "bench" / "capacity_media.py"), "--steps", "4",
         "--duration", "8", "--settle-s", "1", "--wait-quiet-s", "0", "--generator", generator,
         "--json", str(out)],
        check=True, timeout=180, cwd=ROOT, stdout=subprocess.DEVNULL)
    report = json.loads(out.read_text())
    assert report["generator"] == generator and report["settle_s"] == 1
    step = report["steps"][0]
    assert step["connected"] == 4 and step["closed_early"] == 0 and step["dropped"] == 0
    # Every call was greeted and answered: the caller's first whole utterance ends within 8 s
    # of its start (4.7 s of silence, then the 3.3 s of `media_load.CALLER_WAV`), and each call lives at least
    # settle + duration = 9 s.
    assert step["replies"] >= 8
    assert step["window_s"] > 7 and step["cpu_ms_per_call_s"] > 0
    assert step["frame_lag_p99_ms"] is not None and step["generator_cpu_s"] > 0


async def _stored_calls(database: str) -> int:
    connection = await asyncpg.connect(host=PG_HOST, port=PG_PORT, user=PG_USER,
                                       database=database, timeout=5)
    try:
        return int(await connection.fetchval("SELECT count(*) FROM calls"))
    finally:
        await connection.close()


@pytest.mark.slow
@pytest.mark.postgres
def test_a_bare_postgres_database_is_migrated_and_stores_the_calls(tmp_path: Path) -> None:
    """`--database-url` at an empty PostgreSQL database: brought to the newest schema first,
    as `voicebot db upgrade` does, so every call of the step is stored (it had no tables, and
    every write failed)."""
    database = asyncio.run(create_pg_database("voicebot_bench"))
    try:
        out = tmp_path / "capacity.json"
        subprocess.run(
            [sys.executable, str(ROOT / "bench" / "capacity_media.py"), "--steps", "3",
             "--duration", "4", "--settle-s", "1", "--wait-quiet-s", "0", "--no-reference",
             "--generator", "c", "--database-url", pg_url(database), "--json", str(out)],
            check=True, timeout=180, cwd=ROOT, stdout=subprocess.DEVNULL)
        step = json.loads(out.read_text())["steps"][0]
        assert step["connected"] == 3 and step["closed_early"] == 0
        assert asyncio.run(_stored_calls(database)) == 3
    finally:
        asyncio.run(drop_pg_database(database))
