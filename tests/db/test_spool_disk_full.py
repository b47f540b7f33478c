"""The database is down and the spool's disk is full too: events wait in memory, in order,
and every one is written once the database is back; a half-written line never stays."""

from __future__ import annotations

import errno
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from db.recorder import CallRecorder
from db.spool import EventSpool
from pipeline.events import CallEnded, CallStarted, PipelineEvent, UtteranceDone

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


class FlakyRepository:
    """Stands in for `CallRepository`: records writes (and each transaction's size); refuses
    them while `down`."""

    def __init__(self) -> None:
        self.down = False
        self.written: list[tuple[str, Any]] = []
        self.batches: list[int] = []

    async def write_events(self, events: list[PipelineEvent]) -> None:
        if self.down:
            raise ConnectionRefusedError("database down")
        self.batches.append(len(events))
        for event in events:
            match event:
                case CallStarted():
                    self.written.append(("start", event.call_sid))
                case UtteranceDone():
                    self.written.append(("utterance", event.text))
                case CallEnded():
                    self.written.append(("end", event.call_sid))


def events(sid: str, words: list[str]) -> list[PipelineEvent]:
    said: list[PipelineEvent] = [UtteranceDone(sid, i, "caller", w, T0, T0)
                                 for i, w in enumerate(words)]
    return [CallStarted(sid, "MZ1", None, None, "inbound", T0), *said, CallEnded(sid, T0, "stop")]


async def test_events_wait_in_memory_when_the_spool_disk_is_full(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = FlakyRepository()
    recorder = CallRecorder(repo, tmp_path / "spool", attempts=1)  # type: ignore[arg-type]
    await recorder.start()
    repo.down = True
    first = events("CA1", ["one", "two"])
    await recorder.handle(first[0])  # the database is down: this one goes to disk
    disk_full = OSError(errno.ENOSPC, "No space left on device")

    def refuse(events: list[PipelineEvent]) -> int:
        raise disk_full

    monkeypatch.setattr(recorder.spool, "append_many", refuse)
    for event in first[1:]:
        await recorder.handle(event)
    monkeypatch.undo()  # the disk has room again: later events still queue behind memory
    second = events("CA2", ["three"])
    for event in second:
        await recorder.handle(event)
    assert recorder.spooling
    repo.down = False
    assert await recorder.replay()
    await recorder.stop()
    assert repo.written == [("start", "CA1"), ("utterance", "one"), ("utterance", "two"),
                            ("end", "CA1"), ("start", "CA2"), ("utterance", "three"),
                            ("end", "CA2")]
    assert repo.batches == [1, 6]  # the disk's one event, then memory's six in one transaction
    assert not recorder.spooling and not recorder.spool.pending()


async def test_events_still_in_memory_at_stop_are_moved_to_the_spool(tmp_path: Path) -> None:
    repo = FlakyRepository()
    recorder = CallRecorder(repo, tmp_path / "spool", attempts=1)  # type: ignore[arg-type]
    await recorder.start()
    repo.down = True
    recorder._memory.extend(events("CA1", ["kept"]))  # as if the disk had been full
    recorder._set_spooling(True)
    await recorder.stop()
    assert [e.kind for _, e in recorder.spool.peek()] == ["call_started", "utterance",
                                                          "call_ended"]


def test_a_refused_append_leaves_no_half_line(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    spool = EventSpool(tmp_path)
    assert spool.append(events("CA1", [])[0])
    size = spool.path.stat().st_size
    real_open = Path.open

    class HalfWriter:
        def __init__(self, handle: Any) -> None:
            self.handle = handle

        def __enter__(self) -> HalfWriter:
            return self

        def __exit__(self, *exc: object) -> None:
            self.handle.close()

        def write(self, data: bytes) -> int:
            self.handle.write(data[: len(data) // 2])
            self.handle.flush()
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "open", lambda self, *a, **k: HalfWriter(real_open(self, *a, **k)))
    with pytest.raises(OSError):
        spool.append(events("CA1", [])[-1])
    monkeypatch.undo()
    assert spool.path.stat().st_size == size
    assert spool.append(events("CA1", [])[-1])
    assert [e.kind for _, e in spool.peek()] == ["call_started", "call_ended"]
