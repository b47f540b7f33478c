"""What the viewer shows, as plain view dicts: call rows, transcript items, latency waterfalls.

One shape for both renderers: the Jinja templates render these dicts for the first paint, and
the pages' JavaScript fills the same markup from the same dicts when they arrive live (SSE) or
on a resync. The judgement (masking numbers, what the caller heard, waterfall geometry, event
labels) lives here, so the JavaScript only copies fields into the DOM.

Inputs are JSON-shaped mappings: `db.records` `as_json()` output and `web.live.event_json()`
output use the same field names, so stored and live data go through the same functions.
"""

from __future__ import annotations

import re
import statistics
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from db.records import CallDetail

View = dict[str, Any]

# The parts of voice-to-voice latency, in the order they happen (DESIGN.md, latency budget).
WATERFALL_PARTS: tuple[tuple[str, str], ...] = (
    ("endpoint_ms", "Endpointing"),
    ("stt_wait_ms", "STT wait"),
    ("llm_first_sentence_ms", "LLM first sentence"),
    ("tts_first_chunk_ms", "TTS first chunk"),
    ("overhead_ms", "Overhead"),
)

# Symbols that common fonts have (no emoji): the label says the same in words.
_EVENT_ICONS = {"dtmf": "⌨", "barge_in": "✂", "error": "⚠", "status": "☎"}


def instant(value: datetime | str | None) -> datetime | None:
    """An aware UTC datetime from a datetime or an ISO string (naive means UTC)."""
    if value is None or value == "":
        return None
    moment = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def iso(value: datetime | str | None) -> str:
    """One spelling per instant (keys made from stored and live data must be equal)."""
    moment = instant(value)
    return "" if moment is None else moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def clock(value: datetime | str | None) -> str:
    moment = instant(value)
    return "" if moment is None else moment.strftime("%H:%M:%S")


def format_ms(ms: float | None) -> str:
    return "—" if ms is None else f"{ms:,.0f} ms"


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    whole = round(seconds)
    return f"{whole // 60}:{whole % 60:02d}"


def mask_number(number: str | None) -> str:
    """A phone number with the middle hidden: `+1 ••• ••• 1234`, `+44 ••• 0000`."""
    if not number:
        return "—"
    digits = re.sub(r"\D", "", number)
    if number.startswith("+1") and len(digits) == 11:
        return f"+1 ••• ••• {digits[-4:]}"
    if len(digits) >= 7:
        prefix = f"+{digits[:2]} " if number.startswith("+") else ""
        return f"{prefix}••• {digits[-4:]}"
    if ":" in number:  # a Twilio Client or SIP identity: keep only the scheme
        return number.split(":", 1)[0] + ":•••"
    return "•••"


def party(call: Mapping[str, Any]) -> str:
    """The other end of the call, masked: the caller, or whoever we called."""
    direction = str(call.get("direction") or "")
    if direction == "web":
        return "Browser"
    number = call.get("to_number") if direction.startswith("outbound") else call.get(
        "from_number")
    return mask_number(number)


def split_heard(heard: str, generated: str | None) -> tuple[str, str]:
    """(heard, unheard): the words the caller heard and the rest of what the LLM wrote."""
    heard = heard.strip()
    if not generated:
        return heard, ""
    generated = generated.strip()
    if generated.startswith(heard):
        return heard, generated[len(heard):].strip()
    said, wrote = heard.split(), generated.split()
    if said == wrote[: len(said)]:
        return heard, " ".join(wrote[len(said):])
    return heard, ""


def utterance_view(data: Mapping[str, Any]) -> View:
    role = str(data.get("role"))
    interrupted = bool(data.get("interrupted"))
    text = str(data.get("text") or "")
    heard, unheard = split_heard(text, data.get("generated_text")) if interrupted else (text, "")
    at = iso(data.get("started_at"))
    return {
        "kind": "utterance",
        "key": f"u:{role}:{data.get('turn')}:{at}",
        "at": at,
        "time": clock(at),
        "role": role,
        "who": "Caller" if role == "caller" else "Bot",
        "turn": data.get("turn"),
        "heard": heard,
        "unheard": unheard,
        "interrupted": interrupted,
    }


def event_view(data: Mapping[str, Any]) -> View:
    kind = str(data.get("type"))
    detail: Mapping[str, Any] = data.get("detail") or {}
    if kind == "dtmf":
        label = f"Caller pressed {detail.get('digit', '?')}"
    elif kind == "barge_in":
        label = "Caller talked over the bot"
        if detail.get("clear_ms") is not None:
            label += f" (audio cleared in {format_ms(float(detail['clear_ms']))})"
    elif kind == "error":
        label = f"Error in {detail.get('stage', '?')}: {detail.get('reason', '')}".rstrip(": ")
    elif kind == "status":
        label = f"Status: {detail.get('status', '?')}"
    else:
        label = kind.replace("_", " ").capitalize()
    at = iso(data.get("at"))
    return {
        "kind": "event",
        "key": f"e:{kind}:{at}",
        "at": at,
        "time": clock(at),
        "type": kind,
        "icon": _EVENT_ICONS.get(kind, "•"),
        "label": label[:600],
        "error": kind == "error",
    }


