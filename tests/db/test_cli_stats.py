"""`voicebot stats`: percentiles per stage and error rates, on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from db.repository import CallRepository
from voicebot.cli import build_parser
from voicebot.cli_stats import BadDuration, add_parsers, collect, parse_since, percentile, render


def test_durations_and_percentiles() -> None:
    assert parse_since("90s") == timedelta(seconds=90)
    assert parse_since("1h") == timedelta(hours=1)
    assert parse_since("7d") == timedelta(days=7)
    with pytest.raises(BadDuration):
        parse_since("an hour")
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 0.5) == pytest.approx(50.5)
    assert percentile(values, 0.95) == pytest.approx(95.05)
    assert percentile(values, 0.99) == pytest.approx(99.01)
    assert percentile([7.0], 0.99) == 7.0


async def _store_call(repository: CallRepository, call_sid: str, started_at: datetime,
                      v2v: list[float], *, reason: str = "stop",
                      errors: tuple[str, ...] = ()) -> None:
    await repository.start_call(call_sid, started_at=started_at, direction="inbound")
    for turn, value in enumerate(v2v, start=1):
        await repository.add_metrics(call_sid, turn, {"v2v_ms": value, "stt_ms": value / 10,
                                                      "endpoint_ms": 500.0})
    for index, stage in enumerate(errors):
        await repository.add_event(call_sid, "error", {"stage": stage, "reason": "x"},
                                   started_at + timedelta(seconds=index + 1))
    await repository.add_event(call_sid, "barge_in", {"cause": "speech"},
                               started_at + timedelta(seconds=30))
    await repository.finalize_call(call_sid, ended_at=started_at + timedelta(minutes=1),
                                   reason=reason)


async def test_stats_cover_the_window_only(repository: CallRepository, database_url: str) -> None:
    now = datetime.now(UTC)
    await _store_call(repository, "CAold", now - timedelta(hours=3), [9000.0, 9000.0],
                      errors=("llm",))
    await _store_call(repository, "CAone", now - timedelta(minutes=20), [800.0, 1000.0, 1200.0])
    await _store_call(repository, "CAtwo", now - timedelta(minutes=5), [900.0, 1100.0],
                      reason="disconnect", errors=("stt", "tts"))
    await repository.add_event("CAone", "resumed", {"attempt": 1, "utterances": 4},
                               now - timedelta(minutes=19))

    report = await collect(database_url, now - timedelta(hours=1))

    assert report.calls == 2 and report.turns == 5
    assert report.outcomes == {"stop": 1, "disconnect": 1}
    v2v = report.stages["v2v_ms"]
    assert v2v.n == 5
    assert v2v.p50 == pytest.approx(1000.0)
    assert v2v.p95 == pytest.approx(1180.0)
    assert v2v.p99 == pytest.approx(1196.0)
    assert report.stages["stt_ms"].p50 == pytest.approx(100.0)
    assert "heard_v2v_ms" not in report.stages
    assert report.errors == {"stt": 1, "tts": 1}
    assert report.error_rate("stt") == pytest.approx(1 / 5)
    assert report.calls_with_errors == 1 and report.barge_ins == 2
    assert report.streams_resumed == 1
    table = render(report)
    assert "v2v_ms" in table and "1000.0" in table and "20.00%" in table
    assert "streams resumed: 1" in table


def test_stats_is_a_voicebot_command() -> None:
    parser = build_parser()
    if "stats" not in parser._subparsers._group_actions[0].choices:  # type: ignore[union-attr]
        add_parsers(parser._subparsers._group_actions[0])  # type: ignore[union-attr,arg-type]
    args = parser.parse_args(["stats", "--since", "30m"])
    assert args.since == "30m" and args.func.__name__ == "cmd_stats"
