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
_EVENT_ICONS = {"dtmf": "⌨", "barge_in": "✂", "error": "⚠", "status": "☎", "turn_end": "⇥",
                "backchannel": "✓", "echo": "↩", "end_call": "☎", "transfer": "⇄", "amd": "☎",
                "stream_status": "☎", "resumed": "↻", "parameters": "⚙"}
# A `barge_in` or `backchannel` event's `class` (pipeline.backchannel.BargeInClass).
_CLASS_ICONS = {"false_interruption": "↺", "noise": "~", "echo": "↩"}


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
    """A call event as a label (what happened, in words) and a detail line (the evidence)."""
    kind = str(data.get("type"))
    detail: Mapping[str, Any] = data.get("detail") or {}
    describe = _DESCRIBE.get(kind)
    label, note = describe(detail) if describe else (kind.replace("_", " ").capitalize(), "")
    at = iso(data.get("at"))
    return {
        "kind": "event",
        "key": f"e:{kind}:{at}",
        "at": at,
        "time": clock(at),
        "type": kind,
        "icon": _CLASS_ICONS.get(str(detail.get("class")), _EVENT_ICONS.get(kind, "•")),
        "label": label[:600],
        "detail": note[:600],
        "error": kind == "error" or (kind == "stream_status"
                                     and detail.get("event") == "stream-error"),
    }


# Event labels, one function per event type. Each reads the `detail` dict the pipeline built
# (pipeline/conversation.py; `amd` and `stream_status` from webhooks/) and tolerates missing
# or odd fields: stored events outlive the code that wrote them.

def _dtmf(detail: Mapping[str, Any]) -> tuple[str, str]:
    return f"Caller pressed {detail.get('digit', '?')}", ""


def _barge_in(detail: Mapping[str, Any]) -> tuple[str, str]:
    kind = detail.get("class") or "interruption"
    clear_ms = _float(detail.get("clear_ms"))
    if kind == "false_interruption":
        resume_ms = _float(detail.get("resume_ms"))
        label = "False interruption — bot resumed"
        if resume_ms is not None:
            label += f" after {format_ms(resume_ms)}"
        notes = [f"the sound was {_SOUNDS.get(str(detail.get('heard_as')), 'no words')}"]
        if clear_ms is not None:
            notes.append(f"paused {format_ms(clear_ms)} after it began")
        if resume_ms is not None:
            notes.append(f"resumed {format_ms(resume_ms)} after it ended")
        return label, " · ".join(notes)
    if kind in _SOUNDS:
        return _backchannel(detail)
    cause = str(detail.get("cause") or "speech")
    label = _STOPPED_BY.get(cause, f"Bot stopped ({cause})")
    if clear_ms is not None:
        label += f" (audio cleared in {format_ms(clear_ms)})"
    return label, "" if cause == "new_turn" else "the reply was cut short"


_STOPPED_BY = {
    "speech": "Caller talked over the bot",
    "dtmf": "Keypress stopped the bot",
    "new_turn": "Bot stopped for the caller's new turn",
}

# What a sound over the bot turned out to be (pipeline.backchannel.Interjection).
_SOUNDS = {"backchannel": "a backchannel", "noise": "noise", "echo": "the bot's own echo"}


def _backchannel(detail: Mapping[str, Any]) -> tuple[str, str]:
    """A sound over the bot that did not stop it: no reply, the bot kept talking."""
    kind = detail.get("class")
    words = _quoted(detail.get("text"))
    if kind == "echo":
        return "Echo of the bot ignored — bot kept talking", f"heard {words}" if words else ""
    if kind == "noise":
        return "Noise ignored — bot kept talking", f"heard {words}" if words else "no words"
    label = f"Backchannel: {words} — bot kept talking" if words else (
        "Backchannel — bot kept talking")
    return label, "the caller was listening; no reply"


def _turn_end(detail: Mapping[str, Any]) -> tuple[str, str]:
    turn = detail.get("turn")
    after = _float(detail.get("eou_delay_ms"))
    label = "Turn ended" if turn is None else f"Turn {turn} ended"
    if after is not None:
        label += f" {format_ms(after)} after the caller stopped"
    reason = str(detail.get("reason") or "")
    if reason == "interjection":
        why = _OVER_THE_BOT.get(str(detail.get("interjection")), "a sound over the bot")
    elif reason == "entity" and detail.get("expecting") in _ENTITIES:
        why = f"dictating {_ENTITIES[detail['expecting']]}"
    else:
        why = _END_REASONS.get(reason, reason.replace("_", " "))
    if why:
        label += f" ({why})"
    notes = []
    if turn is None:
        notes.append("too short to transcribe")
    if (budget := _float(detail.get("budget_ms"))) is not None:
        notes.append(f"silence budget {format_ms(budget)}")
    if (probability := _float(detail.get("probability"))) is not None:
        notes.append(f"Smart Turn {probability:.0%} finished")
    if detail.get("cue") in _CUES:
        notes.append(_CUES[detail["cue"]])
    if detail.get("expecting") in _ENTITIES and reason != "entity":
        notes.append(f"expecting {_ENTITIES[detail['expecting']]}")
    if detail.get("during_bot"):
        notes.append("began over the bot")
    return label, " · ".join(notes)