def metrics_view(data: Mapping[str, Any]) -> View:
    """One turn's waterfall: each part starts where the previous one ended."""
    values = {name: _number(data.get(name)) for name, _ in WATERFALL_PARTS}
    v2v = _number(data.get("v2v_ms"))
    total = v2v or sum(max(0.0, v) for v in values.values() if v is not None) or 1.0
    bars = []
    start = 0.0
    for name, label in WATERFALL_PARTS:
        ms = values[name]
        width = 0.0 if ms is None else max(0.0, ms) / total * 100
        bars.append({
            "part": name,
            "label": label,
            "ms": ms,
            "value": format_ms(ms),
            "left": round(min(start, 100.0), 2),
            "width": round(min(width, 100.0 - min(start, 100.0)), 2),
        })
        start += width
    return {
        "kind": "metrics",
        "key": f"m:{data.get('turn')}",
        "turn": data.get("turn"),
        "v2v_ms": v2v,
        "v2v": format_ms(v2v),
        "bars": bars,
    }


def _number(value: object) -> float | None:
    return None if value is None else float(value)  # type: ignore[arg-type]


def median_v2v(metrics: Iterable[Mapping[str, Any]]) -> float | None:
    values = [float(m["v2v_ms"]) for m in metrics if m.get("v2v_ms") is not None]
    return statistics.median(values) if values else None


def call_view(detail: CallDetail) -> View:
    """The call's own fields for the list row and the call page's header."""
    call = detail.call.as_json()
    metrics = [m.as_json() for m in detail.metrics]
    v2v = [float(m["v2v_ms"]) for m in metrics if m.get("v2v_ms") is not None]
    live = call.get("ended_at") is None and call["status"] in ("in-progress", "ringing")
    return {
        "call_sid": call["call_sid"],
        "number": party(call),
        "from": mask_number(call.get("from_number")),
        "to": mask_number(call.get("to_number")),
        "direction": call.get("direction") or "unknown",
        "status": call["status"],
        "live": live,
        "end_reason": call.get("end_reason") or "",
        "started_at": iso(call["started_at"]),
        "started": _day_and_time(call["started_at"]),
        "ended_at": iso(call.get("ended_at")),
        "duration": format_duration(call.get("duration_s")),
        "turns": sum(1 for u in detail.utterances if u.role == "caller"),
        "v2v": v2v,
        "median_v2v": format_ms(median_v2v(metrics)),
    }


def _day_and_time(value: datetime | str | None) -> str:
    moment = instant(value)
    return "" if moment is None else moment.strftime("%Y-%m-%d %H:%M:%S")


def timeline(detail: CallDetail) -> list[View]:
    """The call's transcript and events in time order; each turn's waterfall rides on the
    first bot utterance of that turn (`metrics`)."""
    metrics = {m.turn: metrics_view(m.as_json()) for m in detail.metrics}
    items = [utterance_view(u.as_json()) for u in detail.utterances]
    items += [event_view(e.as_json()) for e in detail.events]
    items.sort(key=lambda item: item["at"])
    for item in items:
        if item["kind"] == "utterance" and item["role"] == "bot":
            item["metrics"] = metrics.pop(item["turn"], None)
    # A reply still being spoken has its latency (sent at the first audio) but no utterance
    # yet (published when it has been heard): show it as a pending bot turn.
    items += [pending_view(turn, view) for turn, view in sorted(metrics.items())]
    return items


def pending_view(turn: int, metrics: View | None = None) -> View:
    return {"kind": "pending", "key": f"p:{turn}", "at": "", "turn": turn, "role": "bot",
            "who": "Bot", "metrics": metrics}


def live_view(message: Mapping[str, Any]) -> View | None:
    """A pipeline event (as `web.live.event_json` wrote it) as the pages want it."""
    kind = message.get("kind")
    call_sid = message.get("call_sid")
    view: View | None
    if kind == "call_started":
        view = {
            "kind": "call_started",
            "number": party(message),
            "direction": message.get("direction") or "unknown",
            "started_at": iso(message.get("started_at")),
            "started": _day_and_time(message.get("started_at")),
            "status": "in-progress",
        }
    elif kind == "utterance":
        view = utterance_view(message)
    elif kind == "turn_metrics":
        view = metrics_view(message)
    elif kind == "call_event":
        view = event_view(message)
    elif kind == "call_ended":
        view = {"kind": "call_ended", "ended_at": iso(message.get("ended_at")),
                "reason": message.get("reason") or ""}
    else:
        view = None
    if view is not None:
        view["call_sid"] = call_sid
    return view
