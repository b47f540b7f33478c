"""The viewer's view model: masking, heard/unheard, waterfall geometry, stable keys."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from pipeline.events import CallEvent, TurnMetrics, UtteranceDone
from web.live import event_json
from web.timeline import (
    event_view,
    live_view,
    mask_number,
    metrics_view,
    split_heard,
    utterance_view,
)


@pytest.mark.parametrize(
    ("number", "masked"),
    [
        ("+15550101234", "+1 ••• ••• 1234"),
        ("+447700900123", "+44 ••• 0123"),
        ("5550101234", "••• 1234"),
        ("client:alice", "client:•••"),
        ("12345", "•••"),
        (None, "—"),
    ],
)
def test_numbers_are_masked_to_their_last_four_digits(number: str | None, masked: str) -> None:
    assert mask_number(number) == masked


def test_an_interrupted_reply_splits_into_heard_and_unheard() -> None:
    generated = "Our prices depend on the day. Lunch is fifteen dollars."
    assert split_heard("Our prices depend on the day.", generated) == (
        "Our prices depend on the day.", "Lunch is fifteen dollars.")
    # Whitespace differs between the LLM's deltas and the joined sentences: align by words.
    assert split_heard("Our prices  depend", "Our prices depend on the day.") == (
        "Our prices  depend", "on the day.")
    assert split_heard("", "Nothing was heard.") == ("", "Nothing was heard.")
    assert split_heard("Something else", "Unrelated text") == ("Something else", "")


def test_only_interrupted_bot_turns_show_unheard_text() -> None:
    t = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
    whole = utterance_view(event_json(UtteranceDone("CA1", 1, "bot", "Hi there.", t, t,
                                                    generated_text="Hi there. And more.")))
    cut = utterance_view(event_json(UtteranceDone("CA1", 1, "bot", "Hi there.", t, t,
                                                  generated_text="Hi there. And more.",
                                                  interrupted=True)))
    assert (whole["heard"], whole["unheard"], whole["interrupted"]) == ("Hi there.", "", False)
    assert (cut["heard"], cut["unheard"], cut["interrupted"]) == ("Hi there.", "And more.", True)


def test_waterfall_bars_start_where_the_previous_part_ended() -> None:
    view = metrics_view(event_json(TurnMetrics(
        "CA1", 1, endpoint_ms=500, stt_wait_ms=100, llm_first_sentence_ms=300,
        tts_first_chunk_ms=60, v2v_ms=1000, overhead_ms=40)))
    bars = {b["part"]: b for b in view["bars"]}
    assert view["v2v"] == "1,000 ms"
    assert (bars["endpoint_ms"]["left"], bars["endpoint_ms"]["width"]) == (0, 50)
    assert (bars["stt_wait_ms"]["left"], bars["stt_wait_ms"]["width"]) == (50, 10)
    assert (bars["overhead_ms"]["left"], bars["overhead_ms"]["width"]) == (96, 4)
    assert [b["label"] for b in view["bars"]] == [
        "Endpointing", "STT wait", "LLM first sentence", "TTS first chunk", "Overhead"]


def test_a_missing_part_is_shown_as_a_dash_not_a_bar() -> None:
    view = metrics_view({"turn": 2, "endpoint_ms": 400, "v2v_ms": None})
    bars = {b["part"]: b for b in view["bars"]}
    assert bars["stt_wait_ms"]["value"] == "—" and bars["stt_wait_ms"]["width"] == 0
    assert bars["endpoint_ms"]["width"] == 100


def test_stored_and_live_utterances_get_the_same_key() -> None:
    """A naive datetime read back from SQLite and the live event's aware one are one item."""
    aware = datetime(2025, 3, 1, 12, 0, 1, 250000, tzinfo=UTC)
    live = live_view(event_json(UtteranceDone("CA1", 1, "caller", "Hi", aware, aware)))
    stored = utterance_view({"role": "caller", "turn": 1, "text": "Hi",
                             "started_at": "2025-03-01T12:00:01.250000"})
    assert live is not None and live["key"] == stored["key"]
    assert live["call_sid"] == "CA1"


