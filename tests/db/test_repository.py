"""CallRepository against SQLite and PostgreSQL (the `database_url` fixture runs both)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from db.repository import CallNotFound, CallRepository
from pipeline.events import (
    CallEnded,
    CallEvent,
    CallStarted,
    PipelineEvent,
    TurnMetrics,
    UtteranceDone,
)
from tests.db.conftest import SqlCounter

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


async def _call(repo: CallRepository, sid: str, start: datetime, frm: str, to: str) -> None:
    await repo.start_call(
        sid,
        started_at=start,
        stream_sid=f"MZ{sid}",
        from_number=frm,
        to_number=to,
        direction="inbound",
    )


async def test_calls_are_listed_newest_first_in_pages(repository: CallRepository) -> None:
    for i in range(5):
        await _call(repository, f"CA{i}", at(i * 60), "+15550100", "+15559999")

    first = await repository.list_calls(page=1, page_size=2)
    second = await repository.list_calls(page=2, page_size=2)
    last = await repository.list_calls(page=3, page_size=2)

    assert [c.call_sid for c in first.calls] == ["CA4", "CA3"]
    assert [c.call_sid for c in second.calls] == ["CA2", "CA1"]
    assert [c.call_sid for c in last.calls] == ["CA0"]
    assert first.total == second.total == 5


async def test_number_filter_matches_part_of_either_number(repository: CallRepository) -> None:
    await _call(repository, "CAa", at(0), "+15551234567", "+18005550000")
    await _call(repository, "CAb", at(1), "+447700900123", "+15551234567")
    await _call(repository, "CAc", at(2), "+33100000000", "+18005550000")

    both = await repository.list_calls(number="1234567")
    assert {c.call_sid for c in both.calls} == {"CAa", "CAb"}
    assert both.total == 2
    # LIKE wildcards in the filter are taken literally.
    assert (await repository.list_calls(number="%")).total == 0


async def test_date_range_includes_since_and_excludes_until(repository: CallRepository) -> None:
    for day in range(3):
        await _call(repository, f"CA{day}", T0 + timedelta(days=day), "+1555", "+1666")

    page = await repository.list_calls(since=T0 + timedelta(days=1), until=T0 + timedelta(days=2))

    assert [c.call_sid for c in page.calls] == ["CA1"]


async def test_a_call_comes_back_with_its_transcript_in_spoken_order(
    repository: CallRepository,
) -> None:
    await _call(repository, "CA1", at(0), "+1555", "+1666")
    await repository.add_utterance(
        "CA1",
        turn=0,
        role="bot",
        text="Hello! How can I help?",
        started_at=at(0.5),
        ended_at=at(2),
    )
    # The bot's second reply was cut short; it reports after the caller's barge-in began.
    await repository.add_utterance(
        "CA1",
        turn=1,
        role="caller",
        text="What are your hours?",
        started_at=at(3),
        ended_at=at(4.5),
    )
    await repository.add_utterance(
        "CA1",
        turn=2,
        role="caller",
        text="Sorry, on Sunday?",
        started_at=at(7),
        ended_at=at(8),
    )
    await repository.add_utterance(
        "CA1",
        turn=1,
        role="bot",
        text="We open at",
        started_at=at(5.5),
        ended_at=at(7.2),
        generated_text="We open at nine every weekday.",
        interrupted=True,
    )
    await repository.add_metrics("CA1", 1, {"endpoint_ms": 500.0, "v2v_ms": 1000.0})
    await repository.add_event("CA1", "barge_in", {"turn": 1, "at": at(7)}, at(7.1))
    await repository.finalize_call("CA1", ended_at=at(10), reason="hangup")

    detail = await repository.get_call("CA1")

    assert [(u.role, u.text) for u in detail.utterances] == [
        ("bot", "Hello! How can I help?"),
        ("caller", "What are your hours?"),
        ("bot", "We open at"),
        ("caller", "Sorry, on Sunday?"),
    ]
    cut = detail.utterances[2]
    assert cut.interrupted and cut.generated_text == "We open at nine every weekday."
    assert [(m.turn, m.endpoint_ms, m.v2v_ms, m.stt_ms) for m in detail.metrics] == [
        (1, 500.0, 1000.0, None)
    ]
    assert [(e.type, e.detail) for e in detail.events] == [
        ("barge_in", {"turn": 1, "at": str(at(7))})
    ]
    call = detail.call
    assert (call.status, call.end_reason, call.duration_s) == ("completed", "hangup", 10.0)
    assert call.utterance_count == 4


async def test_an_unknown_call_raises_call_not_found(repository: CallRepository) -> None:
    with pytest.raises(CallNotFound) as caught:
        await repository.get_call("CAnope")
    assert caught.value.call_sid == "CAnope"


async def test_times_come_back_aware_in_utc(repository: CallRepository) -> None:
    paris = timezone(timedelta(hours=1))
    await _call(repository, "CA1", datetime(2025, 3, 1, 13, 0, tzinfo=paris), "+1", "+2")

    call = (await repository.get_call("CA1")).call

    assert call.started_at == T0
    assert call.started_at.utcoffset() == timedelta(0)
    assert call.created_at.tzinfo is not None


async def test_a_status_callback_before_the_stream_creates_the_call(
    repository: CallRepository,
) -> None:
    await repository.update_status(
        "CA1",
        "ringing",
        at=at(-5),
        from_number="+1555",
        to_number="+1666",
        direction="inbound",
    )
    await repository.start_call("CA1", started_at=at(0), stream_sid="MZ1", direction="simulated")
    await repository.update_status("CA1", "completed", at=at(30), duration_s=30)

    call = (await repository.get_call("CA1")).call

    assert (call.from_number, call.to_number, call.direction) == ("+1555", "+1666", "inbound")
    assert (call.stream_sid, call.status, call.duration_s) == ("MZ1", "completed", 30.0)
    assert (call.started_at, call.answered_at, call.ended_at) == (at(-5), at(0), at(30))
    assert call.end_reason is None


async def test_status_never_moves_backwards(repository: CallRepository) -> None:
    await repository.update_status("CA1", "in-progress", at=at(0))
    await repository.update_status("CA1", "ringing", at=at(-1))
    assert (await repository.get_call("CA1")).call.status == "in-progress"
    await repository.finalize_call("CA1", ended_at=at(9), reason="stop")
    await repository.update_status("CA1", "in-progress", at=at(1))
    assert (await repository.get_call("CA1")).call.status == "completed"


@pytest.mark.parametrize("status", ["busy", "no-answer", "failed", "canceled"])
async def test_unanswered_calls_end_with_their_status(
    repository: CallRepository, status: str
) -> None:
    await repository.update_status("CA1", "initiated", at=at(0), direction="outbound-api")
    await repository.update_status("CA1", status, at=at(20), duration_s=0)

    call = (await repository.get_call("CA1")).call

    assert (call.status, call.end_reason, call.ended_at) == (status, status, at(20))
    assert call.answered_at is None


async def test_an_unknown_status_is_refused(repository: CallRepository) -> None:
    with pytest.raises(ValueError):
        await repository.update_status("CA1", "exploded")


async def test_the_same_utterance_twice_is_stored_once(repository: CallRepository) -> None:
    for _ in range(2):
        seq = await repository.add_utterance(
            "CA1", turn=1, role="caller", text="hi", started_at=at(1), ended_at=at(2)
        )
        assert seq == 1
    assert len((await repository.get_call("CA1")).utterances) == 1


async def test_metrics_for_a_turn_are_completed_not_duplicated(
    repository: CallRepository,
) -> None:
    await repository.add_metrics("CA1", 1, {"v2v_ms": 900.0, "heard_v2v_ms": None})
    await repository.add_metrics("CA1", 1, {"heard_v2v_ms": 950.0})

    metrics = (await repository.get_call("CA1")).metrics

    assert [(m.turn, m.v2v_ms, m.heard_v2v_ms) for m in metrics] == [(1, 900.0, 950.0)]
    with pytest.raises(ValueError):
        await repository.add_metrics("CA1", 1, {"bogus_ms": 1.0})


async def test_forgetting_a_number_deletes_only_its_calls(repository: CallRepository) -> None:
    await _call(repository, "CAin", at(0), "+15550001", "+18000000000")
    await _call(repository, "CAout", at(1), "+18000000000", "+15550001")
    await _call(repository, "CAother", at(2), "+15550002", "+18000000000")
    for sid in ("CAin", "CAout", "CAother"):
        await repository.add_utterance(
            sid, turn=1, role="caller", text="secret", started_at=at(3), ended_at=at(4)
        )
        await repository.add_metrics(sid, 1, {"v2v_ms": 1.0})
        await repository.add_event(sid, "dtmf", {"digit": "1"}, at(3))

    assert await repository.forget_number("+15550001") == 2
    assert await repository.forget_number("+15550001") == 0

    page = await repository.list_calls()
    assert [c.call_sid for c in page.calls] == ["CAother"]
    other = await repository.get_call("CAother")
    assert (len(other.utterances), len(other.metrics), len(other.events)) == (1, 1, 1)
    with pytest.raises(CallNotFound):
        await repository.get_call("CAin")


async def test_ping_answers_when_the_database_does(repository: CallRepository) -> None:
    await repository.ping()


# -- write_events: a batch of pipeline events in one transaction --------------------------


def a_conversation(sid: str) -> list[PipelineEvent]:
    return [
        CallStarted(sid, f"MZ{sid}", "+15550001", "+18005550000", "inbound", at(0)),
        UtteranceDone(sid, 0, "bot", "Hello, how can I help?", at(0.2), at(2)),
        UtteranceDone(sid, 1, "caller", "When do you open?", at(3), at(4.5)),
        TurnMetrics(sid, 1, endpoint_ms=500.0, v2v_ms=1100.0),
        CallEvent(sid, "barge_in", {"turn": 1}, at(6)),
        CallEvent(sid, "mark", {"name": "r1"}, at(6)),
        UtteranceDone(sid, 1, "bot", "We open", at(5.6), at(6.1), "We open at nine.", True),
        TurnMetrics(sid, 1, heard_v2v_ms=1150.0),  # completes the same turn's row
        CallEnded(sid, at(8), "hangup"),
    ]


def interleaved(*calls: list[PipelineEvent]) -> list[PipelineEvent]:
    return [event for step in zip(*calls, strict=True) for event in step]


async def _stored(repo: CallRepository, sid: str) -> tuple[Any, ...]:
    detail = await repo.get_call(sid)
    return (
        [(u.seq, u.turn, u.role, u.text, u.interrupted, u.generated_text)
         for u in detail.utterances],
        [(m.turn, m.endpoint_ms, m.v2v_ms, m.heard_v2v_ms) for m in detail.metrics],
        [(e.type, e.detail) for e in detail.events],
        (detail.call.status, detail.call.end_reason, detail.call.duration_s,
         detail.call.stream_sid, detail.call.from_number, detail.call.answered_at),
    )


async def test_a_batch_is_stored_as_one_write_each_would_store_it(
    repository: CallRepository,
) -> None:
    await repository.write_events(interleaved(a_conversation("CAa"), a_conversation("CAb")))
    for event in a_conversation("CAc"):
        await repository.write_events([event])

    expected = (
        [(1, 0, "bot", "Hello, how can I help?", False, None),
         (2, 1, "caller", "When do you open?", False, None),
         (3, 1, "bot", "We open", True, "We open at nine.")],
        [(1, 500.0, 1100.0, 1150.0)],
        [("barge_in", {"turn": 1}), ("mark", {"name": "r1"})],
        ("completed", "hangup", 8.0, None, "+15550001", at(0)),
    )
    for sid in ("CAa", "CAb", "CAc"):
        stored = await _stored(repository, sid)
        assert stored[:3] == expected[:3]
        assert stored[3] == (*expected[3][:3], f"MZ{sid}", *expected[3][4:])


async def test_a_batch_takes_one_commit_and_a_few_statements(
    repository: CallRepository, engine: AsyncEngine
) -> None:
    batch = interleaved(*(a_conversation(f"CA{n}") for n in range(20)))
    counter = SqlCounter(engine)

    await repository.write_events(batch)

    assert counter.commits == 1
    # Per table, not per event (one event at a time took about 4 statements each).
    assert counter.statements <= 10, counter.statements
    assert (await repository.list_calls()).total == 20


async def test_a_batch_written_twice_is_stored_once(repository: CallRepository) -> None:
    batch = a_conversation("CA1")
    await repository.write_events(batch)
    before = await _stored(repository, "CA1")

    await repository.write_events(batch)  # a replay whose first attempt did commit
    await repository.write_events(batch[1:3] + batch[1:3])  # and twice within one batch

    assert await _stored(repository, "CA1") == before


async def test_a_batch_is_all_or_nothing(repository: CallRepository) -> None:
    batch = a_conversation("CA1")
    refused = UtteranceDone("CA1", 2, "caller", None, at(7), at(7.5))  # type: ignore[arg-type]

    with pytest.raises(IntegrityError):  # NOT NULL: the database refuses it
        await repository.write_events([*batch[:4], refused, *batch[4:]])

    assert (await repository.list_calls()).total == 0


async def test_a_resumed_stream_reopens_its_call_until_it_ends_again(
    repository: CallRepository,
) -> None:
    """A stream that dropped (ended `disconnect`) and was connected again: the call is in
    progress once more, keeps what was said, and ends with the resumed stream's end."""
    def started(seconds: float, resumed: int = 0) -> CallStarted:
        return CallStarted("CAr", f"MZ{seconds:.0f}", "+15550001", "+15550002", "inbound",
                           at(seconds), resumed=resumed)

    said = UtteranceDone("CAr", 1, "caller", "When do you open?", at(2), at(3))
    await repository.write_events([started(0), said, CallEnded("CAr", at(5), "disconnect"),
                                   CallEvent("CAr", "parameters", {"system_prompt": "Be brief."},
                                             at(0))])
    dropped = await repository.stream_end("CAr")
    assert dropped is not None and dropped.started and dropped.end_reason == "disconnect"
    assert dropped.parameters == {"system_prompt": "Be brief."}
    assert (dropped.from_number, dropped.to_number, dropped.direction) == (
        "+15550001", "+15550002", "inbound")

    await repository.write_events([started(7, resumed=1)])
    going = (await repository.get_call("CAr")).call
    assert (going.status, going.ended_at, going.end_reason, going.duration_s) == (
        "in-progress", None, None, None)
    assert (await repository.stream_end("CAr")).end_reason is None  # type: ignore[union-attr]

    await repository.write_events([CallEnded("CAr", at(20), "stop")])
    detail = await repository.get_call("CAr")
    assert (detail.call.status, detail.call.end_reason, detail.call.ended_at,
            detail.call.duration_s) == ("completed", "stop", at(20), 20.0)
    assert [u.text for u in detail.utterances] == ["When do you open?"]
    assert await repository.stream_end("CAnone") is None
