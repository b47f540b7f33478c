"""Endpointing on real audio with the real Silero VAD."""

import numpy as np
import pytest

from media.audiofile import read_wav
from media.mulaw import pcm16_to_ulaw, ulaw_to_pcm16
from media.vad import EnergyVad, SileroSession, SileroVad
from pipeline.listener import (
    HOLD_WINDOWS,
    EndpointConfig,
    Listener,
    SpeechConfirmed,
    SpeechEnded,
    SpeechPaused,
    SpeechStarted,
    windows_within,
)
from pipeline.turn_detector import EndOfTurnPolicy, TurnDetector
from pipeline.turn_taking import TurnTaking, TurnTakingConfig


@pytest.fixture(scope="module")
def sessions() -> dict[int, SileroSession]:
    """Silero at both rates: 8 kHz (the default) and 16 kHz (faster-whisper's v6)."""
    return {8000: SileroSession(), 16000: SileroSession(rate=16000)}


# How the listener hears the line: at 8 kHz as it comes ("8k", the default), or resampled to
# 16 kHz by soxr's stream or the half-band filter (`VAD_RATE=16000`).
PATHS = ["8k", "soxr", "halfband"]


def listener(sessions, path: str, vad_type=SileroVad, **config) -> Listener:
    rate = 8000 if path == "8k" else 16000
    resampler = "soxr" if path == "8k" else path
    return Listener(vad_type(sessions[rate]), EndpointConfig(resampler=resampler, **config))


def run(listener: Listener, path, trailing_ms: int = 1500) -> list:
    pcm = ulaw_to_pcm16(pcm16_to_ulaw(read_wav(path, 8000)))
    return feed(listener, np.concatenate([pcm, np.zeros(8 * trailing_ms, dtype=np.int16)]))


def feed(listener: Listener, pcm: np.ndarray, frames: int = 1) -> list:
    """The line's 20 ms frames in order, `frames` of them at a time (a call's held quiet
    frames reach the listener as one block); every event they caused."""
    events = []
    step = 160 * frames
    for i in range(0, len(pcm) - 159, step):
        # A fake clock at audio time: endpointing must count audio, not wall time.
        events += listener.feed(pcm[i : i + step], now=i / 8000)
    return events


ALL_PATHS = pytest.mark.parametrize("path", PATHS)


@ALL_PATHS
def test_a_sentence_is_one_utterance(sessions, fixtures_dir, path) -> None:
    events = run(listener(sessions, path), fixtures_dir / "open_hours.wav")
    ended = [e for e in events if isinstance(e, SpeechEnded)]
    assert len(ended) == 1 and ended[0].confirmed and ended[0].worth_transcribing
    assert [type(e) for e in events][:2] == [SpeechStarted, SpeechConfirmed]
    # ~2.7 s of speech, kept whole with pre-roll (first word not clipped), at 16 kHz.
    assert ended[0].audio.dtype == np.float32
    assert 2.4 < len(ended[0].audio) / 16000 < 3.6
    # End of speech is stamped at the last voiced window, the endpoint 500 ms later.
    assert abs((ended[0].ended_at - ended[0].last_voice_at) - 0.5) < 0.05


@ALL_PATHS
def test_slow_counting_splits_at_short_silence_and_joins_at_long(sessions, fixtures_dir,
                                                                 path) -> None:
    short = run(listener(sessions, path, silence_ms=300), fixtures_dir / "one_two_three.wav")
    long = run(listener(sessions, path, silence_ms=900), fixtures_dir / "one_two_three.wav")
    assert sum(isinstance(e, SpeechEnded) for e in short) == 3
    assert sum(isinstance(e, SpeechEnded) for e in long) == 1


@ALL_PATHS
def test_speculative_pause_comes_before_the_end(sessions, fixtures_dir, path) -> None:
    events = run(listener(sessions, path, speculative_ms=200), fixtures_dir / "book_table.wav")
    kinds = [type(e) for e in events]
    assert SpeechPaused in kinds
    assert kinds.index(SpeechPaused) < kinds.index(SpeechEnded)


