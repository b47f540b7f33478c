"""One write transaction over calls and what they hold, for one event or a batch of them.

`CallWrites` works inside an open session. `lock_calls` creates the rows of the calls it will
touch (when missing) and locks them, in one statement each however many calls; the per-kind
methods then change a call row in memory or queue new utterance, metric and event rows, which
`flush` inserts with one statement per table. What writes must check first (utterances and
events already stored, a call's last utterance number) is read once for the whole batch
(`read_existing`), or on first use for a single write. `CallRepository` owns the session and
the transaction; this module only knows how the writes go.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from datetime import UTC, datetime, timedelta
from typing import Any, cast

from sqlalchemy import Insert, Table, bindparam, func, insert, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from db.models import (
    METRIC_FIELDS,
    TERMINAL_STATUSES,
    Call,
    CallEventRow,
    TurnMetric,
    Utterance,
    utcnow,
)
from pipeline.events import (
    CallEnded,
    CallEvent,
    CallStarted,
    PipelineEvent,
    TurnMetrics,
    UtteranceDone,
)

# Twilio's status callbacks may arrive out of order; a call's status never moves backwards.
_STATUS_RANK = {"queued": 0, "initiated": 1, "ringing": 2, "in-progress": 3}

_UtteranceKey = tuple[int, str, int, datetime]  # call id, role, turn, start
_EventKey = tuple[int, str, datetime]  # call id, type, time
_Stamp = tuple[int, datetime]  # call id, time: what has been read already

# New rows go in through Core (plain dicts, one executemany per table): no ORM objects. The
# statements are built once; lists go in as expanding parameters.
_CALLS = cast(Table, Call.__table__)
_UTTERANCES = cast(Table, Utterance.__table__)
_EVENTS = cast(Table, CallEventRow.__table__)
_METRICS = cast(Table, TurnMetric.__table__)
_LOCK_CALLS = (
    select(Call)
    .where(Call.call_sid.in_(bindparam("sids", expanding=True)))
    .order_by(Call.call_sid)  # every writer locks in the same order: no deadlock
    .with_for_update()
)
_STORED_UTTERANCES = select(
    Utterance.call_id, Utterance.role, Utterance.turn, Utterance.started_at, Utterance.seq
).where(
    Utterance.call_id.in_(bindparam("call_ids", expanding=True)),
    Utterance.started_at.in_(bindparam("starts", expanding=True)),
)
_LAST_SEQS = (
    select(Utterance.call_id, func.max(Utterance.seq))
    .where(Utterance.call_id.in_(bindparam("call_ids", expanding=True)))
    .group_by(Utterance.call_id)
)
_STORED_EVENTS = select(CallEventRow.call_id, CallEventRow.type, CallEventRow.at).where(
    CallEventRow.call_id.in_(bindparam("call_ids", expanding=True)),
    CallEventRow.at.in_(bindparam("ats", expanding=True)),
)
_INSERT_UTTERANCES = insert(_UTTERANCES)
_INSERT_EVENTS = insert(_EVENTS)


@dataclass(frozen=True)
class _Upserts:
    """The statements whose ON CONFLICT clause is the dialect's own."""

    create_calls: Insert
    merge_metrics: Insert


@functools.cache
def _upserts(dialect: str) -> _Upserts:
    dialect_insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    create_calls = dialect_insert(_CALLS).on_conflict_do_nothing(index_elements=["call_sid"])
    metrics = dialect_insert(_METRICS)
    # None leaves a part as it was.
    keep = {name: func.coalesce(metrics.excluded[name], _METRICS.c[name])
            for name in METRIC_FIELDS}
    merge_metrics = metrics.on_conflict_do_update(index_elements=["call_id", "turn"], set_=keep)
    return _Upserts(create_calls, merge_metrics)


def utc(value: datetime) -> datetime:
    """`value` in UTC; a naive datetime is taken as UTC."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def next_status(current: str, new: str) -> str:
    """The call's status after `new` arrives, never moving backwards."""
    if new in TERMINAL_STATUSES:
        return new
    if current in TERMINAL_STATUSES:
        return current
    return new if _STATUS_RANK.get(new, 0) >= _STATUS_RANK.get(current, 0) else current


def first_seen(events: Iterable[PipelineEvent]) -> dict[str, datetime]:
    """Each call's time in its first event: the start of its row if that one creates it."""
    times: dict[str, datetime] = {}
    for event in events:
        if event.call_sid not in times:
            times[event.call_sid] = utc(event_time(event))
    return times


def event_time(event: PipelineEvent) -> datetime:
    match event:
        case CallStarted() | UtteranceDone():
            return event.started_at
        case CallEvent():
            return event.at
        case CallEnded():
            return event.ended_at
        case TurnMetrics():
            return utcnow()


