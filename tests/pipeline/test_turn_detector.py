"""End of turn: transcript cues, entity mode, the silence budgets, and Smart Turn on real audio."""

from __future__ import annotations

import json

import numpy as np
import pytest

from media.audiofile import read_wav
from media.mulaw import pcm16_to_ulaw, ulaw_to_pcm16
from media.resample import resample
from pipeline.turn_detector import (
    EndOfTurnPolicy,
    SmartTurnModel,
    TurnDetector,
    digits_of,
    expected_entity,
    log_mel,
    smart_turn_model_path,
    transcript_cue,
)


@pytest.mark.parametrize(("text", "cue"), [
    ("What time do you open tomorrow?", "complete"),
    ("No, thank you.", "complete"),
    ("I would like to book a table for", "unfinished"),
    ("I need to cancel because", "unfinished"),
    ("We were hoping to come and", "unfinished"),
    ("I want to...", "hesitation"),
    ("So, um", "hesitation"),
    ("Let me see.", "hesitation"),
    ("You can call me back on 555.", "entity"),
    ("It's 555-867", "entity"),
    ("You can call me back on 555-234-9876.", "complete"),
    ("A table for 4.", "complete"),
    ("Hi there.", "greeting"),
    ("Hello?", "greeting"),
    ("Oh, hi. Good morning.", "greeting"),
    ("Hi, I'd like a table.", "complete"),
    ("Good.", "complete"),
    ("Yes.", "complete"),
])
def test_transcript_cues(text: str, cue: str) -> None:
    assert transcript_cue(text) == cue


def test_entity_mode_holds_a_phone_number_until_it_is_whole() -> None:
    expecting = expected_entity("Thanks! What's the best phone number to reach you?")
    assert expecting == "phone"
    assert transcript_cue("My number is 212.", expecting) == "entity"
    assert transcript_cue("My number is 212 555", expecting) == "entity"
    assert transcript_cue("My number is 212-555-0142", expecting) == "complete"
    assert transcript_cue("five five five, eight six seven", expecting) == "entity"
    assert digits_of("five five five, eight six seven, oh one nine nine") == "5558670199"


def test_entity_mode_for_dates_emails_and_reference_numbers() -> None:
    assert expected_entity("And your date of birth?") == "birthdate"
    assert transcript_cue("March the 14th.", "birthdate") == "entity"
    assert transcript_cue("March the 14th, 1985.", "birthdate") == "complete"
    assert expected_entity("Which day would you like to come?") == "date"
    assert transcript_cue("Next", "date") == "entity"
    assert transcript_cue("Next Friday.", "date") == "complete"
    assert expected_entity("What's your email address?") == "email"
    assert transcript_cue("It's john dot smith", "email") == "entity"
    assert transcript_cue("It's john dot smith at gmail dot com", "email") == "complete"
    assert expected_entity("What's your booking reference number?") == "number"
    assert transcript_cue("It's 4 7.", "number") == "entity"
    assert transcript_cue("It's 4 7 1 9", "number") == "complete"
    assert expected_entity("Lovely. See you then.") is None


def test_a_short_answer_to_a_question_is_complete_without_the_model() -> None:
    assert transcript_cue("Yes.", after_question=True) == "answer"
    detector = TurnDetector(uses_model=False)
    detector.expect_after("Shall I book it for you?")
    detector.pause(10.0)
    detector.add_transcript("Yes, please.")
    assert detector.decision().reason == "answer"
    budget = detector.policy.answer_ms + detector.policy.short_extra_ms  # two words
    assert not detector.due(budget - 32) and detector.due(budget)