def test_live_call_started_carries_a_masked_number_only() -> None:
    view = live_view({"kind": "call_started", "call_sid": "CA1", "from_number": "+15550101234",
                      "to_number": "+18005550000", "direction": "inbound",
                      "started_at": "2025-03-01T12:00:00+00:00"})
    assert view is not None
    assert view["number"] == "+1 ••• ••• 1234"
    assert "+15550101234" not in str(view)


T = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)

# Each event with the `detail` dict shaped the way its publisher builds it: turn_end,
# backchannel and barge_in in Conversation._turn_ended / _resume_bot / _interrupt, echo in
# Conversation.close, amd in webhooks.outbound.amd_callback, stream_status in
# webhooks.stream_status.parse_stream_status.
EVENT_LABELS = [
    pytest.param(
        "turn_end",
        {"turn": 3, "eou_delay_ms": 310.4, "reason": "model_complete", "budget_ms": 256,
         "probability": 0.912, "cue": "complete", "expecting": None, "during_bot": False},
        "Turn 3 ended 310 ms after the caller stopped (Smart Turn: complete)",
        "silence budget 256 ms · Smart Turn 91% finished · words look complete",
        id="turn_end-model"),
    pytest.param(
        "turn_end",
        {"turn": 2, "eou_delay_ms": 2010.0, "reason": "entity", "budget_ms": 2000,
         "probability": 0.2, "cue": "entity", "expecting": "phone", "during_bot": False},
        "Turn 2 ended 2,010 ms after the caller stopped (dictating a phone number)",
        "silence budget 2,000 ms · Smart Turn 20% finished · value still being dictated",
        id="turn_end-entity"),
    pytest.param(
        "turn_end",
        {"turn": 5, "eou_delay_ms": 360.0, "reason": "answer", "budget_ms": 320,
         "probability": None, "cue": "answer", "expecting": None, "during_bot": False},
        "Turn 5 ended 360 ms after the caller stopped (a short answer to a yes/no question)",
        "silence budget 320 ms · a short answer",
        id="turn_end-answer"),
    pytest.param(
        "turn_end",
        {"turn": None, "eou_delay_ms": 130.0, "reason": "interjection", "budget_ms": 2000,
         "probability": None, "cue": None, "expecting": None, "during_bot": True,
         "interjection": "noise"},
        "Turn ended 130 ms after the caller stopped (noise over the bot)",
        "too short to transcribe · silence budget 2,000 ms · began over the bot",
        id="turn_end-noise"),
    pytest.param(
        "turn_end",
        {"turn": 4, "eou_delay_ms": 700.0, "reason": "silence", "budget_ms": 700,
         "probability": None, "cue": None, "expecting": None, "during_bot": False},
        "Turn 4 ended 700 ms after the caller stopped (silence only)",
        "silence budget 700 ms",
        id="turn_end-baseline"),
    pytest.param(
        "backchannel", {"class": "backchannel", "text": " uh-huh"},
        "Backchannel: “uh-huh” — bot kept talking", "the caller was listening; no reply",
        id="backchannel"),
    pytest.param(
        "backchannel", {"class": "echo", "text": "open until nine"},
        "Echo of the bot ignored — bot kept talking", "heard “open until nine”",
        id="backchannel-echo"),
    pytest.param(
        "backchannel", {"class": "noise", "text": None},
        "Noise ignored — bot kept talking", "no words", id="backchannel-noise"),
    pytest.param(
        "barge_in",
        {"cause": "speech", "class": "false_interruption", "heard_as": "backchannel",
         "clear_ms": 180.2, "resume_ms": 240.0},
        "False interruption — bot resumed after 240 ms",
        "the sound was a backchannel · paused 180 ms after it began · "
        "resumed 240 ms after it ended",
        id="barge_in-false"),
    pytest.param(
        "barge_in", {"cause": "speech", "clear_ms": 42.5, "class": "interruption"},
        "Caller talked over the bot (audio cleared in 42 ms)", "the reply was cut short",
        id="barge_in-speech"),
    pytest.param(
        "barge_in", {"cause": "dtmf", "clear_ms": 3.0, "class": "interruption"},
        "Keypress stopped the bot (audio cleared in 3 ms)", "the reply was cut short",
        id="barge_in-dtmf"),
    pytest.param(
        "barge_in", {"cause": "new_turn", "clear_ms": 3.0, "class": "interruption"},
        "Bot stopped for the caller's new turn (audio cleared in 3 ms)", "",
        id="barge_in-new_turn"),
    pytest.param(
        "echo", {"delay_ms": 42.1, "cancelled_frames": 120, "frames": 3000},
        "Echo of the bot cancelled (its voice came back after 42 ms)",
        "suppressed in 120 of 3,000 caller frames", id="echo"),
    pytest.param("end_call", {"reason": "caller_goodbye"},
                 "Bot is ending the call (the caller said goodbye)", "", id="end_call"),
    pytest.param("end_call", {"reason": "idle"},
                 "Bot is ending the call (the caller was silent)", "", id="end_call-idle"),
    pytest.param("transfer", {"number": "+15550109876"},
                 "Transfer to +1 ••• ••• 9876", "", id="transfer"),
    pytest.param("transfer", {"number": None}, "Transfer asked, but no number is set",
                 "TRANSFER_NUMBER is not configured", id="transfer-unset"),
    pytest.param("dtmf", {"digit": "5"}, "Caller pressed 5", "", id="dtmf"),
    pytest.param("error", {"stage": "llm", "reason": "empty reply"},
                 "Error in llm: empty reply", "", id="error"),
    pytest.param(
        "amd", {"call_sid": "CA1", "answered_by": "machine_end_beep", "duration_ms": "2300"},
        "Answered by a machine (greeting ended with a beep)", "detected in 2,300 ms",
        id="amd"),
    pytest.param(
        "amd", {"call_sid": "CA1", "answered_by": "human", "duration_ms": None},
        "Answered by a person", "", id="amd-human"),
    pytest.param(
        "stream_status",
        {"call_sid": "CA1", "stream_sid": "MZ1", "stream_name": None, "event": "stream-started",
         "error": None, "timestamp": None},
        "Media stream started", "", id="stream_status"),
    pytest.param(  # Conversation.begin on a stream connected again after a drop
        "resumed", {"attempt": 1, "utterances": 5},
        "Media stream dropped and reconnected (attempt 1)", "went on with 5 stored utterances",
        id="resumed"),
    pytest.param(  # Conversation.begin: the call's own stream parameters
        "parameters", {"system_prompt": "Sell tickets.", "greeting": "Hi!"},
        "Call parameters", "greeting, system_prompt", id="parameters"),
]


