"""Endpointing on real audio with the real Silero VAD."""

import numpy as np
import pytest

from media.audiofile import read_wav
from media.mulaw import pcm16_to_ulaw, ulaw_to_pcm16
from media.vad import SileroSession, SileroVad
from pipeline.listener import (
    EndpointConfig,
    Listener,
    SpeechConfirmed,
    SpeechEnded,
    SpeechPaused,
    SpeechStarted,
)


@pytest.fixture(scope="module")
def session() -> SileroSession:
    return SileroSession()


def run(listener: Listener, path, trailing_ms: int = 1500) -> list:
    pcm = ulaw_to_pcm16(pcm16_to_ulaw(read_wav(path, 8000)))
    pcm = np.concatenate([pcm, np.zeros(8 * trailing_ms, dtype=np.int16)])
    events = []
    for i in range(0, len(pcm) - 159, 160):
        # A fake clock at audio time: endpointing must count audio, not wall time.
        events += listener.feed(pcm[i : i + 160], now=i / 8000)
    return events


def test_a_sentence_is_one_utterance(session, fixtures_dir) -> None:
    events = run(Listener(SileroVad(session)), fixtures_dir / "open_hours.wav")
    ended = [e for e in events if isinstance(e, SpeechEnded)]
    assert len(ended) == 1 and ended[0].confirmed and ended[0].worth_transcribing
    assert [type(e) for e in events][:2] == [SpeechStarted, SpeechConfirmed]
    # ~2.7 s of speech, kept whole with pre-roll (first word not clipped).
    assert 2.4 < len(ended[0].audio) / 16000 < 3.6
    # End of speech is stamped at the last voiced window, the endpoint 500 ms later.
    assert abs((ended[0].ended_at - ended[0].last_voice_at) - 0.5) < 0.05


def test_slow_counting_splits_at_short_silence_and_joins_at_long(session, fixtures_dir) -> None:
    short = run(Listener(SileroVad(session), EndpointConfig(silence_ms=300)),
                fixtures_dir / "one_two_three.wav")
    long = run(Listener(SileroVad(session), EndpointConfig(silence_ms=900)),
               fixtures_dir / "one_two_three.wav")
    assert sum(isinstance(e, SpeechEnded) for e in short) == 3
    assert sum(isinstance(e, SpeechEnded) for e in long) == 1


def test_speculative_pause_comes_before_the_end(session, fixtures_dir) -> None:
    events = run(Listener(SileroVad(session), EndpointConfig(speculative_ms=200)),
                 fixtures_dir / "book_table.wav")
    kinds = [type(e) for e in events]
    assert SpeechPaused in kinds
    assert kinds.index(SpeechPaused) < kinds.index(SpeechEnded)


def test_a_click_is_never_confirmed_speech(session, fixtures_dir) -> None:
    events = run(Listener(SileroVad(session)), fixtures_dir / "click.wav")
    assert not any(isinstance(e, SpeechConfirmed) for e in events)
    assert not any(isinstance(e, SpeechEnded) and e.worth_transcribing for e in events)
