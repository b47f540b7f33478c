"""Reading and writing calls: the only place that knows the tables.

Every write is its own short transaction. Writes for a call whose row does not exist yet (a
status callback that beats the media stream, an utterance replayed from the spool) create the
row first, so events may arrive in any order.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Select, delete, func, or_, select, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from db.engine import session_factory
from db.models import (
    CALL_STATUSES,
    METRIC_FIELDS,
    TERMINAL_STATUSES,
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
    UtteranceRecord,
)

# Twilio's status callbacks may arrive out of order; a call's status never moves backwards.
_STATUS_RANK = {"queued": 0, "initiated": 1, "ringing": 2, "in-progress": 3}


class CallNotFound(LookupError):
    """No call is stored under `call_sid`."""

    def __init__(self, call_sid: str) -> None:
        self.call_sid = call_sid
        super().__init__(f"no call {call_sid!r}")


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _next_status(current: str, new: str) -> str:
    if new in TERMINAL_STATUSES:
        return new
    if current in TERMINAL_STATUSES:
        return current
    return new if _STATUS_RANK.get(new, 0) >= _STATUS_RANK.get(current, 0) else current


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
        started_at = _utc(started_at)
        async with self._sessions() as session, session.begin():
            call = await self._upsert(session, call_sid, started_at)
            call.stream_sid = stream_sid or call.stream_sid
            self._fill_parties(call, from_number, to_number, direction)
            call.started_at = min(call.started_at, started_at)
            call.answered_at = call.answered_at or started_at
            call.status = _next_status(call.status, "in-progress")

    async def finalize_call(self, call_sid: str, *, ended_at: datetime, reason: str) -> None:
        """Record the end of the call as we saw it (stop, hangup, error...)."""
        ended_at = _utc(ended_at)
        async with self._sessions() as session, session.begin():
            call = await self._upsert(session, call_sid, ended_at)
            call.ended_at = call.ended_at or ended_at
            call.end_reason = call.end_reason or reason
            if call.duration_s is None:
                since = call.answered_at or call.started_at
                call.duration_s = round(max(0.0, (call.ended_at - since).total_seconds()), 3)
            if call.status not in TERMINAL_STATUSES:
                call.status = "completed"

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
        at = _utc(at) if at is not None else utcnow()
        async with self._sessions() as session, session.begin():
            call = await self._upsert(session, call_sid, at, status=status)
            self._fill_parties(call, from_number, to_number, direction)
            call.started_at = min(call.started_at, at)
            call.status = _next_status(call.status, status)
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
        generated_text: str | None = None,
        interrupted: bool = False,
    ) -> int:
        """Store one utterance and return its sequence number in the call.

        Idempotent: the same utterance (call, role, turn, start) written twice, as after a
        spool replay whose first attempt did commit, is stored once.
        """
        started_at, ended_at = _utc(started_at), _utc(ended_at)
        for attempt in range(3):
            try:
                async with self._sessions() as session, session.begin():
                    call = await self._upsert(session, call_sid, started_at)
                    same = await session.scalar(
                        select(Utterance.seq).where(
                            Utterance.call_id == call.id,
                            Utterance.role == role,
                            Utterance.turn == turn,
                            Utterance.started_at == started_at,
                        )
                    )
                    if same is not None:
                        return same
                    last = await session.scalar(
                        select(func.max(Utterance.seq)).where(Utterance.call_id == call.id)
                    )
                    seq = (last or 0) + 1
                    session.add(
                        Utterance(
                            call_id=call.id,
                            turn=turn,
                            seq=seq,
                            role=role,
                            text=text,
                            generated_text=generated_text,
                            interrupted=interrupted,
                            started_at=started_at,
                            ended_at=ended_at,
                        )
                    )
                return seq
            except IntegrityError:
                # Another writer took this seq between our read and insert: read again.
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    async def add_metrics(
        self, call_sid: str, turn: int, metrics: Mapping[str, float | None]
    ) -> None:
        """Store (or complete) the latency parts of one turn; None leaves a part as it was."""
        unknown = set(metrics) - set(METRIC_FIELDS)
        if unknown:
            raise ValueError(f"unknown metric fields {sorted(unknown)}")
        async with self._sessions() as session, session.begin():
            call = await self._upsert(session, call_sid, utcnow())
            row = await session.scalar(
                select(TurnMetric).where(TurnMetric.call_id == call.id, TurnMetric.turn == turn)
            )
            if row is None:
                row = TurnMetric(call_id=call.id, turn=turn)
                session.add(row)
            for name, value in metrics.items():
                if value is not None:
                    setattr(row, name, float(value))

    async def add_event(
        self, call_sid: str, type: str, detail: Mapping[str, Any], at: datetime
    ) -> None:
        """Store a call event; the same (call, type, time) twice is stored once."""
        at = _utc(at)
        async with self._sessions() as session, session.begin():
            call = await self._upsert(session, call_sid, at)
            same = await session.scalar(
                select(CallEventRow.id).where(
                    CallEventRow.call_id == call.id,
                    CallEventRow.type == type,
                    CallEventRow.at == at,
                )
            )
            if same is None:
                # Whatever the detail holds, store it as JSON (datetimes and the like as text).
                stored = json.loads(json.dumps(dict(detail), default=str))
                session.add(CallEventRow(call_id=call.id, type=type, detail=stored, at=at))

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
            filters.append(Call.started_at >= _utc(since))
        if until is not None:
            filters.append(Call.started_at < _utc(until))
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

    async def _upsert(
        self, session: AsyncSession, call_sid: str, at: datetime, status: str = "in-progress"
    ) -> Call:
        """The call's row, locked for this transaction, created first when missing."""
        insert = postgresql.insert if self._engine.dialect.name == "postgresql" else sqlite.insert
        await session.execute(
            insert(Call)
            .values(call_sid=call_sid, status=status, started_at=at, created_at=utcnow())
            .on_conflict_do_nothing(index_elements=["call_sid"])
        )
        call = await session.scalar(select(Call).where(Call.call_sid == call_sid).with_for_update())
        assert call is not None
        return call

    @staticmethod
    def _fill_parties(
        call: Call, from_number: str | None, to_number: str | None, direction: str | None
    ) -> None:
        call.from_number = call.from_number or from_number
        call.to_number = call.to_number or to_number
        call.direction = call.direction or direction
