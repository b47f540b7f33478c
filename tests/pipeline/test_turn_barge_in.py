"""Barge-in decisions: backchannels, words, and the echo guard (synthetic audio, no models)."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline import echo_guard
from pipeline.backchannel import (
    BargeInPolicy,
    BargeInTracker,
    classify_interjection,
    partial_says_words,
)
from pipeline.echo_guard import EchoGuard
from pipeline.listener import Listener
from pipeline.turn_detector import TurnDetector
from pipeline.turn_taking import Analyze, PauseBot, Transcribe, TurnEnded, TurnTaking


@pytest.mark.parametrize(("text", "kind"), [
    ("Uh-huh.", "backchannel"), ("Yeah", "backchannel"), ("Okay.", "backchannel"),
    ("Mm hm.", "backchannel"), ("M, M, M,", "backchannel"), ("Got it.", "backchannel"),
    ("", "noise"), ("...", "noise"), ("f", "noise"), ("You", "noise"), ("you.", "noise"),
    ("You too?", "words"), ("Thank you, but no.", "words"),
    ("Stop.", "words"), ("No.", "words"), ("Actually", "words"), ("Hold on", "words"),
    ("Yeah, but what about parking?", "words"),
])
def test_interjections(text: str, kind: str) -> None:
    assert classify_interjection(text) == kind


def test_a_partial_of_only_function_words_is_not_yet_words() -> None:
    assert not partial_says_words("and then")
    assert not partial_says_words("In a")
    assert partial_says_words("Hold on") and partial_says_words("No.")


def test_a_backchannel_over_the_bot_does_not_stop_it_words_do() -> None:
    policy = BargeInPolicy()
    tracker = BargeInTracker(policy, started_at=0.0)
    assert tracker.feed(100, 0.1) is None
    assert tracker.feed(policy.candidate_ms, 0.2) == "transcribe"
    assert tracker.partial("Yeah") is None  # keep talking
    assert tracker.feed(policy.candidate_ms + 32, 0.25) is None
    assert tracker.feed(policy.candidate_ms + policy.recheck_ms, 0.3) == "transcribe"
    assert tracker.partial("Yeah, but") == "interrupt"


def test_a_late_partial_transcript_counts_as_words_and_long_voice_always_interrupts() -> None:
    policy = BargeInPolicy()
    slow = BargeInTracker(policy, started_at=0.0)
    assert slow.feed(policy.candidate_ms, 1.0) == "transcribe"
    assert slow.feed(policy.candidate_ms + 32, 1.0 + policy.verdict_timeout_ms / 1000) == (
        "interrupt")
    long = BargeInTracker(policy, started_at=0.0)
    long.feed(policy.candidate_ms, 1.0)
    long.partial("and then")  # not words yet, not a backchannel either
    assert long.feed(policy.long_ms, 1.0) == "interrupt"
    assert long.feed(policy.long_ms + 100, 1.1) is None  # once


def test_a_long_backchannel_gets_twice_as_long_before_it_stops_the_bot() -> None:
    policy = BargeInPolicy()
    hum = BargeInTracker(policy, started_at=0.0)
    assert hum.feed(policy.candidate_ms, 0.1) == "transcribe"
    assert hum.partial("Mm-hmm") is None
    assert hum.feed(policy.long_ms, 0.2) != "interrupt"  # "mm-hmm, mm-hmm": still listening
    hum.partial("Mm-hmm, mm")
    assert hum.feed(policy.long_ms * 2, 0.3) == "interrupt"


@pytest.mark.parametrize(("first_words", "stops"), [
    (None, True),  # no partial transcript yet
    ("x", True),  # nothing Whisper can make out: maybe "Excuse me"
    ("Yeah", False),  # a backchannel: the caller is listening
    ("and then", False),  # function words: Whisper's guess at the start of a hum
])
def test_voice_still_going_at_the_deadline_stops_the_bot_unless_it_sounds_like_listening(
    first_words: str | None, stops: bool
) -> None:
    policy = BargeInPolicy()
    deadline = policy.decide_within_ms / 1000
    voiced = policy.candidate_ms + policy.recheck_ms
    tracker = BargeInTracker(policy, started_at=0.0)
    assert tracker.feed(policy.candidate_ms, 0.1) == "transcribe"
    if first_words is not None:
        assert tracker.partial(first_words) is None
        assert tracker.feed(voiced, deadline - 0.01) == "transcribe"  # a recheck; words kept
    assert tracker.feed(voiced + 32, deadline) == ("interrupt" if stops else None)


class _Pattern:
    """A VAD that scores windows from a script of voiced (True) and silent (False) windows."""

    sample_rate = 8000

    def __init__(self, voiced: list[bool]) -> None:
        self.voiced = iter(voiced)

    def score_run(self, windows: np.ndarray) -> list[float]:
        return [1.0 if next(self.voiced) else 0.0 for _ in windows]

    def reset(self) -> None:
        return None


def _over_the_bot(gap_windows: int) -> tuple[list[tuple[float, object]], float]:
    """"Ac-" (5 voiced windows), a dip of `gap_windows`, then "-tually" (12 voiced), all
    while the bot talks; the first sound's transcript at its pause is empty (Whisper hears
    no word in "Ac-"), and so is the second's partial. (time, action) for every action, and
    the first sound's onset."""
    script = [True] * 5 + [False] * gap_windows + [True] * 12 + [False] * 4
    turns = TurnTaking(Listener(_Pattern(script)), TurnDetector(uses_model=False))  # type: ignore[arg-type]
    window = np.full(256, 3000, dtype=np.int16)
    out: list[tuple[float, object]] = []
    for index in range(len(script)):
        now = (index + 1) * 0.032
        actions = turns.feed(window, now, bot_audible=True)
        for action in actions:
            out.append((now, action))
            if isinstance(action, Analyze):
                out.extend((now, a) for a in turns.on_transcript("", now, action.pause_id))
            elif isinstance(action, Transcribe):
                out.extend((now, a) for a in turns.on_partial("", now, action.utterance_id))
    return out, 0.032


