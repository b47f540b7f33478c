import os
from datetime import UTC, datetime
from pathlib import Path

import pytest

from db.spool import EventSpool, decode_event, encode_event
from pipeline.events import CallEnded, CallEvent, CallStarted, TurnMetrics, UtteranceDone

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


def _utterance(turn: int, text: str = "hello") -> UtteranceDone:
    return UtteranceDone("CA1", turn, "caller", text, T0, T0)


def test_every_event_kind_survives_the_round_trip() -> None:
    events = [
        CallStarted("CA1", "MZ1", "+15550001", "+15550002", "inbound", T0),
        UtteranceDone("CA1", 1, "bot", "Hi th", T0, T0, "Hi there!", interrupted=True),
        TurnMetrics("CA1", 1, endpoint_ms=500.0, v2v_ms=900.5),
        CallEvent("CA1", "dtmf", {"digit": "5"}, T0),
        CallEnded("CA1", T0, "hangup"),
    ]
    for event in events:
        assert decode_event(encode_event(event)) == event


def test_events_come_back_in_order_and_resume_after_a_restart(tmp_path: Path) -> None:
    spool = EventSpool(tmp_path)
    for turn in range(1, 6):
        assert spool.append(_utterance(turn))
    batch = spool.peek(2)
    assert [e.turn for _, e in batch if isinstance(e, UtteranceDone)] == [1, 2]
    spool.consume(batch[-1][0])

    reopened = EventSpool(tmp_path)
    rest = reopened.peek(10)
    assert [e.turn for _, e in rest if isinstance(e, UtteranceDone)] == [3, 4, 5]
    reopened.consume(rest[-1][0])
    assert not reopened.pending()
    assert not reopened.path.exists()


def test_a_full_spool_keeps_what_was_said_longest(tmp_path: Path) -> None:
    line = len(encode_event(_utterance(1))) + 1
    spool = EventSpool(tmp_path, max_bytes=line * 10)
    for turn in range(8):
        assert spool.append(_utterance(turn))
    # Past 80 % of the bound, metrics and call events are refused; utterances still fit.
    assert not spool.append(CallEvent("CA1", "barge_in", {}, T0))
    assert spool.append(_utterance(8))
    assert spool.append(_utterance(9))
    assert not spool.append(_utterance(10))
    assert spool.dropped == 2


def test_a_batch_is_spooled_in_one_disk_sync_in_order_within_the_bound(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A refused batch (200 events, say, while the database is down) costs one write and one
    fsync, not one each; the bound and the priorities hold event by event."""
    syncs: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (syncs.append(fd), real_fsync(fd))[1])
    line = len(encode_event(_utterance(1))) + 1
    spool = EventSpool(tmp_path, max_bytes=line * 10)
    batch = [_utterance(turn) for turn in range(8)] + [CallEvent("CA1", "barge_in", {}, T0)]
    batch += [_utterance(turn) for turn in range(8, 12)]
    assert spool.append_many(batch) == 10  # the call event (past 80 %) and turns 10, 11 out
    assert len(syncs) == 1 and spool.dropped == 3
    kept = [e.turn for _, e in spool.peek(20) if isinstance(e, UtteranceDone)]
    assert kept == list(range(10))
    assert spool.append_many([]) == 0 and len(syncs) == 1


def test_a_half_written_last_line_is_cut_not_replayed(tmp_path: Path) -> None:
    spool = EventSpool(tmp_path)
    spool.append(_utterance(1))
    with spool.path.open("ab") as raw:
        raw.write(b'{"call_sid":"CA1","tu')  # the process died mid-write
    reopened = EventSpool(tmp_path)
    reopened.append(_utterance(2))
    events = [e for _, e in reopened.peek()]
    assert [e.turn for e in events if isinstance(e, UtteranceDone)] == [1, 2]


def test_a_corrupt_line_is_skipped(tmp_path: Path) -> None:
    spool = EventSpool(tmp_path)
    spool.append(_utterance(1))
    with spool.path.open("ab") as raw:
        raw.write(b"not json\n")
    spool.append(_utterance(2))
    events = [e for _, e in spool.peek()]
    assert events[1] is None
    assert [e.turn for e in events if isinstance(e, UtteranceDone)] == [1, 2]