@pytest.mark.parametrize(("kind", "detail", "label", "note"), EVENT_LABELS)
def test_each_event_kind_gets_a_label_and_a_detail_line_in_words(
    kind: str, detail: dict[str, object], label: str, note: str
) -> None:
    view = live_view(event_json(CallEvent("CA1", kind, detail, T)))
    assert view is not None
    assert (view["label"], view["detail"]) == (label, note)
    assert view["icon"] != "•" and view["error"] == (kind == "error")
    assert kind.replace("_", " ").capitalize() != view["label"]  # not the generic fallback


def test_a_stream_error_is_shown_as_an_error() -> None:
    view = event_view(event_json(CallEvent("CA1", "stream_status", {
        "call_sid": "CA1", "stream_sid": "MZ1", "stream_name": None, "event": "stream-error",
        "error": "31921 stream closed", "timestamp": None}, T)))
    assert view["label"] == "Media stream error: 31921 stream closed" and view["error"]


def test_stored_events_with_missing_or_odd_fields_still_get_a_label() -> None:
    """Events stored by older code: no `class` means an interruption; junk numbers are left
    out rather than failing the page."""
    old = event_view({"type": "barge_in", "detail": {"clear_ms": 42.5}, "at": T.isoformat()})
    odd = event_view({"type": "turn_end", "detail": {"turn": 1, "eou_delay_ms": "n/a"},
                      "at": T.isoformat()})
    unknown = event_view({"type": "mark_timing", "detail": None, "at": T.isoformat()})
    assert old["label"] == "Caller talked over the bot (audio cleared in 42 ms)"
    assert (odd["label"], odd["detail"]) == ("Turn 1 ended", "")
    assert (unknown["label"], unknown["detail"], unknown["icon"]) == ("Mark timing", "", "•")
