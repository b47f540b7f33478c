"""What a stream connected again after a drop reads of its call (`Services.resumed`), against
the stored call (SQLite and PostgreSQL)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from db.repository import CallRepository
from pipeline.events import (
    CallEnded,
    CallStarted,
    PipelineEvent,
    TurnMetrics,
    UtteranceDone,
    utcnow,
)
from voicebot.services import RESUME_WINDOW_S, Services


def _services(repository: CallRepository) -> Services:
    # `resumed` reads only the repository: no settings or engines are needed for it.
    none: Any = None
    return Services(settings=none, engines=none, calls=repository)


def _call(sid: str, end: tuple[str, float] | None) -> list[PipelineEvent]:
    start = utcnow() - timedelta(seconds=1000)
    events: list[PipelineEvent] = [
        CallStarted(sid, "MZ1", "+15550001", "+15550002", "inbound", start),
        UtteranceDone(sid, 0, "bot", "Hello!", start, start + timedelta(seconds=1)),
        UtteranceDone(sid, 1, "caller", "When do you open?", start + timedelta(seconds=2),
                      start + timedelta(seconds=3)),
        UtteranceDone(sid, 1, "bot", "We open", start + timedelta(seconds=4),
                      start + timedelta(seconds=5), generated_text="We open at nine.",
                      interrupted=True),
        TurnMetrics(sid, 2, v2v_ms=900.0),
    ]
    if end is not None:
        reason, ago = end
        events.append(CallEnded(sid, utcnow() - timedelta(seconds=ago), reason))
    return events


@pytest.mark.parametrize("end", [None, ("disconnect", 5.0), ("error", 5.0)])
async def test_a_stream_that_just_dropped_gets_its_calls_words_back(
        repository: CallRepository, end: tuple[str, float] | None) -> None:
    await repository.write_events(_call("CAd", end))
    resumed = await _services(repository).resumed("CAd", 1)
    assert resumed.attempt == 1
    assert resumed.transcript == (("bot", "Hello!", False),
                                  ("caller", "When do you open?", False),
                                  ("bot", "We open", True))
    assert resumed.last_turn == 2  # the metrics' turn counts too


@pytest.mark.parametrize("end", [("stop", 5.0), ("bot_caller_goodbye", 5.0),
                                 ("disconnect", RESUME_WINDOW_S + 60)])
async def test_a_resume_of_a_call_that_did_not_drop_lately_gets_no_words(
        repository: CallRepository, end: tuple[str, float]) -> None:
    """A `resume` parameter is only what a client says: a call that ended on purpose, or
    dropped long ago, does not hand its transcript to a new stream."""
    await repository.write_events(_call("CAe", end))
    resumed = await _services(repository).resumed("CAe", 1)
    assert resumed.transcript == () and resumed.last_turn == 2


async def test_a_resume_of_an_unknown_call_goes_on_without_words(
        repository: CallRepository) -> None:
    resumed = await _services(repository).resumed("CAunknown", 2)
    assert (resumed.attempt, resumed.transcript, resumed.last_turn) == (2, (), 0)
