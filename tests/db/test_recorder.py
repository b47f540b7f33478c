"""CallRecorder: pipeline events in, rows out; nothing lost while the database is down."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

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
from tests.db.conftest import SqlCounter, TcpProxy

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
    repository: CallRepository, tmp_path: Path
) -> None:
    flaky = FlakyRepository(repository)
    recorder = CallRecorder(flaky, tmp_path / "spool")  # type: ignore[arg-type]

    # Bad data, not an outage: no retries, no spooling, but kept on disk with the reason.
    await recorder.handle(TurnMetrics("CA1", 1, v2v_ms="fast"))  # type: ignore[arg-type]

    assert flaky.attempts == 1
    assert not recorder.spooling
    assert not recorder.spool.pending()
    assert "could not convert string to float: 'fast'" in recorder.spool.rejected_path.read_text()


def interleaved(*sids: str) -> list[PipelineEvent]:
    """Several calls' conversations, their events taking turns as concurrent calls' do."""
    return [event for step in zip(*(a_call(sid) for sid in sids), strict=True) for event in step]


def refused_utterance(sid: str = "CA1") -> UtteranceDone:
    """An utterance the database itself refuses (NOT NULL text), on every backend."""
    return UtteranceDone(sid, 9, "caller", None, at(7.5), at(7.6))  # type: ignore[arg-type]


def refused_metrics(sid: str = "CA1") -> TurnMetrics:
    """Metrics refused before they reach the database (not a number)."""
    return TurnMetrics(sid, 2, v2v_ms="fast")  # type: ignore[arg-type]


def rejected_kinds(recorder: CallRecorder) -> list[str]:
    lines = recorder.spool.rejected_path.read_text().splitlines()
    return [json.loads(line)["event"]["kind"] for line in lines]


class GoesDown:
    """The real repository, counting transactions, until it has written `ok` of them; then
    every write fails the way an unreachable server does, until `down` is cleared."""

    def __init__(self, real: CallRepository, ok: int = 1_000_000) -> None:
        self.real = real
        self.ok = ok
        self.down = False
        self.batches: list[int] = []

    async def write_events(self, events: list[PipelineEvent]) -> None:
        if self.ok <= 0:
            self.down = True
        if self.down:
            raise ConnectionRefusedError(111, "Connect call failed")
        self.ok -= 1
        self.batches.append(len(events))
        await self.real.write_events(events)


async def test_queued_events_are_written_in_one_commit_and_in_order(
    repository: CallRepository, engine: AsyncEngine, tmp_path: Path
) -> None:
    recorder = CallRecorder(repository, tmp_path / "spool")
    bus = EventBus()
    bus.subscribe_batch("db", recorder.handle_batch)
    await bus.start()
    await recorder.start()
    counter = SqlCounter(engine)
    for event in interleaved("CA1", "CA2", "CA3"):  # 24 events waiting at once
        bus.publish(event)
    await bus.drain()
    assert counter.commits == 1

    bus.publish(CallEvent("CA1", "after", {}, at(9)))  # alone: written at once, on its own
    await bus.drain()
    assert counter.commits == 2
    await bus.stop()
    await recorder.stop()

    for sid in ("CA1", "CA2", "CA3"):
        assert await _transcript(repository, sid) == TRANSCRIPT
        assert (await repository.get_call(sid)).call.end_reason == "hangup"
    assert [e.type for e in (await repository.get_call("CA1")).events] == ["barge_in", "after"]


async def test_a_refused_event_does_not_lose_the_rest_of_its_batch(
    repository: CallRepository, tmp_path: Path
) -> None:
    flaky = FlakyRepository(repository)
    recorder = CallRecorder(flaky, tmp_path / "spool", backoff_s=0.001)  # type: ignore[arg-type]
    events = a_call()
    batch = [*events[:3], refused_utterance(), *events[3:5], refused_metrics(), *events[5:]]

    await recorder.handle_batch(batch)

    assert flaky.attempts == 1 + len(batch)  # the batch, then one event at a time
    assert await _transcript(repository) == TRANSCRIPT
    detail = await repository.get_call("CA1")
    assert [(m.turn, m.v2v_ms) for m in detail.metrics] == [(1, 1100.0)]
    assert detail.call.end_reason == "hangup"
    assert rejected_kinds(recorder) == ["utterance", "turn_metrics"]
    assert not recorder.spooling and not recorder.spool.pending()


async def test_an_outage_spools_the_whole_batch_in_order_and_replay_writes_it_at_once(
    repository: CallRepository, engine: AsyncEngine, tmp_path: Path
) -> None:
    down = GoesDown(repository)
    recorder = CallRecorder(down, tmp_path / "spool", backoff_s=0.001)  # type: ignore[arg-type]
    events = interleaved("CA1", "CA2")
    await recorder.handle_batch(events[:2])
    down.down = True
    await recorder.handle_batch(events[2:10])  # fails as a whole: nothing of it is written
    await recorder.handle_batch(events[10:])  # and what follows goes after it

    assert recorder.spooling
    assert [event for _, event in recorder.spool.peek(100)] == events[2:]
    assert await _transcript(repository) == []

    down.down = False
    counter = SqlCounter(engine)
    assert await recorder.replay() is True

    assert counter.commits == 1  # the spool's 14 events in one transaction
    assert down.batches == [2, 14]
    for sid in ("CA1", "CA2"):
        assert await _transcript(repository, sid) == TRANSCRIPT
    assert not recorder.spooling and not recorder.spool.pending()


async def test_an_outage_while_writing_one_by_one_spools_the_rest_in_order(
    repository: CallRepository, tmp_path: Path
) -> None:
    events = a_call()
    batch = [*events[:2], refused_utterance(), *events[2:]]
    # The batch is refused (one bad event); the first three go one by one, then the outage.
    down = GoesDown(repository, ok=1 + 3)
    recorder = CallRecorder(down, tmp_path / "spool", backoff_s=0.001)  # type: ignore[arg-type]

    await recorder.handle_batch(batch)

    assert recorder.spooling
    assert rejected_kinds(recorder) == ["utterance"]
    assert [event for _, event in recorder.spool.peek(100)] == events[2:]
    assert await _transcript(repository) == TRANSCRIPT[:1]

    down.down, down.ok = False, 100
    assert await recorder.replay() is True
    assert await _transcript(repository) == TRANSCRIPT
    assert not recorder.spooling


async def test_a_refused_event_in_the_spool_does_not_block_the_replay(
    repository: CallRepository, tmp_path: Path
) -> None:
    down = GoesDown(repository)
    down.down = True
    recorder = CallRecorder(down, tmp_path / "spool", attempts=1)  # type: ignore[arg-type]
    events = a_call()
    await recorder.handle_batch([*events[:4], refused_metrics(), *events[4:]])
    assert recorder.spool.pending()

    down.down = False
    assert await recorder.replay() is True

    assert down.batches == [len(events) + 1, *[1] * (len(events) + 1)]
    assert await _transcript(repository) == TRANSCRIPT
    assert rejected_kinds(recorder) == ["turn_metrics"]
    assert not recorder.spool.pending()


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
    bus.subscribe_batch("db", recorder.handle_batch)
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