@ALL_PATHS
def test_a_click_is_never_confirmed_speech(sessions, fixtures_dir, path) -> None:
    events = run(listener(sessions, path), fixtures_dir / "click.wav")
    assert not any(isinstance(e, SpeechConfirmed) for e in events)
    assert not any(isinstance(e, SpeechEnded) and e.worth_transcribing for e in events)


class OneByOne:
    """The same Silero, made to score every window in its own model run."""

    def __init__(self, vad: SileroVad) -> None:
        self._vad = vad
        self.sample_rate = vad.sample_rate

    def score(self, window: np.ndarray) -> float:
        return self._vad.score(window)

    def score_run(self, windows: np.ndarray) -> list[float]:
        return [self._vad.score(window) for window in windows]

    def reset(self) -> None:
        self._vad.reset()


@pytest.mark.parametrize(("path", "frames"), [("8k", 5), ("8k", 10), ("soxr", 1),
                                              ("halfband", 10)])
def test_windows_scored_by_block_give_the_events_of_one_by_one(sessions, fixtures_dir,
                                                               path, frames) -> None:
    """soxr's blocks of output, or a block of frames fed at once (a call's held quiet frames
    come as one), hold several windows: the listener scores them in one model run; an
    utterance that ends inside a block resets the VAD, so the windows after it are scored
    again. On a line with hiss (Silero runs between the words too) and short endpoints (many
    ends inside blocks), the events are those of one window per run, audio included."""
    pcm = ulaw_to_pcm16(pcm16_to_ulaw(read_wav(fixtures_dir / "one_two_three.wav", 8000)))
    hiss = np.random.default_rng(7).normal(0, 32768 * 10 ** (-45 / 20), 8 * 4000)
    line = np.concatenate([pcm, pcm, np.zeros(8 * 1500)])
    line = np.clip(line + np.resize(hiss, line.size), -32768, 32767).astype(np.int16)
    block, single = (feed(listener(sessions, path, vad_type, silence_ms=250, speculative_ms=120),
                          line, frames)
                     for vad_type in (SileroVad, lambda s: OneByOne(SileroVad(s))))
    assert sum(isinstance(e, SpeechEnded) for e in single) >= 4
    assert [type(e) for e in block] == [type(e) for e in single]
    for a, b in zip(block, single, strict=True):
        for name in a.__slots__:
            x, y = getattr(a, name), getattr(b, name)
            assert np.array_equal(x, y) if isinstance(x, np.ndarray) else x == y, name


class Scripted:
    """A VAD with a state, as Silero has: voiced for the first 10 windows after a reset, then
    silent until the next one."""

    def __init__(self, sample_rate: int) -> None:
        self.since_reset = 0
        self.sample_rate = sample_rate

    def score(self, window: np.ndarray) -> float:
        self.since_reset += 1
        return 1.0 if self.since_reset <= 10 else 0.0

    def score_run(self, windows: np.ndarray) -> list[float]:
        return [self.score(window) for window in windows]

    def reset(self) -> None:
        self.since_reset = 0


@pytest.mark.parametrize(("path", "frames", "whole"), [("8k", 1, 20), ("8k", 5, 20),
                                                       ("soxr", 1, 19), ("halfband", 10, 20)])
def test_windows_after_an_end_inside_a_block_are_scored_after_the_reset(
        path, frames, whole) -> None:
    """An utterance ends (and the VAD resets) in the middle of a block of windows: the rest of
    the block is scored from the reset state. With this VAD every utterance is 10 voiced
    windows and 5 silent ones, wherever the block edges fall: 300 windows' worth of audio hold
    20 whole ones (19 through soxr, whose delay keeps a few samples back). Fed frame by frame
    through soxr (3-4 windows a block), or 10 frames at a time through the half-band filter
    (6.25 windows a block), or at 8 kHz in blocks of 1 and 5 frames (0.6 and 3.1 windows).
    Scoring the rest of a block before the reset would lose windows at each end, and
    utterances with them."""
    scripted = Listener(Scripted(8000 if path == "8k" else 16000),  # type: ignore[arg-type]
                        EndpointConfig(silence_ms=160, speculative_ms=0,
                                       resampler="soxr" if path == "8k" else path))
    count = 300 * 512 // 320 + 1  # 8 kHz frames for 300 windows of 32 ms
    tone = (3000 * np.sin(np.arange(160 * count) * 0.3)).astype(np.int16)
    ended = [e for e in feed(scripted, tone, frames) if isinstance(e, SpeechEnded)]
    assert len(ended) == whole and all(e.voiced_ms == 10 * 32 for e in ended)


