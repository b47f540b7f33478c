"""bench/call_latency.py matches each caller turn to the server turn that answered it, by
time, so a turn the server heard in two parts does not shift the numbers of the turns after
it."""

from __future__ import annotations

from datetime import UTC, datetime

from bench.call_latency import server_turns
from telephony.simulator import TurnResult


def _heard(turn: int, wall: float, role: str = "caller") -> dict[str, object]:
    return {"turn": turn, "role": role,
            "started_at": datetime.fromtimestamp(wall, UTC).isoformat()}


def test_a_turn_heard_in_two_parts_is_matched_to_its_second() -> None:
    offset = 1_000_000.0  # wall clock minus the simulator's monotonic clock
    turns = [TurnResult("hours", speech_started_at=10.0, speech_ended_at=11.5),
             TurnResult("great", speech_started_at=20.0, speech_ended_at=22.0),
             TurnResult("bye", speech_started_at=30.0, speech_ended_at=31.0),
             TurnResult("unheard", speech_started_at=40.0, speech_ended_at=41.0)]
    utterances = [
        _heard(1, offset + 10.05),
        _heard(1, offset + 11.0, role="bot"),
        _heard(2, offset + 20.1),  # "Great." on its own: the server replied to it
        _heard(3, offset + 21.2),  # the rest of the same caller turn
        _heard(4, offset + 30.02),
    ]
    assert server_turns(turns, utterances, offset) == [1, 3, 4, None]


def test_a_window_heard_just_after_the_last_voiced_frame_still_counts() -> None:
    turns = [TurnResult("yes", speech_started_at=5.0, speech_ended_at=5.2)]
    assert server_turns(turns, [_heard(1, 5.45)], 0.0) == [1]
    assert server_turns(turns, [_heard(1, 5.6)], 0.0) == [None]