@pytest.mark.parametrize("gap_windows", [6, 8])
def test_a_word_split_into_two_noises_over_the_bot_is_one_sound(gap_windows: int) -> None:
    """"Ac-" ends as a noise at its pause (no words in it alone) and "-tually" starts 224 or
    288 ms after its last voice, within `BargeInPolicy.join_ms`: the second sound carries on
    from the first, so the bot is stopped once 256 ms are voiced in all and 340 ms have
    passed since the first onset (`decide_within_ms`), within half a second of it, not 340
    ms after the second's onset; and the pause reports the first onset. (Before, in about
    one alignment of the windows in four, "Actually," went by as two noises and the bot
    stopped at "wait", a second in.)"""
    actions, onset = _over_the_bot(gap_windows)
    ended = [a for _, a in actions if isinstance(a, TurnEnded)]
    assert ended[0].interjection == "noise" and not ended[0].paused_bot
    paused = [(at, a) for at, a in actions if isinstance(a, PauseBot)]
    assert len(paused) == 1
    at, pause = paused[0]
    assert pause.onset_at == onset
    second_onset = onset + (5 + gap_windows) * 0.032
    assert at - onset <= 0.5 and at < second_onset + BargeInPolicy().decide_within_ms / 1000


def test_a_sound_after_a_longer_silence_is_a_sound_of_its_own() -> None:
    """Past `join_ms` of silence a noise and the next sound are apart: the deadline counts
    from the second sound's own onset."""
    gap = 9  # 320 ms after the noise's last voice
    actions, onset = _over_the_bot(gap)
    paused = [(at, a) for at, a in actions if isinstance(a, PauseBot)]
    assert len(paused) == 1
    at, pause = paused[0]
    second_onset = onset + (5 + gap) * 0.032
    assert pause.onset_at == second_onset
    assert at - second_onset >= BargeInPolicy().decide_within_ms / 1000


def test_a_hum_that_whisper_spells_out_is_a_backchannel() -> None:
    assert classify_interjection("M-H-N.") == "backchannel"
    assert classify_interjection("M-A-A-A-") == "backchannel"
    assert classify_interjection("Emm.") == "backchannel"
    assert classify_interjection("MMA.") == "backchannel"  # the hum opening at its end
    assert classify_interjection("Mmm-hmm, mma.") == "backchannel"
    assert classify_interjection("I need") == "words"
    assert classify_interjection("me") == "words" and classify_interjection("no, ma'am") == "words"
    assert classify_interjection("mama") == "words"


def _speechlike(seconds: float, seed: int) -> np.ndarray:
    """Noise with a syllable-rate envelope: correlates only with itself."""
    rng = np.random.default_rng(seed)
    n = int(seconds * 8000)
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 4 * np.arange(n) / 8000) ** 2
    return (rng.normal(0, 0.15, n) * envelope).astype(np.float32)


def _run_guard(near: np.ndarray, bot: np.ndarray) -> tuple[np.ndarray, EchoGuard]:
    """Bot audio sent 200 ms ahead in 100 ms chunks, like the playout; caller frames of 20 ms."""
    guard = EchoGuard()
    bot16 = (bot * 32767).astype(np.int16)
    out, sent = [], 0
    for i in range(0, near.size - 159, 160):
        while sent < bot16.size and sent < i + 160 + 1600:
            guard.far_end(bot16[sent:sent + 800], i / 8000)  # sent as this frame begins
            sent += 800
        out.append(guard.process((near[i:i + 160] * 32767).astype(np.int16)))
    return np.concatenate(out).astype(np.float32) / 32767, guard


def _db(x: np.ndarray) -> float:
    return float(10 * np.log10(np.mean(x.astype(np.float64) ** 2) + 1e-12))