def metric_parts(event: TurnMetrics) -> dict[str, float | None]:
    return {f.name: getattr(event, f.name) for f in fields(event) if f.name.endswith("_ms")}


class CallWrites:
    """The writes of one transaction; see the module docstring."""

    def __init__(self, session: AsyncSession, dialect: str) -> None:
        self._session = session
        self._upserts = _upserts(dialect)
        self._calls: dict[str, Call] = {}
        self._last_seq: dict[int, int] = {}
        self._utterances: dict[_UtteranceKey, int] = {}  # → seq
        self._events: set[_EventKey] = set()
        self._utterances_read: set[_Stamp] = set()
        self._events_read: set[_Stamp] = set()
        self._new_utterances: list[dict[str, Any]] = []
        self._new_events: list[dict[str, Any]] = []
        self._metrics: dict[tuple[int, int], dict[str, Any]] = {}

    async def lock_calls(self, times: Mapping[str, datetime], status: str = "in-progress") -> None:
        """Create the missing rows of these calls (starting at their time) and lock them all."""
        created = utcnow()
        rows = [{"call_sid": sid, "status": status, "started_at": start, "created_at": created}
                for sid, start in sorted(times.items())]  # the lock order, as _LOCK_CALLS
        await self._session.execute(self._upserts.create_calls, rows)
        calls = await self._session.scalars(_LOCK_CALLS, {"sids": list(times)})
        self._calls.update((call.call_sid, call) for call in calls)

    async def read_existing(self, events: Sequence[PipelineEvent]) -> None:
        """Read at once what `events`' utterances and call events must be checked against."""
        await self._read_utterances(
            [(self._id(e.call_sid), utc(e.started_at)) for e in events
             if isinstance(e, UtteranceDone)]
        )
        await self._read_events(
            [(self._id(e.call_sid), utc(e.at)) for e in events if isinstance(e, CallEvent)]
        )

    async def apply(self, event: PipelineEvent) -> None:
        """Write one pipeline event."""
        match event:
            case CallStarted():
                self.start_call(
                    event.call_sid,
                    started_at=utc(event.started_at),
                    stream_sid=event.stream_sid,
                    from_number=event.from_number,
                    to_number=event.to_number,
                    direction=event.direction,
                    resumed=bool(event.resumed),
                )
            case UtteranceDone():
                await self.add_utterance(
                    event.call_sid,
                    turn=event.turn,
                    role=event.role,
                    text=event.text,
                    started_at=utc(event.started_at),
                    ended_at=utc(event.ended_at),
                    generated_text=event.generated_text,
                    interrupted=event.interrupted,
                )
            case TurnMetrics():
                self.add_metrics(event.call_sid, event.turn, metric_parts(event))
            case CallEvent():
                await self.add_event(event.call_sid, event.type, event.detail, utc(event.at))
            case CallEnded():
                self.finalize_call(event.call_sid, ended_at=utc(event.ended_at),
                                   reason=event.reason)

    # -- per kind (times already in UTC; the call locked) --------------------------------

    def start_call(
        self,
        call_sid: str,
        *,
        started_at: datetime,
        stream_sid: str | None,
        from_number: str | None,
        to_number: str | None,
        direction: str | None,
        resumed: bool = False,
    ) -> None:
        call = self._calls[call_sid]
        call.stream_sid = stream_sid or call.stream_sid
        _fill_parties(call, from_number, to_number, direction)
        call.started_at = min(call.started_at, started_at)
        call.answered_at = call.answered_at or started_at
        if resumed:  # its stream dropped and was connected again: the call goes on
            call.ended_at = call.end_reason = call.duration_s = None
            call.status = "in-progress"
        else:
            call.status = next_status(call.status, "in-progress")

    def finalize_call(self, call_sid: str, *, ended_at: datetime, reason: str) -> None:
        call = self._calls[call_sid]
        call.ended_at = call.ended_at or ended_at
        call.end_reason = call.end_reason or reason
        if call.duration_s is None:
            since = call.answered_at or call.started_at
            call.duration_s = round(max(0.0, (call.ended_at - since).total_seconds()), 3)
        if call.status not in TERMINAL_STATUSES:
            call.status = "completed"

    def update_status(
        self,
        call_sid: str,
        status: str,
        *,
        at: datetime,
        duration_s: float | None,
        from_number: str | None,
        to_number: str | None,
        direction: str | None,
    ) -> None:
        call = self._calls[call_sid]
        _fill_parties(call, from_number, to_number, direction)
        call.started_at = min(call.started_at, at)
        call.status = next_status(call.status, status)
        if status == "in-progress":
            call.answered_at = call.answered_at or at
        if status in TERMINAL_STATUSES:
            call.ended_at = call.ended_at or at
            if status != "completed":
                call.end_reason = call.end_reason or status
        if duration_s is not None:
            call.duration_s = duration_s
            call.started_at = min(call.started_at, at - timedelta(seconds=duration_s))

    async def add_utterance(
        self,
        call_sid: str,
        *,
        turn: int,
        role: str,
        text: str,
        started_at: datetime,
        ended_at: datetime,
        generated_text: str | None,
        interrupted: bool,
    ) -> int:
        """Queue the utterance unless it is stored already; its sequence number either way."""
        call_id = self._id(call_sid)
        await self._read_utterances([(call_id, started_at)])
        key = (call_id, role, turn, started_at)
        seq = self._utterances.get(key)
        if seq is None:
            seq = self._last_seq[call_id] + 1
            self._last_seq[call_id] = self._utterances[key] = seq
            self._new_utterances.append(
                {
                    "call_id": call_id,
                    "turn": turn,
                    "seq": seq,
                    "role": role,
                    "text": text,
                    "generated_text": generated_text,
                    "interrupted": interrupted,
                    "started_at": started_at,
                    "ended_at": ended_at,
                }
            )
        return seq

    def add_metrics(self, call_sid: str, turn: int, metrics: Mapping[str, float | None]) -> None:
        """Queue latency parts of a turn; None leaves a part as it was."""
        unknown = set(metrics) - set(METRIC_FIELDS)
        if unknown:
            raise ValueError(f"unknown metric fields {sorted(unknown)}")
        key = (self._id(call_sid), turn)
        row = self._metrics.setdefault(
            key, {"call_id": key[0], "turn": turn} | dict.fromkeys(METRIC_FIELDS)
        )
        row.update({name: float(value) for name, value in metrics.items() if value is not None})

    async def add_event(
        self, call_sid: str, type: str, detail: Mapping[str, Any], at: datetime
    ) -> None:
        """Queue a call event unless the same (call, type, time) is stored already."""
        call_id = self._id(call_sid)
        await self._read_events([(call_id, at)])
        key = (call_id, type, at)
        if key in self._events:
            return
        self._events.add(key)
        # Whatever the detail holds, store it as JSON (datetimes and the like as text).
        stored = json.loads(json.dumps(dict(detail), default=str))
        self._new_events.append({"call_id": call_id, "type": type, "detail": stored, "at": at})

    async def flush(self) -> None:
        """Insert the queued rows: one statement per table."""
        session = self._session
        if self._new_utterances:
            await session.execute(_INSERT_UTTERANCES, self._new_utterances)
        if self._new_events:
            await session.execute(_INSERT_EVENTS, self._new_events)
        if self._metrics:
            await session.execute(self._upserts.merge_metrics, list(self._metrics.values()))
        self._new_utterances, self._new_events, self._metrics = [], [], {}

    # -- internals ----------------------------------------------------------------------

    def _id(self, call_sid: str) -> int:
        return self._calls[call_sid].id

    async def _read_utterances(self, stamps: Collection[_Stamp]) -> None:
        """Sequence numbers of the utterances stored at these (call, start), and the last
        sequence number of each of their calls."""
        todo = set(stamps) - self._utterances_read
        if not todo:
            return
        call_ids = {call_id for call_id, _ in todo}
        stored = await self._session.execute(
            _STORED_UTTERANCES,
            {"call_ids": list(call_ids), "starts": list({start for _, start in todo})},
        )
        for call_id, role, turn, start, seq in stored:
            self._utterances.setdefault((call_id, role, turn, start), seq)
        unnumbered = call_ids - self._last_seq.keys()
        if unnumbered:
            last = await self._session.execute(_LAST_SEQS, {"call_ids": list(unnumbered)})
            self._last_seq.update(dict.fromkeys(unnumbered, 0))
            self._last_seq.update({call_id: seq for call_id, seq in last})
        self._utterances_read |= todo

    async def _read_events(self, stamps: Collection[_Stamp]) -> None:
        """The call events stored at these (call, time)."""
        todo = set(stamps) - self._events_read
        if not todo:
            return
        stored = await self._session.execute(
            _STORED_EVENTS,
            {"call_ids": list({call_id for call_id, _ in todo}),
             "ats": list({at for _, at in todo})},
        )
        self._events.update((call_id, type, at) for call_id, type, at in stored)
        self._events_read |= todo


def _fill_parties(
    call: Call, from_number: str | None, to_number: str | None, direction: str | None
) -> None:
    call.from_number = call.from_number or from_number
    call.to_number = call.to_number or to_number
    call.direction = call.direction or direction
