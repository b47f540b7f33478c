"""The viewer's view model: masking, heard/unheard, waterfall geometry, stable keys."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from pipeline.events import TurnMetrics, UtteranceDone
from web.live import event_json
from web.timeline import live_view, mask_number, metrics_view, split_heard, utterance_view


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
