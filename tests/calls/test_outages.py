"""Redis and PostgreSQL go away in the middle of a call: the call completes, and once the
database is back every utterance is stored (spooled to disk meanwhile, then replayed)."""

from __future__ import annotations

import asyncio
import uuid

import httpx
import pytest

from db.migrate import upgrade_to_head_async
from pipeline.conversation import Engines
from pipeline.events import UtteranceDone
from telephony.simulator import CallerTurn, SimulatedCaller
from tests.callkit import serving
from tests.conftest_db import create_pg_database, drop_pg_database, pg_url
from tests.fakes.openai_server import FakeOpenAi, Rule
from tests.fakes.tcp_proxy import TcpProxy
from voicebot.settings import Settings, load_settings

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.redis]


async def test_call_survives_redis_and_database_outages_and_nothing_is_lost(
    settings: Settings, engines: Engines, fake_openai: FakeOpenAi, fixtures_dir, tmp_path
) -> None:
    fake_openai.script(
        Rule(when="open", reply="We open at nine."),
        Rule(when="table", reply="Booked for two."),
        Rule(when="prices", reply="Lunch is fifteen dollars."),
    )
    database = await create_pg_database("voicebot_outage")
    pg, redis = TcpProxy(), TcpProxy(target_port=6379)
    await pg.up()
    await redis.up()
    try:
        url = pg_url(database, port=pg.port)
        await upgrade_to_head_async(url)
        outage_settings = load_settings(
            **{**settings.model_dump(), "database_url": url,
               "redis_url": f"redis://127.0.0.1:{redis.port}/0",
               "redis_namespace": f"vbtest-{uuid.uuid4().hex[:8]}",
               "db_spool_dir": str(tmp_path / "spool")})
        async with serving(outage_settings, engines) as served:
            caller = SimulatedCaller(served.media_url, pace=2.0, from_number="+15550107070")
            call = asyncio.create_task(caller.run([
                CallerTurn(wav=str(fixtures_dir / name))
                for name in ("open_hours.wav", "book_table.wav", "prices.wav")
            ]))
            # Cut both servers once the first caller turn is heard.
            await served.wait_for(lambda e: isinstance(e, UtteranceDone) and e.role == "caller")
            await pg.down()
            await redis.down()
            result = await call
            await served.ended(caller.call_sid)
            assert all(t.latency_ms is not None for t in result.turns)  # the call went on
            recorder = served.app.state.recorder
            assert recorder.spooling
            await pg.up()  # the database comes back (same port)
            async with asyncio.timeout(30):
                await recorder.wait_caught_up()
            await redis.up()
            async with httpx.AsyncClient(base_url=served.base_url) as http:
                detail = (await http.get(f"/api/calls/{caller.call_sid}")).json()
        spoken = [(e.role, e.text) for e in served.events
                  if isinstance(e, UtteranceDone) and e.call_sid == caller.call_sid]
        stored = [(u["role"], u["text"]) for u in detail["utterances"]]
        assert stored == spoken and len(stored) == 7  # greeting + 3 caller + 3 bot turns
        assert detail["end_reason"] == "stop"
    finally:
        await pg.down()
        await redis.down()
        await drop_pg_database(database)
