"""Reading and writing calls: the only place that knows the tables (with `db.writes`).

Every write is one short transaction: one event, a status callback, or a batch of pipeline
events (`write_events`: one commit for all of them). Writes for a call whose row does not exist
yet (a status callback that beats the media stream, an utterance replayed from the spool)
create the row first, so events may arrive in any order.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy import Select, delete, func, or_, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from db.engine import session_factory
from db.models import (
    CALL_STATUSES,
    Call,
    CallEventRow,
    TurnMetric,
    Utterance,
    utcnow,
)
from db.records import (
    CallDetail,
    CallPage,
    CallRecord,
    EventRecord,
    MetricRecord,
    StreamEnd,
    UtteranceRecord,
)
from db.writes import CallWrites, first_seen, utc
from pipeline.events import PipelineEvent

T = TypeVar("T")
# A write whose utterance number another writer took meanwhile is tried again, this often.
_WRITE_TRIES = 3


class CallNotFound(LookupError):
    """No call is stored under `call_sid`."""

    def __init__(self, call_sid: str) -> None:
        self.call_sid = call_sid
        super().__init__(f"no call {call_sid!r}")


class CallRepository:
    """Async storage of calls, utterances, turn metrics and call events."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._sessions = session_factory(engine)

    async def ping(self) -> None:
        """Raise unless the database answers (for `/readyz`)."""
        async with self._engine.connect() as connection:
            await connection.execute(text("SELECT 1"))

    # -- writes -------------------------------------------------------------------------

    async def write_events(self, events: Sequence[PipelineEvent]) -> None:
        """Store pipeline events, in order, in one transaction: all of them or none.

        Each event is written as its own method below would write it (idempotent, creating
        the call's row when missing), with one lock per call and one insert per table.
        """
        if not events:
            return

        async def write(writes: CallWrites) -> None:
            await writes.read_existing(events)
            for event in events:
                await writes.apply(event)

        await self._write(first_seen(events), write)

    async def start_call(
        self,
        call_sid: str,
        *,
        started_at: datetime,
        stream_sid: str | None = None,
        from_number: str | None = None,
        to_number: str | None = None,
        direction: str | None = None,
    ) -> None:
        """Record that the media stream started (the call is answered and in progress)."""
        started_at = utc(started_at)

        async def write(writes: CallWrites) -> None:
            writes.start_call(call_sid, started_at=started_at, stream_sid=stream_sid,
                              from_number=from_number, to_number=to_number, direction=direction)

        await self._write({call_sid: started_at}, write)

    async def finalize_call(self, call_sid: str, *, ended_at: datetime, reason: str) -> None:
        """Record the end of the call as we saw it (stop, hangup, error...)."""
        ended_at = utc(ended_at)

        async def write(writes: CallWrites) -> None:
            writes.finalize_call(call_sid, ended_at=ended_at, reason=reason)

        await self._write({call_sid: ended_at}, write)

    async def update_status(
        self,
        call_sid: str,
        status: str,
        *,
        at: datetime | None = None,
        duration_s: float | None = None,
        from_number: str | None = None,
        to_number: str | None = None,
        direction: str | None = None,
    ) -> None:
        """Apply a Twilio status callback; Twilio's CallDuration wins over our own count."""
        if status not in CALL_STATUSES:
            raise ValueError(f"unknown call status {status!r}")
        when = utc(at) if at is not None else utcnow()

        async def write(writes: CallWrites) -> None:
            writes.update_status(call_sid, status, at=when, duration_s=duration_s,
                                 from_number=from_number, to_number=to_number,
                                 direction=direction)

        await self._write({call_sid: when}, write, status=status)

    async def add_utterance(
        self,
        call_sid: str,
        *,
        turn: int,
        role: str,
        text: str,
        started_at: datetime,
        ended_at: datetime,
        generated_text: str | None = None,
        interrupted: bool = False,
    ) -> int:
        """Store one utterance and return its sequence number in the call.

        Idempotent: the same utterance (call, role, turn, start) written twice, as after a
        spool replay whose first attempt did commit, is stored once.
        """
        started_at, ended_at = utc(started_at), utc(ended_at)

        async def write(writes: CallWrites) -> int:
            return await writes.add_utterance(
                call_sid, turn=turn, role=role, text=text, started_at=started_at,
                ended_at=ended_at, generated_text=generated_text, interrupted=interrupted,
            )

        return await self._write({call_sid: started_at}, write)

    async def add_metrics(
        self, call_sid: str, turn: int, metrics: Mapping[str, float | None]
    ) -> None:
        """Store (or complete) the latency parts of one turn; None leaves a part as it was."""

        async def write(writes: CallWrites) -> None:
            writes.add_metrics(call_sid, turn, metrics)

        await self._write({call_sid: utcnow()}, write)

    async def add_event(
        self, call_sid: str, type: str, detail: Mapping[str, Any], at: datetime
    ) -> None:
        """Store a call event; the same (call, type, time) twice is stored once."""
        at = utc(at)

        async def write(writes: CallWrites) -> None:
            await writes.add_event(call_sid, type, detail, at)

        await self._write({call_sid: at}, write)

    async def forget_number(self, number: str) -> int:
        """Delete every call to or from `number` (exact match) with all it holds.

        Returns how many calls were deleted.
        """
        async with self._sessions() as session, session.begin():
            ids = list(
                await session.scalars(
                    select(Call.id).where(or_(Call.from_number == number, Call.to_number == number))
                )
            )
            if not ids:
                return 0
            for child in (Utterance, TurnMetric, CallEventRow):
                await session.execute(delete(child).where(child.call_id.in_(ids)))
            await session.execute(delete(Call).where(Call.id.in_(ids)))
            return len(ids)

    # -- reads --------------------------------------------------------------------------

    async def list_calls(
        self,
        *,
        page: int = 1,
        page_size: int = 50,
        number: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> CallPage:
        """Calls newest first. `number` matches part of the caller's or the called number;
        `since` is inclusive and `until` exclusive, both on the call's start."""
        if page < 1 or page_size < 1:
            raise ValueError("page and page_size start at 1")
        filters = []
        if number:
            filters.append(
                or_(
                    Call.from_number.contains(number, autoescape=True),
                    Call.to_number.contains(number, autoescape=True),
                )
            )
        if since is not None:
            filters.append(Call.started_at >= utc(since))
        if until is not None:
            filters.append(Call.started_at < utc(until))
        utterance_count = (
            select(func.count(Utterance.id))
            .where(Utterance.call_id == Call.id)
            .correlate(Call)
            .scalar_subquery()
        )
        query: Select[tuple[Call, int]] = (
            select(Call, utterance_count)
            .where(*filters)
            .order_by(Call.started_at.desc(), Call.id.desc())
            .limit(page_size)
            .offset((page - 1) * page_size)
        )
        async with self._sessions() as session:
            total = await session.scalar(select(func.count(Call.id)).where(*filters)) or 0
            rows = (await session.execute(query)).all()
        calls = [CallRecord.of(call, count) for call, count in rows]
        return CallPage(calls=calls, page=page, page_size=page_size, total=total)

    async def stream_end(self, call_sid: str) -> StreamEnd | None:
        """How this call's media stream stands, for `/twilio/stream-ended`: did one start on
        any of our servers (`start_call` stored it), how did the call end if it did, and the
        stream parameters it began with (its latest `parameters` event). None: no such call."""
        async with self._sessions() as session:
            call = await session.scalar(select(Call).where(Call.call_sid == call_sid))
            if call is None:
                return None
            parameters = await session.scalar(
                select(CallEventRow.detail)
                .where(CallEventRow.call_id == call.id, CallEventRow.type == "parameters")
                .order_by(CallEventRow.at.desc(), CallEventRow.id.desc()).limit(1))
        return StreamEnd(
            started=call.stream_sid is not None, end_reason=call.end_reason,
            from_number=call.from_number, to_number=call.to_number, direction=call.direction,
            parameters={str(k): str(v) for k, v in (parameters or {}).items()})

    async def get_call(self, call_sid: str) -> CallDetail:
        """One call with its transcript in spoken order; raises `CallNotFound`."""
        async with self._sessions() as session:
            call = await session.scalar(select(Call).where(Call.call_sid == call_sid))
            if call is None:
                raise CallNotFound(call_sid)
            utterances = await session.scalars(
                select(Utterance)
                .where(Utterance.call_id == call.id)
                .order_by(Utterance.started_at, Utterance.seq)
            )
            metrics = await session.scalars(
                select(TurnMetric).where(TurnMetric.call_id == call.id).order_by(TurnMetric.turn)
            )
            events = await session.scalars(
                select(CallEventRow)
                .where(CallEventRow.call_id == call.id)
                .order_by(CallEventRow.at, CallEventRow.id)
            )
            utterance_rows = [UtteranceRecord.of(u) for u in utterances]
            return CallDetail(
                call=CallRecord.of(call, len(utterance_rows)),
                utterances=utterance_rows,
                metrics=[MetricRecord.of(m) for m in metrics],
                events=[EventRecord.of(e) for e in events],
            )

    # -- helpers ------------------------------------------------------------------------

    async def _write(
        self,
        calls: Mapping[str, datetime],
        write: Callable[[CallWrites], Awaitable[T]],
        *,
        status: str = "in-progress",
    ) -> T:
        """Run `write` in one transaction, `calls` (each with the time that starts its row if
        missing) created and locked first."""
        for attempt in range(_WRITE_TRIES):
            try:
                async with self._sessions() as session, session.begin():
                    writes = CallWrites(session, self._engine.dialect.name)
                    await writes.lock_calls(calls, status)
                    result = await write(writes)
                    await writes.flush()
                return result
            except IntegrityError:
                # Another writer took an utterance's seq between our read and insert: read again.
                if attempt == _WRITE_TRIES - 1:
                    raise
        raise AssertionError("unreachable")
