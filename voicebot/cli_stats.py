"""`voicebot stats [--since 1h]`: latency percentiles per stage and error rates, from the DB.

Reads the stored turn metrics, call events and call outcomes of the calls that started within
`--since`, and computes p50/p95/p99 in Python over the fetched values, so it works the same on
SQLite and PostgreSQL. The window bounds what is fetched (one float column set per turn).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta

from sqlalchemy import func, select
from sqlalchemy.exc import DBAPIError

from db.models import METRIC_FIELDS, Call, CallEventRow, TurnMetric

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


class BadDuration(ValueError):
    """`--since` is not a duration like 90s, 30m, 1h, 7d, 2w."""


def parse_since(text: str) -> timedelta:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", text.lower())
    if not match:
        raise BadDuration(f"{text!r} is not a duration like 90s, 30m, 1h, 7d or 2w")
    return timedelta(seconds=float(match.group(1)) * _UNITS[match.group(2)])


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (0..1) with linear interpolation between closest ranks."""
    if not values:
        raise ValueError("no values")
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


@dataclass(frozen=True, slots=True)
class StageStats:
    n: int
    p50: float
    p95: float
    p99: float


@dataclass(slots=True)
class StatsReport:
    since: datetime
    calls: int = 0
    turns: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)
    stages: dict[str, StageStats] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    calls_with_errors: int = 0
    barge_ins: int = 0
    streams_resumed: int = 0  # media streams connected again after a drop

    def error_rate(self, stage: str) -> float:
        """Errors of `stage` per bot turn (a failed turn still counts as a turn)."""
        turns = max(self.turns, sum(self.errors.values()))
        return self.errors.get(stage, 0) / turns if turns else 0.0


async def collect(database_url: str, since: datetime) -> StatsReport:
    """Read what the window holds and compute the report."""
    from db.engine import create_db_engine

    engine = create_db_engine(database_url)
    report = StatsReport(since=since)
    in_window = Call.started_at >= since
    try:
        async with engine.connect() as db:
            outcomes = await db.execute(
                select(func.coalesce(Call.end_reason, Call.status), func.count(Call.id))
                .where(in_window).group_by(func.coalesce(Call.end_reason, Call.status))
            )
            report.outcomes = {str(reason): int(n) for reason, n in outcomes.all()}
            report.calls = sum(report.outcomes.values())
            columns = [getattr(TurnMetric, name) for name in METRIC_FIELDS]
            rows = (await db.execute(select(*columns).join(Call).where(in_window))).all()
            events = (await db.execute(
                select(CallEventRow.call_id, CallEventRow.type, CallEventRow.detail)
                .join(Call).where(in_window, CallEventRow.type.in_(("error", "barge_in", "resumed")))
            )).all()
    finally:
        await engine.dispose()
    report.turns = len(rows)
    for index, name in enumerate(METRIC_FIELDS):
        values = [float(row[index]) for row in rows if row[index] is not None]
        if values:
            report.stages[name] = StageStats(len(values), percentile(values, 0.50),
                                             percentile(values, 0.95), percentile(values, 0.99))
    errors: Counter[str] = Counter()
    failed_calls: set[int] = set()
    for call_id, kind, detail in events:
        if kind == "barge_in":
            report.barge_ins += 1
            continue
        if kind == "resumed":
            report.streams_resumed += 1
            continue
        stage = detail.get("stage") if isinstance(detail, dict) else None
        errors[str(stage or "unknown")] += 1
        failed_calls.add(call_id)
    report.errors = dict(errors)
    report.calls_with_errors = len(failed_calls)
    return report


def render(report: StatsReport) -> str:
    """The report as a plain-text table."""
    lines = [f"calls since {report.since:%Y-%m-%d %H:%M:%S} UTC: {report.calls}"
             f"   bot turns with metrics: {report.turns}   barge-ins: {report.barge_ins}"
             + (f"   streams resumed: {report.streams_resumed}" if report.streams_resumed
                else "")]
    if report.outcomes:
        lines.append("outcomes: " + ", ".join(
            f"{reason} {n}" for reason, n in sorted(report.outcomes.items(), key=lambda i: -i[1])))
    lines.append("")
    lines.append(f"{'stage (ms)':24s} {'n':>6s} {'p50':>9s} {'p95':>9s} {'p99':>9s}")
    for name in METRIC_FIELDS:
        stats = report.stages.get(name)
        if stats is None:
            lines.append(f"{name:24s} {0:6d} {'-':>9s} {'-':>9s} {'-':>9s}")
        else:
            lines.append(f"{name:24s} {stats.n:6d} {stats.p50:9.1f} {stats.p95:9.1f} "
                         f"{stats.p99:9.1f}")
    lines.append("")
    lines.append(f"{'errors by stage':24s} {'n':>6s} {'per turn':>9s}")
    stages = sorted(set(report.errors) | {"stt", "llm", "tts"})
    for stage in stages:
        lines.append(f"{stage:24s} {report.errors.get(stage, 0):6d} "
                     f"{report.error_rate(stage):9.2%}")
    if report.calls:
        lines.append(f"{'calls with an error':24s} {report.calls_with_errors:6d} "
                     f"{report.calls_with_errors / report.calls:9.2%}")
    return "\n".join(lines)


def cmd_stats(args: argparse.Namespace) -> int:
    from voicebot.settings import load_settings

    try:
        window = parse_since(args.since)
    except BadDuration as exc:
        print(f"voicebot: {exc}", file=sys.stderr)
        return 2
    settings = load_settings()
    path = settings.sqlite_path
    if path is not None and not path.exists():
        print(f"voicebot: no database at {path} (no calls stored yet)", file=sys.stderr)
        return 1
    since = datetime.now(UTC) - window
    try:
        report = asyncio.run(collect(settings.database_url, since))
    except (DBAPIError, OSError) as exc:
        print(f"voicebot: cannot read calls ({type(exc).__name__}); is the database reachable "
              "and upgraded (`voicebot db upgrade`)?", file=sys.stderr)
        return 1
    if args.json:
        data = asdict(report)
        data["since"] = report.since.isoformat()
        print(json.dumps(data, indent=2))
    else:
        print(render(report))
    return 0


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `stats` on `voicebot`'s subparsers."""
    stats = sub.add_parser("stats", help="latency percentiles per stage and error rates")
    stats.add_argument("--since", default="1h",
                       help="calls that started within this window: 90s, 30m, 1h, 7d (default 1h)")
    stats.add_argument("--json", action="store_true", help="print JSON instead of a table")
    stats.set_defaults(func=cmd_stats)