def test_budgets_short_when_complete_long_for_hesitation_and_bounded() -> None:
    policy = EndOfTurnPolicy()
    assert policy.budget(0.97, "complete", True, False) == (policy.complete_ms, "model_complete")
    assert policy.budget(0.97, "complete", True, False, words=1)[0] == (
        policy.complete_ms + policy.short_extra_ms)
    assert policy.budget(0.97, "hesitation", True, False)[0] == policy.hesitation_ms
    assert policy.budget(0.02, "complete", True, False)[0] == policy.incomplete_ms
    assert policy.budget(0.3, "complete", True, False)[0] == policy.unsure_ms
    assert policy.budget(None, "entity", False, True)[0] == policy.entity_ms
    assert all(policy.budget(p, c, m, w)[0] <= policy.max_ms <= 2000
               for p in (None, 0.0, 0.5, 1.0) for c in (None, "complete", "entity", "unfinished")
               for m in (True, False) for w in (True, False))
    assert policy.complete_ms <= 400


def test_a_greeting_alone_waits_for_the_reason_of_the_call() -> None:
    """"Hi there. [a breath] What time do you open?": the model hears "Hi there." as a
    finished turn; the bot must not answer the greeting into the caller's question."""
    detector = TurnDetector()
    detector.pause(3.0)
    detector.add_probability(0.95)
    detector.add_transcript("Hi there.")
    assert detector.decision().reason == "greeting"
    assert not detector.due(416) and not detector.due(800)
    assert detector.due(detector.policy.greeting_ms)
    assert detector.policy.greeting_ms <= detector.policy.unsure_ms


def test_the_model_and_the_words_must_both_agree_before_a_short_wait() -> None:
    detector = TurnDetector()
    detector.pause(5.0)
    detector.add_probability(0.98)  # "Is it possible to?" can sound finished...
    assert detector.decision().reason == "pending" and not detector.due(1000)
    detector.add_transcript("Is it possible to")  # ...the words say it is not
    assert detector.decision().reason == "unfinished"
    assert not detector.due(detector.policy.complete_ms)
    detector.pause(7.0)
    detector.add_transcript("What time do you open tomorrow?")
    detector.add_probability(0.97)
    assert detector.decision().reason == "model_complete"
    assert detector.due(detector.policy.complete_ms)


def test_the_caller_going_on_clears_the_evidence() -> None:
    detector = TurnDetector()
    detector.pause(1.0)
    detector.add_probability(0.99)
    detector.resume()
    detector.add_probability(0.99)  # a late result for the old pause is ignored
    assert detector.probability is None and not detector.due(100_000)


def test_log_mel_is_whisper_shaped() -> None:
    rng = np.random.default_rng(0)
    features = log_mel(rng.normal(0, 0.1, 16000 * 3).astype(np.float32))
    assert features.shape == (80, 800) and features.dtype == np.float32
    assert float(features.min()) > -1.5 and float(features.max()) < 2.5
    # Padded with silence to 8 s: the tail is all at the floor (max - 8 decades).
    assert np.allclose(features[:, -100:], features.min())


def _caller_audio(path, until_s: float | None = None) -> np.ndarray:
    pcm = ulaw_to_pcm16(pcm16_to_ulaw(read_wav(path, 8000)))
    if until_s is not None:
        pcm = pcm[: int(until_s * 8000)]
    return resample(pcm.astype(np.float32) / 32768, 8000, 16000)


@pytest.mark.slow
@pytest.mark.skipif(smart_turn_model_path() is None, reason="Smart Turn (pipecat-ai) not installed")
def test_smart_turn_hears_a_finished_question_and_an_unfinished_one(fixtures_dir) -> None:
    model = SmartTurnModel()
    turns = fixtures_dir / "turns"
    manifest = {f["name"]: f for f in json.loads((turns / "manifest.json").read_text())["fixtures"]}
    done = manifest["complete_open_hours"]
    assert model.predict(_caller_audio(turns / done["file"], done["speech_end_s"] + 0.2)) > 0.9
    mid = manifest["pause_wondering_if"]
    cut = mid["speech"][0][1] + 0.2  # "I was wondering if ..."
    assert model.predict(_caller_audio(turns / mid["file"], cut)) < 0.15
