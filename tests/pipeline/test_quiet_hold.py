"""Quiet frames held and listened to in blocks (`Conversation.hear`): the same decisions, the
same audio, far fewer steps; and the echo guard's answer for a frame too quiet to hold echo."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

import pipeline.conversation as conversation_module
from media.audiofile import read_wav
from media.mulaw import is_quiet_ulaw, pcm16_to_ulaw, ulaw_silence
from media.vad import SileroSession, SileroVad
from pipeline.call_setup import CallInfo, ConversationConfig
from pipeline.conversation import Conversation
from pipeline.echo_guard import EchoGuard
from pipeline.events import EventBus
from pipeline.listener import EndpointConfig
from pipeline.speech import SpokenSegment
from tests.fakes.engines import instant_engines
from tests.pipeline.test_conversation_tasks import _Sink

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


@pytest.fixture(scope="module", params=[8000, 16000])
def silero(request) -> SileroSession:
    """Both rates: at 8 kHz (the default) frames wait for the next Silero window (or, in
    speech, three); at 16 kHz for soxr's next block."""
    return SileroSession(rate=request.param)


def _frames(pcm: np.ndarray) -> list[bytes]:
    ulaw = pcm16_to_ulaw(pcm)
    return [ulaw[i:i + 160] for i in range(0, len(ulaw) - 159, 160)]


def _caller_line() -> list[bytes]:
    """Digital silence, a faint hiss, the caller's words twice, silence between and after."""
    words = read_wav(FIXTURES / "one_two_three.wav", 8000)
    hiss = (np.random.default_rng(3).normal(0, 8, 8000 * 2)).astype(np.int16)  # ~ -72 dBFS
    return ([ulaw_silence(20)] * 61 + _frames(hiss) + _frames(words) + [ulaw_silence(20)] * 97
            + _frames(words) + [ulaw_silence(20)] * 150)


def _conversation(silero: SileroSession) -> Conversation:
    config = ConversationConfig(greeting="", system_prompt="Be brief.", apology="Sorry.",
                                endpoint=EndpointConfig())
    engines = instant_engines(vad=lambda: SileroVad(silero))
    return Conversation(CallInfo("CA1", "MZ1"), engines, _Sink(), EventBus(), config)


def _listen(silero: SileroSession, frames: list[bytes], defer: bool = True
            ) -> tuple[list[tuple[int, str, Any]], int, Conversation]:
    """Every action with the frame it came on (audio in place of timestamps), and how many
    times turn-taking was fed. `defer=False`: no frame waits for the resampler's block."""
    conversation = _conversation(silero)
    if not defer:
        conversation._may_defer = lambda ulaw: False  # type: ignore[method-assign]
    feeds = 0
    feed = conversation.turns.feed

    def counting_feed(*args: Any) -> Any:
        nonlocal feeds
        feeds += 1
        return feed(*args)

    conversation.turns.feed = counting_feed  # type: ignore[method-assign]
    seen: list[tuple[int, str, Any]] = []
    for index, frame in enumerate(frames):
        for action in conversation.hear(frame):
            audio = getattr(action, "audio", None)
            if audio is None and hasattr(action, "speech"):
                audio = action.speech.audio
            seen.append((index, type(action).__name__, audio))
    return seen, feeds, conversation


def _stamps(silero: SileroSession, frames: list[bytes], monkeypatch: pytest.MonkeyPatch,
            defer: bool) -> list[tuple[int, str, tuple[float, ...]]]:
    """Every action's clock readings (onset, last voice, end), with the frame it came on, the
    frames arriving 20 ms apart by the conversation's clock."""
    clock = [0.0]
    monkeypatch.setattr(conversation_module, "time", SimpleNamespace(monotonic=lambda: clock[0]))
    conversation = _conversation(silero)
    if not defer:
        conversation._may_defer = lambda ulaw: False  # type: ignore[method-assign]
    seen = []
    for index, frame in enumerate(frames):
        clock[0] = index * 0.02
        for action in conversation.hear(frame):
            speech = getattr(action, "speech", None)
            stamps = ((speech.started_at, speech.last_voice_at, speech.ended_at)
                      if speech is not None else
                      tuple(getattr(action, name) for name in ("onset_at", "last_voice_at")
                            if hasattr(action, name)))
            seen.append((index, type(action).__name__, tuple(round(t, 9) for t in stamps)))
    return seen