# Why the turn ended (pipeline.turn_detector.EndOfTurnPolicy and pipeline.turn_taking).
_END_REASONS = {
    "model_complete": "Smart Turn: complete",
    "model_unsure": "Smart Turn: unsure, waited",
    "model_incomplete": "Smart Turn: not finished, waited",
    "words_complete": "words: complete",
    "answer": "a short answer to a yes/no question",
    "hesitation": "caller hesitated, waited",
    "unfinished": "words unfinished, waited",
    "entity": "dictation, waited",
    "greeting": "a greeting alone, waited",
    "pending": "no verdict in time",
    "max_silence": "silence limit",
    "silence": "silence only",
}
_OVER_THE_BOT = {"backchannel": "a backchannel over the bot", "noise": "noise over the bot",
                 "echo": "the bot's own echo"}
# What the words looked like (pipeline.turn_detector.Cue).
_CUES = {"complete": "words look complete", "hesitation": "words trail off",
         "unfinished": "words unfinished", "entity": "value still being dictated",
         "answer": "a short answer", "greeting": "a greeting"}
# What the bot had asked for (pipeline.turn_detector.Entity).
_ENTITIES = {"phone": "a phone number", "zip": "a ZIP code", "number": "a number",
             "email": "an e-mail address", "birthdate": "a birth date", "date": "a date",
             "spelling": "a spelling"}


def _echo(detail: Mapping[str, Any]) -> tuple[str, str]:
    """The echo canceller's summary at hang-up (sent only when it found an echo)."""
    delay = _float(detail.get("delay_ms"))
    label = "Echo of the bot cancelled"
    if delay is not None:
        label += f" (its voice came back after {format_ms(delay)})"
    cancelled, frames = _float(detail.get("cancelled_frames")), _float(detail.get("frames"))
    if cancelled is None or not frames:
        return label, ""
    return label, f"suppressed in {cancelled:,.0f} of {frames:,.0f} caller frames"


def _end_call(detail: Mapping[str, Any]) -> tuple[str, str]:
    reason = str(detail.get("reason") or "")
    why = _END_CALL_REASONS.get(reason, reason.replace("_", " "))
    return "Bot is ending the call" + (f" ({why})" if why else ""), ""


_END_CALL_REASONS = {"idle": "the caller was silent", "dtmf": "keypad menu",
                     "llm": "the LLM decided", "caller_goodbye": "the caller said goodbye"}


def _transfer(detail: Mapping[str, Any]) -> tuple[str, str]:
    number = detail.get("number")
    if not number:
        return "Transfer asked, but no number is set", "TRANSFER_NUMBER is not configured"
    return f"Transfer to {mask_number(str(number))}", ""


def _error(detail: Mapping[str, Any]) -> tuple[str, str]:
    return f"Error in {detail.get('stage', '?')}: {detail.get('reason', '')}".rstrip(": "), ""


def _status(detail: Mapping[str, Any]) -> tuple[str, str]:
    return f"Status: {detail.get('status', '?')}", ""


def _amd(detail: Mapping[str, Any]) -> tuple[str, str]:
    """Twilio's answering machine detection verdict (`AnsweredBy`)."""
    answered_by = str(detail.get("answered_by") or "")
    label = _ANSWERED_BY.get(answered_by, f"Answering machine detection: {answered_by or '?'}")
    took = _float(detail.get("duration_ms"))
    return label, "" if took is None else f"detected in {format_ms(took)}"


_ANSWERED_BY = {
    "human": "Answered by a person",
    "machine_start": "Answered by a machine",
    "machine_end_beep": "Answered by a machine (greeting ended with a beep)",
    "machine_end_silence": "Answered by a machine (greeting ended in silence)",
    "machine_end_other": "Answered by a machine (greeting ended)",
    "fax": "Answered by a fax",
    "unknown": "Answering machine detection: unknown",
}


def _stream_status(detail: Mapping[str, Any]) -> tuple[str, str]:
    """Twilio's `<Stream>` status callback."""
    event = str(detail.get("event") or "")
    if event == "stream-error":
        return f"Media stream error: {detail.get('error') or 'no reason given'}", ""
    return _STREAM_EVENTS.get(event, f"Media stream: {event or '?'}"), ""


_STREAM_EVENTS = {"stream-started": "Media stream started",
                  "stream-stopped": "Media stream stopped"}


def _resumed(detail: Mapping[str, Any]) -> tuple[str, str]:
    """The call's stream dropped and was connected again (webhooks/stream_ended.py)."""
    attempt = _float(detail.get("attempt"))
    said = _float(detail.get("utterances"))
    label = "Media stream dropped and reconnected" + (
        f" (attempt {attempt:.0f})" if attempt is not None else "")
    return label, "" if said is None else f"went on with {said:.0f} stored utterances"


def _parameters(detail: Mapping[str, Any]) -> tuple[str, str]:
    """The call's own stream parameters (an outbound call's greeting, system prompt)."""
    return "Call parameters", ", ".join(sorted(str(name) for name in detail))

_DESCRIBE = {
    "dtmf": _dtmf,
    "barge_in": _barge_in,
    "backchannel": _backchannel,
    "turn_end": _turn_end,
    "echo": _echo,
    "end_call": _end_call,
    "transfer": _transfer,
    "error": _error,
    "status": _status,
    "amd": _amd,
    "stream_status": _stream_status,
    "resumed": _resumed,
    "parameters": _parameters,
}


def _quoted(text: object) -> str:
    words = " ".join(str(text or "").split())
    if len(words) > 120:
        words = words[:119] + "…"
    return f"“{words}”" if words else ""


def _float(value: object) -> float | None:
    try:
        return None if value is None or value == "" else float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


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
