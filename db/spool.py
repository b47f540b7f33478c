"""A bounded on-disk queue of pipeline events, for when the database is unreachable.

Events are JSON lines appended to `events.jsonl`; `events.offset` remembers how far replay has
got, so a restart resumes where it stopped (replaying a few events twice at worst, which the
repository's writes tolerate). Events that the database rejects outright (bad data, not an
outage) go to `rejected.jsonl` so that they are kept but never block the queue.

All methods are blocking file I/O: call them through `asyncio.to_thread`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import threading
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from pipeline.events import (
    CallEnded,
    CallEvent,
    CallStarted,
    PipelineEvent,
    TurnMetrics,
    UtteranceDone,
)

log = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 64 * 1024 * 1024
# Past this share of the bound only what was said (and call start/end) is still kept.
LOW_PRIORITY_SHARE = 0.8
_LOW_PRIORITY = {"turn_metrics", "call_event"}
_KINDS: dict[str, type[Any]] = {
    "call_started": CallStarted,
    "utterance": UtteranceDone,
    "turn_metrics": TurnMetrics,
    "call_event": CallEvent,
    "call_ended": CallEnded,
}
_DATETIME_FIELDS = {"started_at", "ended_at", "at"}


def encode_event(event: PipelineEvent) -> str:
    """One JSON line (without the newline) for a pipeline event."""
    data = {f.name: getattr(event, f.name) for f in dataclasses.fields(event)}
    return json.dumps(data, default=_json_default, separators=(",", ":"))


def decode_event(line: str) -> PipelineEvent:
    """The event back from `encode_event`'s line; ValueError/KeyError/TypeError when corrupt."""
    data = json.loads(line)
    cls = _KINDS[data["kind"]]
    for name in _DATETIME_FIELDS & data.keys():
        data[name] = datetime.fromisoformat(data[name])
    return cls(**data)  # type: ignore[no-any-return]


def _json_default(value: object) -> object:
    return value.isoformat() if isinstance(value, datetime) else str(value)


class EventSpool:
    """FIFO of events on disk, bounded by `max_bytes`; thread-safe."""

    def __init__(self, directory: Path | str, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self.path = self.directory / "events.jsonl"
        self.offset_path = self.directory / "events.offset"
        self.rejected_path = self.directory / "rejected.jsonl"
        self.dropped = 0
        self._lock = threading.Lock()
        self._repaired = False

    def append(self, event: PipelineEvent) -> bool:
        """Add an event at the end; False (and an error log) when the spool is full.

        Raises `OSError` when the disk refuses the write (full, read-only); the file is then
        cut back to where it was, so no half line is left in front of later events."""
        return self.append_many([event]) == 1

    def append_many(self, events: Sequence[PipelineEvent]) -> int:
        """Add events at the end, in order, in one write and one disk sync (a batch the
        database refused); returns how many were kept. An event the spool has no room for is
        dropped with an error log (what was said keeps the last fifth of the room).

        Raises `OSError` when the disk refuses the write, none of them then kept: the file is
        cut back to where it was, so no half line is left in front of later events."""
        with self._lock:
            self._repair_once()
            size = self._size()
            lines: list[bytes] = []
            end = size
            for event in events:
                line = (encode_event(event) + "\n").encode()
                limit = self.max_bytes
                if event.kind in _LOW_PRIORITY:
                    limit = int(self.max_bytes * LOW_PRIORITY_SHARE)
                if end + len(line) > limit:
                    self.dropped += 1
                    log.error("spool full (%d bytes): dropped %s call_sid=%s",
                              end, event.kind, event.call_sid)
                    continue
                lines.append(line)
                end += len(line)
            if not lines:
                return 0
            try:
                with self.path.open("ab") as spool:
                    spool.write(b"".join(lines))
                    spool.flush()
                    os.fsync(spool.fileno())
            except OSError:
                with contextlib.suppress(OSError):
                    os.truncate(self.path, size)
                raise
            return len(lines)

    def pending(self) -> bool:
        """True while events wait to be replayed."""
        with self._lock:
            self._repair_once()
            return self._size() > self._offset()

    def peek(self, limit: int = 100) -> list[tuple[int, PipelineEvent | None]]:
        """Up to `limit` events from the head, each with the offset just past it.

        A corrupt line comes back as None (with its offset) so the caller can skip it.
        """
        out: list[tuple[int, PipelineEvent | None]] = []
        with self._lock:
            self._repair_once()
            if not self.path.exists():
                return out
            offset = self._offset()
            with self.path.open("rb") as spool:
                spool.seek(offset)
                for raw in spool:
                    if not raw.endswith(b"\n"):
                        break
                    offset += len(raw)
                    try:
                        out.append((offset, decode_event(raw.decode())))
                    except (ValueError, KeyError, TypeError):
                        log.error("spool: skipping a corrupt line at offset %d", offset - len(raw))
                        out.append((offset, None))
                    if len(out) >= limit:
                        break
        return out

    def consume(self, offset: int) -> None:
        """Mark everything before `offset` as replayed; empties the file once all is."""
        with self._lock:
            size = self._size()
            # Offset first: a crash in between then replays a little twice, never skips.
            if offset >= size:
                self.offset_path.unlink(missing_ok=True)
                self.path.unlink(missing_ok=True)
            elif offset > self.max_bytes // 2:
                self._compact(offset)
            else:
                self._write_atomic(self.offset_path, str(offset).encode())

    def reject(self, event: PipelineEvent, reason: str) -> None:
        """Keep an event the database refused, with why, out of the replay queue."""
        line = json.dumps({"reason": reason, "event": json.loads(encode_event(event))})
        with self._lock:
            self.directory.mkdir(parents=True, exist_ok=True)
            with self.rejected_path.open("a", encoding="utf-8") as rejected:
                rejected.write(line + "\n")

    # -- internals (hold the lock) -------------------------------------------------------

    def _size(self) -> int:
        try:
            return self.path.stat().st_size
        except FileNotFoundError:
            return 0

    def _offset(self) -> int:
        try:
            return int(self.offset_path.read_text() or 0)
        except (FileNotFoundError, ValueError):
            return 0

    def _repair_once(self) -> None:
        """Create the directory; cut a half-written last line left by a crash."""
        if self._repaired:
            return
        self._repaired = True
        self.directory.mkdir(parents=True, exist_ok=True)
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end < len(data):
            log.error("spool: dropping a half-written last line (%d bytes)", len(data) - end)
            with self.path.open("r+b") as spool:
                spool.truncate(end)

    def _compact(self, offset: int) -> None:
        with self.path.open("rb") as spool:
            spool.seek(offset)
            rest = spool.read()
        self.offset_path.unlink(missing_ok=True)
        self._write_atomic(self.path, rest)

    @staticmethod
    def _write_atomic(path: Path, data: bytes) -> None:
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