def test_frames_that_waited_carry_the_times_they_came_at(
        silero: SileroSession, monkeypatch: pytest.MonkeyPatch) -> None:
    """Frames held or deferred are heard in a block, but each window keeps the time of the
    frame that completed it: the onsets, last voiced windows and ends that turn-taking
    reports (the latency metrics' end of speech) are those of every frame heard on its own,
    not the block's last frame's."""
    frames = _caller_line()
    held = _stamps(silero, frames, monkeypatch, defer=True)
    monkeypatch.setattr(conversation_module, "QUIET_RUN", 10**9)  # never hold
    plain = _stamps(silero, frames, monkeypatch, defer=False)
    assert [kind for _, kind, _ in plain].count("TurnEnded") == 2
    assert sum(kind == "Analyze" for _, kind, _ in plain) >= 2
    assert held == plain


@pytest.mark.parametrize(("hold_quiet", "defer"), [(True, False), (False, True), (True, True)])
def test_held_frames_lead_to_the_same_decisions_on_the_same_frames(
        silero: SileroSession, monkeypatch: pytest.MonkeyPatch, hold_quiet: bool,
        defer: bool) -> None:
    """Quiet frames held in blocks, frames waiting for the resampler's block, or both: the
    same actions on the same frames, with the same audio, as every frame one by one."""
    frames = _caller_line()
    if not hold_quiet:
        monkeypatch.setattr(conversation_module, "QUIET_RUN", 10**9)
    held, held_feeds, holding = _listen(silero, frames, defer)
    monkeypatch.setattr(conversation_module, "QUIET_RUN", 10**9)  # never hold
    plain, plain_feeds, one_by_one = _listen(silero, frames, defer=False)

    assert [(i, kind) for i, kind, _ in held] == [(i, kind) for i, kind, _ in plain]
    assert [kind for _, kind, _ in plain].count("TurnEnded") == 2  # both utterances heard
    for (_, _, a), (_, _, b) in zip(held, plain, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            assert np.array_equal(a, b)  # the same audio, sample for sample
    assert one_by_one.echo_guard.near_end == len(frames) * 160
    still_held = len(holding._held)  # the line's last frames, not a whole block yet
    assert (0 if silero.rate == 8000 else 1) <= still_held < conversation_module.HOLD_FRAMES
    assert holding.echo_guard.near_end == (len(frames) - still_held) * 160
    assert holding.echo_guard.stats.frames == len(frames) - still_held
    assert holding.listener.in_speech == one_by_one.listener.in_speech
    assert plain_feeds == len(frames)
    if hold_quiet and not defer:
        # Three quarters of this line is quiet, but the silence that ends each turn is
        # listened to frame by frame (the caller is still in an utterance): 509 feeds
        # against 682.
        assert held_feeds < len(frames) * 0.8
    if defer and silero.rate == 16000:
        # Turn-taking is fed once per resampler block (about every fifth frame) wherever
        # the bot is silent, as here, quiet frames or not.
        assert held_feeds < len(frames) * (0.35 if hold_quiet else 0.25)
    elif defer:
        # At 8 kHz at most once per window (every 1.6 frames), three windows in speech.
        assert held_feeds < len(frames) * (0.45 if hold_quiet else 1 / 1.6)


def test_frames_wait_for_the_one_that_completes_the_resamplers_block(
        silero: SileroSession, monkeypatch: pytest.MonkeyPatch) -> None:
    """The caller's words: each frame that cannot complete soxr's next block waits, and goes
    to the listener with the frame that does, in one feed."""
    monkeypatch.setattr(conversation_module, "QUIET_RUN", 10**9)  # no quiet blocks
    words = _frames(read_wav(FIXTURES / "one_two_three.wav", 8000))
    conversation = _conversation(silero)
    # The call's first 0.7 s count as just after the bot's audio (none has gone out): each
    # frame is listened to at once, as it is whenever the echo guard may have work.
    for _ in range(35):
        conversation.hear(ulaw_silence(20))
        assert conversation._held == []
    for _ in range(5 if silero.rate == 16000 else 6):  # 40 frames are 25 whole windows
        conversation.hear(ulaw_silence(20))
    waiting = len(conversation._held)
    assert waiting  # from here on, frames wait
    fed: list[int] = []
    feed = conversation.turns.feed

    def recording_feed(pcm8k: np.ndarray, *args: Any) -> Any:
        fed.append(pcm8k.size)
        return feed(pcm8k, *args)

    conversation.turns.feed = recording_feed  # type: ignore[method-assign]
    for frame in words:
        held_before = len(conversation._held)
        due = conversation.listener.input_until_output
        conversation.hear(frame)
        if due > 160 * (held_before + 1):
            assert len(conversation._held) == held_before + 1  # waits
        else:
            assert conversation._held == []  # released with the frame that completes it
    if silero.rate == 16000:
        # soxr's blocks: 927 samples in, then every 830: blocks of five or six frames.
        assert set(fed) <= {800, 960}
    else:
        # A window every 256 samples (one or two frames); in speech `hold_windows` (three:
        # four or five frames).
        held = conversation.listener.hold_windows * 256 // 160 * 160
        assert conversation.listener.hold_windows == 3
        assert set(fed) <= {160, 320, held, held + 160} and {held, held + 160} & set(fed)
    assert sum(fed) + 160 * len(conversation._held) == 160 * (waiting + len(words))


def _hold_some(conversation: Conversation) -> None:
    """Silence until frames are held: after `QUIET_RUN` quiet frames listened to one by one."""
    for _ in range(conversation_module.QUIET_RUN):
        assert conversation.hear(ulaw_silence(20)) == []
        assert conversation._held == []
    for _ in range(3):
        assert conversation.hear(ulaw_silence(20)) == []
    assert len(conversation._held) == 3


def test_a_word_after_held_frames_is_heard_on_its_first_frame(silero: SileroSession) -> None:
    """Held quiet frames are released by the first loud one (here not waiting for the
    resampler's block: the test above covers that)."""
    words = _frames(read_wav(FIXTURES / "one_two_three.wav", 8000))
    conversation = _conversation(silero)
    conversation._may_defer = lambda ulaw: False  # type: ignore[method-assign]
    _hold_some(conversation)
    first_loud = next(i for i, f in enumerate(words) if not is_quiet_ulaw(f))
    for frame in words[: first_loud + 1]:
        conversation.hear(frame)
    assert conversation._held == []  # released with the first loud frame, before it


async def _listen_while_the_bot_talks(silero: SileroSession, defer: bool = True
                                      ) -> tuple[Conversation, int]:
    """A quiet caller while the bot's audio goes out in 100 ms sends every seventh frame (at
    set times, so two runs lay it identically), then the caller's first word."""
    conversation = _conversation(silero)
    if not defer:
        conversation._may_defer = lambda ulaw: False  # type: ignore[method-assign]
    # A line known to have no echo: refits every 100 ms, so `_since_fit` shows on which frames
    # the bot's audio counted as recent.
    conversation.echo_guard.converge = 0
    for _ in range(40):
        conversation.hear(ulaw_silence(20))
    # Holding, the first send comes in the middle of a block.
    if conversation_module.QUIET_RUN == 8:
        assert 0 < len(conversation._held) < conversation_module.HOLD_FRAMES
    else:
        assert conversation._held == []
    tone = (np.sin(np.arange(16000) * 0.3) * 8000).astype(np.int16)
    conversation._sink.play(SpokenSegment("Hello.", pcm16_to_ulaw(tone), turn=1))
    piece = conversation._sink._live[0]
    most_held = 0
    for index in range(40):
        if index % 7 == 0:
            before = piece.sent_bytes
            piece.mark_sent(800)
            piece.sends[-1] = (before, conversation._mono0 + 0.8 + index * 0.02)
        assert conversation.hear(ulaw_silence(20)) == []
        most_held = max(most_held, len(conversation._held))
    words = _frames(read_wav(FIXTURES / "one_two_three.wav", 8000))
    for frame in words[:10]:
        conversation.hear(frame)
    assert conversation._held == []
    await conversation.close("stop")
    return conversation, most_held


async def test_bot_audio_sent_while_frames_are_held_is_laid_between_the_same_frames(
        silero: SileroSession, monkeypatch: pytest.MonkeyPatch) -> None:
    holding, most_held = await _listen_while_the_bot_talks(silero)
    monkeypatch.setattr(conversation_module, "QUIET_RUN", 10**9)  # never hold
    one_by_one, _ = await _listen_while_the_bot_talks(silero, defer=False)
    assert most_held == conversation_module.HOLD_FRAMES - 1  # sends did not split the blocks
    a, b = holding.echo_guard, one_by_one.echo_guard
    assert a._far_total == b._far_total == 6 * 800
    assert (a.near_end, a._play_end, a._since_fit, a.stats.frames) == (
        b.near_end, b._play_end, b._since_fit, b.stats.frames)
    assert np.array_equal(a._ref, b._ref) and np.array_equal(a._near, b._near)
    assert holding.listener.in_speech == one_by_one.listener.in_speech


def _echo_line() -> tuple[np.ndarray, np.ndarray]:
    """The bot's speech-like audio and the caller's side: its echo 15 dB down and 100 ms
    late, muted (digital silence) for a second in the middle, then the caller talking."""
    rng = np.random.default_rng(1)
    n = 8000 * 5
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 4 * np.arange(n) / 8000) ** 2
    bot = (rng.normal(0, 0.15, n) * envelope * 32767).astype(np.int16)
    delay = int(0.1 * 8000)
    near = np.concatenate([np.zeros(delay), bot[:-delay] * 10 ** (-15 / 20)])
    near[16000:24000] = 0.0
    near[32000:] += rng.normal(0, 0.1, n - 32000) * 32767
    return bot, np.clip(near, -32768, 32767).astype(np.int16)


