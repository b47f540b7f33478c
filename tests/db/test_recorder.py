"""CallRecorder: pipeline events in, rows out; nothing lost while the database is down."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from db.engine import create_db_engine
from db.recorder import CallRecorder
from db.repository import CallRepository
from pipeline.events import (
    CallEnded,
    CallEvent,
    CallStarted,
    EventBus,
    PipelineEvent,
    TurnMetrics,
    UtteranceDone,
)
from tests.conftest_db import pg_url
from tests.db.conftest import TcpProxy

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def a_call(sid: str = "CA1") -> list[PipelineEvent]:
    """A short conversation, in the order the pipeline publishes it."""
    return [
        CallStarted(sid, "MZ1", "+15550001", "+18005550000", "inbound", at(0)),
        UtteranceDone(sid, 0, "bot", "Hello, how can I help?", at(0.2), at(2)),
        UtteranceDone(sid, 1, "caller", "When do you open?", at(3), at(4.5)),
        TurnMetrics(sid, 1, endpoint_ms=500.0, stt_ms=60.0, v2v_ms=1100.0, overhead_ms=4.0),
        CallEvent(sid, "barge_in", {"turn": 1}, at(6)),
        UtteranceDone(sid, 1, "bot", "We open", at(5.6), at(6.1), "We open at nine.", True),
        UtteranceDone(sid, 2, "caller", "Thanks, bye.", at(6), at(7)),
        CallEnded(sid, at(8), "hangup"),
    ]


TRANSCRIPT = [
    ("bot", "Hello, how can I help?"),
    ("caller", "When do you open?"),
    ("bot", "We open"),
    ("caller", "Thanks, bye."),
]


async def _transcript(repo: CallRepository, sid: str = "CA1") -> list[tuple[str, str]]:
    return [(u.role, u.text) for u in (await repo.get_call(sid)).utterances]


async def test_bus_events_become_rows_with_an_ordered_transcript(
    repository: CallRepository, tmp_path: Path
) -> None:
    recorder = CallRecorder(repository, tmp_path / "spool")
    bus = EventBus()
    bus.subscribe("db", recorder.handle)
    await bus.start()
    await recorder.start()
    for event in a_call():
        bus.publish(event)
    await bus.drain()
    await bus.stop()
    await recorder.stop()

    detail = await repository.get_call("CA1")
    assert await _transcript(repository) == TRANSCRIPT
    assert detail.utterances[2].interrupted
    assert detail.utterances[2].generated_text == "We open at nine."
    assert [(m.turn, m.v2v_ms, m.overhead_ms) for m in detail.metrics] == [(1, 1100.0, 4.0)]
    assert [e.type for e in detail.events] == ["barge_in"]
    assert (detail.call.status, detail.call.end_reason) == ("completed", "hangup")
    assert detail.call.from_number == "+15550001"
    assert not recorder.spool.pending()


async def test_events_for_a_call_not_yet_stored_create_it(
    repository: CallRepository, tmp_path: Path
) -> None:
    recorder = CallRecorder(repository, tmp_path / "spool")
    await recorder.handle(UtteranceDone("CAlate", 1, "caller", "hi", at(1), at(2)))
    await recorder.handle(CallStarted("CAlate", "MZ9", "+1", "+2", "web", at(0)))

    call = (await repository.get_call("CAlate")).call
    assert (call.started_at, call.stream_sid, call.status) == (at(0), "MZ9", "in-progress")


class FlakyRepository:
    """A test double: the real repository, except that while `down` every call fails the way
    an unreachable server does."""

    def __init__(self, real: CallRepository) -> None:
        self.real = real
        self.down = False
        self.attempts = 0

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.real, name)

        async def call(*args: Any, **kwargs: Any) -> Any:
            self.attempts += 1
            if self.down:
                raise ConnectionRefusedError(111, "Connect call failed")
            return await method(*args, **kwargs)

        return call


async def test_an_outage_spools_events_and_replays_them_in_order(
    repository: CallRepository, tmp_path: Path
) -> None:
    flaky = FlakyRepository(repository)
    recorder = CallRecorder(flaky, tmp_path / "spool", backoff_s=0.001)  # type: ignore[arg-type]
    events = a_call()
    await recorder.handle(events[0])
    flaky.down = True
    await recorder.handle(events[1])
    assert flaky.attempts == 1 + 3  # retried with backoff before spooling
    for event in events[2:]:
        await recorder.handle(event)
    assert flaky.attempts == 4  # once spooling, later events go straight to the spool
    assert recorder.spooling
    assert await _transcript(repository) == []

    assert await recorder.replay() is False  # still down: nothing consumed
    flaky.down = False
    assert await recorder.replay() is True

    assert not recorder.spooling
    assert await _transcript(repository) == TRANSCRIPT
    assert (await repository.get_call("CA1")).call.end_reason == "hangup"
    await recorder.handle(CallEvent("CA1", "after", {}, at(9)))
    assert [e.type for e in (await repository.get_call("CA1")).events] == ["barge_in", "after"]


async def test_a_spool_left_by_an_earlier_run_is_replayed_on_start(
    repository: CallRepository, tmp_path: Path
) -> None:
    flaky = FlakyRepository(repository)
    flaky.down = True
    crashed = CallRecorder(flaky, tmp_path / "spool", attempts=1)  # type: ignore[arg-type]
    for event in a_call():
        await crashed.handle(event)

    recorder = CallRecorder(repository, tmp_path / "spool", replay_interval_s=60)
    await recorder.start()
    await recorder.wait_caught_up()
    await recorder.stop()

    assert await _transcript(repository) == TRANSCRIPT


async def test_rejected_events_are_kept_aside_not_retried(
    repository: CallRepository, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recorder = CallRecorder(repository, tmp_path / "spool")

    async def refuse(*args: Any, **kwargs: Any) -> None:
        raise ValueError("unknown metric fields ['x_ms']")

    # Bad data, not an outage: no retries, no spooling, but kept on disk with the reason.
    monkeypatch.setattr(repository, "add_metrics", refuse)
    await recorder.handle(TurnMetrics("CA1", 1, v2v_ms=1.0))

    assert not recorder.spooling
    assert not recorder.spool.pending()
    assert "unknown metric fields" in recorder.spool.rejected_path.read_text()


@pytest.mark.postgres
@pytest.mark.parametrize("failure", ["restart", "hang"])
async def test_a_postgres_outage_loses_nothing(
    pg_clean_url: str, pg_proxy: TcpProxy, tmp_path: Path, failure: str
) -> None:
    database = pg_clean_url.rsplit("/", 1)[1]
    engine = create_db_engine(pg_url(database, port=pg_proxy.port), pool_timeout=1)
    direct = create_db_engine(pg_clean_url)
    check = CallRepository(direct)
    recorder = CallRecorder(
        CallRepository(engine),
        tmp_path / "spool",
        attempts=2,
        backoff_s=0.01,
        write_timeout_s=0.5,
        replay_interval_s=0.05,
    )
    bus = EventBus()
    bus.subscribe("db", recorder.handle)
    await bus.start()
    await recorder.start()
    try:
        events = a_call()
        bus.publish(events[0])
        bus.publish(events[1])
        await bus.drain()
        assert await _transcript(check) == TRANSCRIPT[:1]

        if failure == "hang":
            pg_proxy.blackhole = True
        await pg_proxy.down()
        if failure == "hang":
            await pg_proxy.up()  # listening, never answering
        for event in events[2:]:
            bus.publish(event)
        await bus.drain()
        assert recorder.spooling
        assert await _transcript(check) == TRANSCRIPT[:1]

        await pg_proxy.down()
        pg_proxy.blackhole = False
        await pg_proxy.up()
        await recorder.wait_caught_up()
    finally:
        await bus.stop()
        await recorder.stop()
        await engine.dispose()

    assert await _transcript(check) == TRANSCRIPT
    assert (await check.get_call("CA1")).call.status == "completed"
    await direct.dispose()