def test_echo_of_the_bot_is_cancelled_and_the_caller_passes() -> None:
    bot = _speechlike(4.0, seed=1)
    delay = int(0.23 * 8000)
    path = np.array([0.6, 0.3, -0.15, 0.1, 0.05])
    echo = np.convolve(np.concatenate([np.zeros(delay), bot]), path)[: bot.size + delay]
    echo = (echo * 10 ** (-15 / 20)).astype(np.float32)
    caller = _speechlike(1.0, seed=2)
    near = echo.copy()
    near[20000:28000] += caller  # double talk at 2.5–3.5 s
    out, guard = _run_guard(near, bot)
    assert guard.stats.delay_ms is not None and abs(guard.stats.delay_ms - 230) < 5
    echo_only = slice(8000, 20000)
    assert _db(out[echo_only]) < _db(near[echo_only]) - 25
    talk = slice(20000, 28000)
    assert abs(_db(out[talk]) - _db(caller)) < 1.0  # the caller is untouched
    assert _db(out[talk] - caller) < _db(caller) - 15


def test_without_echo_a_quiet_caller_is_never_muted_after_convergence() -> None:
    bot = _speechlike(4.0, seed=3)
    caller = _speechlike(1.0, seed=4) * 0.2  # 14 dB below the bot
    near = np.zeros(bot.size, dtype=np.float32)
    near[20000:28000] += caller
    out, guard = _run_guard(near, bot)
    assert guard.stats.delay_ms is None  # nothing to fit: a handset line
    assert abs(_db(out[20000:28000]) - _db(caller)) < 0.5


def test_a_soft_caller_over_the_bots_first_words_is_not_muted_on_a_handset_line() -> None:
    # Before the guard knows the line (the first 1.5 s of the bot's audio), a caller 14 dB
    # below the bot used to be attenuated as a possible echo: a soft "Actually..." at 0.4 s
    # reached the VAD a third of a second late. It does not follow the bot's audio, so it
    # passes; the same level of real echo is still held back (next test).
    bot = _speechlike(4.0, seed=3)
    caller = _speechlike(1.0, seed=4) * 0.2
    near = np.zeros(bot.size, dtype=np.float32)
    near[3200:11200] += caller  # 0.4–1.4 s: before convergence
    out, _ = _run_guard(near, bot)
    first_words = slice(3200 + 1280, 11200)  # once 160 ms of it has been heard
    assert abs(_db(out[first_words]) - _db(caller[1280:])) < 0.5


def test_echo_before_convergence_is_still_held_back() -> None:
    bot = _speechlike(4.0, seed=1)
    delay = int(0.23 * 8000)
    echo = np.concatenate([np.zeros(delay), bot])[: bot.size] * 10 ** (-15 / 20)
    out, _ = _run_guard(echo.astype(np.float32), bot)
    early = slice(delay + 1280, 12000)  # the echo's first second, before any fit
    assert _db(out[early]) < _db(echo[early]) - 20


def test_the_guard_costs_nothing_while_the_bot_is_silent() -> None:
    guard = EchoGuard()
    frame = (np.random.default_rng(5).normal(0, 3000, 160)).astype(np.int16)
    assert guard.process(frame) is frame


def test_a_caller_talking_over_the_first_words_is_looked_at_every_refit_not_every_frame(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Before the first fit the guard looks for the echo on every frame, so a reply's first
    words are covered at once. A look that finds the caller talking (no correlation) waits a
    refit period before the next one: each look is an FFT correlation, and a caller talking
    over a greeting made one per frame (a third of the server's time while 100 calls an
    instant connected, `bench/capacity_media.py --stalls`)."""
    looks = []
    real = echo_guard._best_lag
    monkeypatch.setattr(echo_guard, "_best_lag", lambda *a: (looks.append(1), real(*a))[1])
    bot = _speechlike(4.0, seed=3)
    caller = _speechlike(1.2, seed=4)  # as loud as the bot: it passes the gate
    near = np.zeros(bot.size, dtype=np.float32)
    near[800:800 + caller.size] += caller  # 0.1–1.3 s: over the bot's first words
    _, guard = _run_guard(near, bot)
    frames = caller.size // 160
    assert guard.stats.delay_ms is None
    assert len(looks) <= frames // 5 + 3


def test_an_echo_under_a_caller_who_spoke_first_is_still_found() -> None:
    """Double talk from the bot's first word (a caller on a speakerphone saying "hello?"
    over the greeting): once the caller stops, the echo is found within a refit or two and
    cancelled as before."""
    bot = _speechlike(4.0, seed=1)
    delay = int(0.23 * 8000)
    echo = np.concatenate([np.zeros(delay), bot])[: bot.size] * 10 ** (-15 / 20)
    near = echo.astype(np.float32)
    caller = _speechlike(0.8, seed=2)
    near[400:400 + caller.size] += caller  # 0.05–0.85 s
    out, guard = _run_guard(near, bot)
    assert guard.stats.delay_ms is not None and abs(guard.stats.delay_ms - 230) < 5
    after = slice(400 + caller.size + 8000 * 3 // 10, 20000)  # from 0.3 s after the caller
    assert _db(out[after]) < _db(near[after]) - 25