def test_the_echo_guard_in_blocks_of_quiet_frames_ends_where_frame_by_frame_does() -> None:
    bot, near = _echo_line()
    one, blocks = EchoGuard(), EchoGuard()
    for guard in (one, blocks):
        guard.far_end(bot, 0.0)
    out_one = [one.process(near[i:i + 160]) for i in range(0, near.size, 160)]
    out_blocks: list[np.ndarray] = []
    i = 0
    while i < near.size:
        block = near[i:i + 1600]
        if i >= 160 * 100 and not np.abs(block).max():  # muted: ten frames at once
            out_blocks.append(blocks.process(block, 10))
            i += 1600
        else:
            out_blocks.append(blocks.process(near[i:i + 160]))
            i += 160
    assert np.array_equal(np.concatenate(out_one), np.concatenate(out_blocks))
    assert one.stats.delay_ms is not None and one.stats.delay_ms == blocks.stats.delay_ms
    assert one._filter is not None and np.array_equal(one._filter, blocks._filter)
    assert (one.near_end, one._since_fit, one.stats.frames) == (
        blocks.near_end, blocks._since_fit, blocks.stats.frames)


def test_a_muted_line_while_the_bot_talks_stays_silent_after_the_echo_was_fitted() -> None:
    """Before: with an echo path fitted, a silent frame came out as minus the predicted echo,
    the bot's own voice, for the VAD to hear."""
    rng = np.random.default_rng(1)
    n = 8000 * 4
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 4 * np.arange(n) / 8000) ** 2
    bot = (rng.normal(0, 0.15, n) * envelope * 32767).astype(np.int16)
    delay = int(0.1 * 8000)
    echo = (np.concatenate([np.zeros(delay), bot[:-delay]]) * 0.2).astype(np.int16)
    guard = EchoGuard()
    guard.far_end(bot, 0.0)
    for i in range(0, 8000 * 2, 160):  # two seconds of echo: the path is fitted
        guard.process(echo[i:i + 160])
    assert guard.stats.delay_ms is not None
    muted = np.zeros(160, dtype=np.int16)
    for _ in range(25):
        assert not guard.process(muted).any()
