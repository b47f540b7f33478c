"""The stored shape of a call: calls, utterances, per-turn latency and call events.

Alembic owns the schema (`alembic/versions/`); these models are what migrations are compared
against (`tests/db/test_migrations.py` fails when the two drift apart).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

# Stable constraint names, so migrations (and SQLite batch mode) can address them.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# Twilio's CallStatus values that end a call (Twilio docs, "Call Resource: status").
TERMINAL_STATUSES = frozenset({"completed", "busy", "no-answer", "failed", "canceled"})
CALL_STATUSES = frozenset({"queued", "initiated", "ringing", "in-progress"}) | TERMINAL_STATUSES

METRIC_FIELDS = (
    "endpoint_ms",
    "stt_ms",
    "stt_wait_ms",
    "llm_first_token_ms",
    "llm_first_sentence_ms",
    "tts_first_chunk_ms",
    "v2v_ms",
    "overhead_ms",
    "heard_v2v_ms",
)


def utcnow() -> datetime:
    return datetime.now(UTC)


class UtcDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC datetime on every backend.

    PostgreSQL keeps the offset (timestamptz); SQLite stores text without one, so values are
    normalised to UTC on the way in and tagged UTC on the way out. Naive input is taken as UTC.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


class Base(DeclarativeBase):
    """Declarative base carrying the naming convention and the UTC datetime mapping."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map: ClassVar[dict[Any, Any]] = {
        datetime: UtcDateTime(),
        dict[str, Any]: JSON(),
    }


class Call(Base):
    """One phone (or simulated) call, keyed by Twilio's CallSid."""

    __tablename__ = "calls"
    __table_args__ = (
        Index("ix_calls_started_at_id", "started_at", "id"),
        Index("ix_calls_from_number", "from_number"),
        Index("ix_calls_to_number", "to_number"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    call_sid: Mapped[str] = mapped_column(String(64), unique=True)
    stream_sid: Mapped[str | None] = mapped_column(String(64))
    from_number: Mapped[str | None] = mapped_column(String(64))
    to_number: Mapped[str | None] = mapped_column(String(64))
    direction: Mapped[str | None] = mapped_column(String(32))
    status: Mapped[str] = mapped_column(String(20))
    # Earliest moment known for the call; always set, so listings can sort on it.
    started_at: Mapped[datetime]
    answered_at: Mapped[datetime | None]
    ended_at: Mapped[datetime | None]
    end_reason: Mapped[str | None] = mapped_column(String(40))
    duration_s: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    utterances: Mapped[list[Utterance]] = relationship(
        back_populates="call", cascade="all, delete-orphan", passive_deletes=True
    )
    metrics: Mapped[list[TurnMetric]] = relationship(
        back_populates="call", cascade="all, delete-orphan", passive_deletes=True
    )
    events: Mapped[list[CallEventRow]] = relationship(
        back_populates="call", cascade="all, delete-orphan", passive_deletes=True
    )


class Utterance(Base):
    """A finished utterance: the caller's transcript or the bot's reply (what was heard)."""

    __tablename__ = "utterances"
    __table_args__ = (
        UniqueConstraint("call_id", "seq"),
        Index("ix_utterances_call_id_started_at", "call_id", "started_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    call_id: Mapped[int] = mapped_column(ForeignKey("calls.id", ondelete="CASCADE"))
    turn: Mapped[int] = mapped_column(Integer)
    # Arrival order within the call (1, 2, ...): ties broken by it when start times match.
    seq: Mapped[int] = mapped_column(Integer)
    role: Mapped[str] = mapped_column(String(10))  # caller | bot
    text: Mapped[str] = mapped_column(Text)
    generated_text: Mapped[str | None] = mapped_column(Text)
    interrupted: Mapped[bool] = mapped_column(default=False)
    started_at: Mapped[datetime]
    ended_at: Mapped[datetime]

    call: Mapped[Call] = relationship(back_populates="utterances")


class TurnMetric(Base):
    """Latency parts of one bot reply, in milliseconds (one row per call and turn)."""

    __tablename__ = "turn_metrics"
    __table_args__ = (UniqueConstraint("call_id", "turn"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    call_id: Mapped[int] = mapped_column(ForeignKey("calls.id", ondelete="CASCADE"))
    turn: Mapped[int] = mapped_column(Integer)
    endpoint_ms: Mapped[float | None] = mapped_column(Float)
    stt_ms: Mapped[float | None] = mapped_column(Float)
    stt_wait_ms: Mapped[float | None] = mapped_column(Float)
    llm_first_token_ms: Mapped[float | None] = mapped_column(Float)
    llm_first_sentence_ms: Mapped[float | None] = mapped_column(Float)
    tts_first_chunk_ms: Mapped[float | None] = mapped_column(Float)
    v2v_ms: Mapped[float | None] = mapped_column(Float)
    overhead_ms: Mapped[float | None] = mapped_column(Float)
    heard_v2v_ms: Mapped[float | None] = mapped_column(Float)

    call: Mapped[Call] = relationship(back_populates="metrics")


class CallEventRow(Base):
    """Something that happened on a call (dtmf, barge_in, error, status...)."""

    __tablename__ = "call_events"
    __table_args__ = (Index("ix_call_events_call_id_at", "call_id", "at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    call_id: Mapped[int] = mapped_column(ForeignKey("calls.id", ondelete="CASCADE"))
    type: Mapped[str] = mapped_column(String(40))
    detail: Mapped[dict[str, Any]] = mapped_column(default=dict)
    at: Mapped[datetime]

    call: Mapped[Call] = relationship(back_populates="events")