@pytest.mark.parametrize("path", ["halfband", "8k"])
def test_the_halfband_resampler_and_8k_end_turns_sooner(sessions, fixtures_dir, path) -> None:
    """soxr's blocks make the VAD hear a frame 0-100 ms late; the half-band filter gives it
    every frame at once, and at 8 kHz there is nothing to resample: the same utterances,
    never ended later by the audio clock, and sooner on average (by where soxr's block edges
    fall). (At 8 kHz it is another model's branch: the same utterances all the same.)"""
    sooner = []
    for name in ("open_hours.wav", "one_two_three.wav", "book_table.wav"):
        soxr, halfband = ([e for e in run(listener(sessions, way), fixtures_dir / name)
                           if isinstance(e, SpeechEnded)]
                          for way in ("soxr", path))
        assert len(soxr) == len(halfband) >= 1
        for late, soon in zip(soxr, halfband, strict=True):
            sooner.append(late.ended_at - soon.ended_at)
            assert sooner[-1] >= 0, name
            assert abs(late.voiced_ms - soon.voiced_ms) <= 3 * 32
    assert len(sooner) >= 3 and sum(sooner) / len(sooner) >= 0.04, sooner


class Counting(SileroVad):
    """Silero, recording how many windows each model run scored."""

    def __init__(self, session: SileroSession) -> None:
        super().__init__(session)
        self.runs: list[int] = []

    def _run(self, windows: np.ndarray) -> list[float]:
        self.runs.append(len(windows))
        return super()._run(windows)


@pytest.mark.parametrize(("path", "config", "most"),
                         [("halfband", {}, HOLD_WINDOWS), ("8k", {}, HOLD_WINDOWS),
                          ("8k", {"speculative_ms": 64}, 2), ("8k", {"speculative_ms": 32}, 1),
                          ("8k", {"max_utterance_ms": 1000}, HOLD_WINDOWS)])
def test_holding_windows_in_speech_changes_nothing_but_the_model_runs(
        sessions, fixtures_dir, path, config, most) -> None:
    """With `hold`, windows in the middle of speech wait to be scored `HOLD_WINDOWS` at a time,
    or as many as fit in the shortest pause (a speculative pause of 64 ms: two; of 32 ms:
    none, where letting three wait moves events by frames), and none where the utterance's
    length cap could fall among them: every event is the same, stamps and audio included,
    and each is returned by the same frame (a held window is voiced speech going on: no
    event turns on it)."""
    pcm = ulaw_to_pcm16(pcm16_to_ulaw(read_wav(fixtures_dir / "book_table.wav", 8000)))
    hiss = np.random.default_rng(3).normal(0, 32768 * 10 ** (-45 / 20), 8 * 3000)
    line = np.concatenate([pcm, np.zeros(8 * 1500), pcm, np.zeros(8 * 1500)])
    line = np.clip(line + np.resize(hiss, line.size), -32768, 32767).astype(np.int16)
    results = {}
    for hold in (False, True):
        heard = listener(sessions, path, Counting, **config)
        assert heard.hold_windows == most
        vad = heard._vad
        by_frame = [heard.feed(line[i : i + 160], i / 8000, hold)
                    for i in range(0, len(line) - 159, 160)]
        results[hold] = (by_frame, vad.runs)
    (plain, plain_runs), (held, held_runs) = results[False], results[True]
    events = [e for frame in plain for e in frame]
    assert sum(isinstance(e, SpeechEnded) for e in events) >= 2
    assert [type(e) for e in events] == [type(e) for frame in held for e in frame]
    for a, b in zip(events, [e for frame in held for e in frame], strict=True):
        for name in a.__slots__:
            x, y = getattr(a, name), getattr(b, name)
            assert np.array_equal(x, y) if isinstance(x, np.ndarray) else x == y, name
    assert [[type(e) for e in frame] for frame in plain] == [[type(e) for e in frame]
                                                            for frame in held]
    assert max(plain_runs) == 1 and max(held_runs) == most
    assert sum(held_runs) == sum(plain_runs)
    if most > 1:  # fewer runs: a quarter fewer and more with three windows
        assert len(held_runs) < {2: 0.8, 3: 0.75}[most] * len(plain_runs)


