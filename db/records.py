"""What `CallRepository` hands out: plain frozen records, detached from any session.

Callers (the API, the viewer, the CLI) never hold ORM objects, so nothing lazy-loads later.
`as_json()` gives JSON-ready dicts (ISO 8601 datetimes with offset).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any

from db.models import METRIC_FIELDS, Call, CallEventRow, TurnMetric, Utterance


def _json(value: object) -> object:
    return value.isoformat() if isinstance(value, datetime) else value


class _Record:
    __slots__ = ()

    def as_json(self) -> dict[str, Any]:
        return {f.name: _json(getattr(self, f.name)) for f in fields(self)}  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class CallRecord(_Record):
    """One call's own fields (no transcript)."""

    call_sid: str
    stream_sid: str | None
    from_number: str | None
    to_number: str | None
    direction: str | None
    status: str
    started_at: datetime
    answered_at: datetime | None
    ended_at: datetime | None
    end_reason: str | None
    duration_s: float | None
    created_at: datetime
    utterance_count: int = 0

    @classmethod
    def of(cls, row: Call, utterance_count: int = 0) -> CallRecord:
        return cls(
            call_sid=row.call_sid,
            stream_sid=row.stream_sid,
            from_number=row.from_number,
            to_number=row.to_number,
            direction=row.direction,
            status=row.status,
            started_at=row.started_at,
            answered_at=row.answered_at,
            ended_at=row.ended_at,
            end_reason=row.end_reason,
            duration_s=row.duration_s,
            created_at=row.created_at,
            utterance_count=utterance_count,
        )


@dataclass(frozen=True, slots=True)
class StreamEnd(_Record):
    """What `/twilio/stream-ended` decides on (`CallRepository.stream_end`)."""

    started: bool  # a media stream of the call started, on any of our servers
    end_reason: str | None  # None while the call is on record as in progress
    from_number: str | None
    to_number: str | None
    direction: str | None
    # The stream's own parameters as its call began with them (a greeting, a system prompt:
    # an outbound call's), from its `parameters` event; {} when it had none.
    parameters: dict[str, str]


@dataclass(frozen=True, slots=True)
class UtteranceRecord(_Record):
    """One utterance; `generated_text` is what the LLM wrote, `text` what was heard."""

    seq: int
    turn: int
    role: str
    text: str
    generated_text: str | None
    interrupted: bool
    started_at: datetime
    ended_at: datetime

    @classmethod
    def of(cls, row: Utterance) -> UtteranceRecord:
        return cls(
            seq=row.seq,
            turn=row.turn,
            role=row.role,
            text=row.text,
            generated_text=row.generated_text,
            interrupted=row.interrupted,
            started_at=row.started_at,
            ended_at=row.ended_at,
        )


@dataclass(frozen=True, slots=True)
class MetricRecord(_Record):
    """Latency parts of one turn, in milliseconds."""

    turn: int
    endpoint_ms: float | None
    stt_ms: float | None
    stt_wait_ms: float | None
    llm_first_token_ms: float | None
    llm_first_sentence_ms: float | None
    tts_first_chunk_ms: float | None
    v2v_ms: float | None
    overhead_ms: float | None
    heard_v2v_ms: float | None

    @classmethod
    def of(cls, row: TurnMetric) -> MetricRecord:
        return cls(turn=row.turn, **{name: getattr(row, name) for name in METRIC_FIELDS})


@dataclass(frozen=True, slots=True)
class EventRecord(_Record):
    """A call event (dtmf, barge_in, error, status...)."""

    type: str
    detail: dict[str, Any]
    at: datetime

    @classmethod
    def of(cls, row: CallEventRow) -> EventRecord:
        return cls(type=row.type, detail=dict(row.detail or {}), at=row.at)


@dataclass(frozen=True, slots=True)
class CallDetail:
    """A call with its ordered transcript, per-turn metrics and events."""

    call: CallRecord
    utterances: list[UtteranceRecord]
    metrics: list[MetricRecord]
    events: list[EventRecord]

    def as_json(self) -> dict[str, Any]:
        return {
            **self.call.as_json(),
            "utterances": [u.as_json() for u in self.utterances],
            "metrics": [m.as_json() for m in self.metrics],
            "events": [e.as_json() for e in self.events],
        }


@dataclass(frozen=True, slots=True)
class CallPage:
    """One page of calls, newest first, with the total matching the filters."""

    calls: list[CallRecord]
    page: int
    page_size: int
    total: int

    def as_json(self) -> dict[str, Any]:
        return {
            "calls": [c.as_json() for c in self.calls],
            "page": self.page,
            "page_size": self.page_size,
            "total": self.total,
        }