@pytest.mark.parametrize("rate", [8000, 16000])
@pytest.mark.parametrize("frames", [1, 10])
def test_quiet_blocks_in_one_pass_give_the_same_events(sessions, fixtures_dir, frames,
                                                       rate) -> None:
    """On a quiet line (hiss under the gate between the words), blocks whose windows are all
    gated go to the pre-roll at once (`quiet_run`): the events are those of scoring window by
    window, each utterance's audio (its pre-roll included) sample for sample."""
    pcm = ulaw_to_pcm16(pcm16_to_ulaw(read_wav(fixtures_dir / "one_two_three.wav", 8000)))
    hiss = np.random.default_rng(11).normal(0, 32768 * 10 ** (-62 / 20), 8 * 2000)
    line = np.concatenate([np.zeros(8 * 700), pcm, np.zeros(8 * 1300), pcm, np.zeros(8 * 1300)])
    line = np.clip(line + np.resize(hiss, line.size), -32768, 32767).astype(np.int16)
    session = sessions[rate]
    quiet = SileroVad(session)
    passes = []
    original = quiet.quiet_run

    def counting(windows: np.ndarray) -> bool:
        taken = original(windows)
        passes.append(taken)
        return taken

    quiet.quiet_run = counting  # type: ignore[method-assign]
    fast = feed(Listener(quiet), line, frames)
    plain = feed(Listener(OneByOne(SileroVad(session))), line, frames)  # type: ignore[arg-type]
    assert sum(isinstance(e, SpeechEnded) for e in plain) >= 2
    assert sum(passes) >= 10  # the quiet stretches did go through in one pass
    assert [type(e) for e in fast] == [type(e) for e in plain]
    for a, b in zip(fast, plain, strict=True):
        for name in a.__slots__:
            x, y = getattr(a, name), getattr(b, name)
            assert np.array_equal(x, y) if isinstance(x, np.ndarray) else x == y, name


def test_windows_wait_no_longer_than_the_shortest_silence_that_decides_something() -> None:
    """`hold_windows`: as many 32 ms windows as fit in the shortest pause the listener or
    turn-taking decides on (at least one, at most `HOLD_WINDOWS`), however the thresholds
    are set."""
    assert HOLD_WINDOWS == 3
    assert [windows_within(ms) for ms in (0, 31, 64, 95, 96, 128, 10_000)] == [
        1, 1, 2, 2, 3, 3, 3]
    assert Listener(EnergyVad()).hold_windows == 3
    assert Listener(EnergyVad(), EndpointConfig(speculative_ms=0, silence_ms=80)
                    ).hold_windows == 2
    assert Listener(EnergyVad(), EndpointConfig(speculative_ms=64)).hold_windows == 2
    # Turn-taking's own pauses count: the interjection pause (128 ms by default) and the
    # end-of-turn budgets; replacing the listener's config keeps the limit.
    heard = Listener(EnergyVad())
    TurnTaking(heard, TurnDetector())
    assert heard.hold_windows == 3
    heard = Listener(EnergyVad())
    TurnTaking(heard, TurnDetector(), TurnTakingConfig(interjection_pause_ms=64))
    assert heard.hold_windows == 2
    heard = Listener(EnergyVad())
    TurnTaking(heard, TurnDetector(policy=EndOfTurnPolicy(complete_ms=40)))
    assert heard.hold_windows == 1
    heard.config = EndpointConfig()
    assert heard.hold_windows == 1
