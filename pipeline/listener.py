"""Listening: caller audio in, speech boundaries out.

Per call, 8 kHz PCM frames are cut into Silero's 32 ms windows at the VAD's sample rate
(`Vad.sample_rate`), each scored by the VAD (behind its energy gate) as soon as it is whole,
and run through an endpointing state machine that counts *audio* time, not wall time, so a
caller streaming faster than real time (the simulator's pace factor) is judged the same way.
At 8 kHz (the default) the frames are the windows' audio as they come, and an utterance's
audio is resampled to 16 kHz (for STT and the turn detector) when it is asked for. At 16 kHz
the frames are resampled first (one streaming resampler, state kept across frames: soxr's, or
with `EndpointConfig.resampler = "halfband"` a half-band FIR that gives each frame's samples
at once).

Events, in order for one utterance:
  SpeechStarted     first voiced window (pre-roll kept, so the first word is not clipped)
  SpeechConfirmed   voiced long enough to be speech, not a click: barge-in fires on this
  SpeechPaused      silence long enough to start a speculative transcription
  SpeechResumed     the caller went on after a pause: the speculative result is stale
  SpeechEnded       silence long enough to end the turn; carries the utterance audio
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass
from typing import Literal

import numpy as np

from media.mulaw import FRAME_BYTES
from media.resample import HalfbandUpsampler, StreamResampler, resample
from media.vad import SAMPLE_RATE, SHAPES, WINDOW, Vad

WINDOW_MS = WINDOW * 1000 / SAMPLE_RATE  # 32 ms, at either rate
FRAME_S = FRAME_BYTES / 8000  # a line frame's audio time (8 kHz μ-law: a byte a sample)
# In the middle of a caller's speech, voiced windows may wait for up to this many to be scored
# in one model run (`Listener.feed`'s `hold`): fewer when a silence that decides something is
# shorter than that many windows (`Listener.hold_windows`). Four would fit the default
# thresholds too, but saved nothing measurable (docs/ARCHITECTURE.md, "The hold within the
# shortest pause").
HOLD_WINDOWS = 3


def windows_within(shortest_ms: float) -> int:
    """How many windows may wait in speech without moving a decision, when the shortest
    silence anything is decided on lasts `shortest_ms`: a run is scored when its last window
    is whole, and the first silent window among n that waited crosses a threshold of
    `shortest_ms` on the run's last window or later when n windows last no longer than it.
    At least 1 (no waiting), at most `HOLD_WINDOWS`."""
    return max(1, min(HOLD_WINDOWS, int(shortest_ms // WINDOW_MS)))


@dataclass(frozen=True, slots=True)
class SpeechStarted:
    at: float


@dataclass(frozen=True, slots=True)
class SpeechConfirmed:
    at: float
    onset_at: float


@dataclass(frozen=True, slots=True)
class SpeechPaused:
    audio: np.ndarray
    last_voice_at: float


@dataclass(frozen=True, slots=True)
class SpeechResumed:
    at: float


@dataclass(frozen=True, slots=True)
class SpeechEnded:
    audio: np.ndarray  # 16 kHz float32, with pre-roll and a little trailing silence
    started_at: float
    last_voice_at: float  # wall clock when the last voiced window arrived: "end of speech"
    ended_at: float
    voiced_ms: float
    confirmed: bool  # voiced long enough at a stretch to count as a barge-in
    worth_transcribing: bool  # enough voice in total to hold a word ("yes" is short)


ListenerEvent = SpeechStarted | SpeechConfirmed | SpeechPaused | SpeechResumed | SpeechEnded


@dataclass(slots=True)
class EndpointConfig:
    """Turn-taking thresholds (all in audio milliseconds)."""

    threshold: float = 0.5
    silence_ms: int = 500
    speculative_ms: int = 200
    confirm_ms: int = 160
    min_utterance_ms: int = 120
    preroll_ms: int = 300
    tail_ms: int = 160
    max_utterance_ms: int = 30_000
    # With a VAD at 16 kHz (`VAD_RATE=16000`): how 8 kHz becomes Silero's 16 kHz (at 8 kHz
    # nothing is resampled before the VAD). "soxr": libsoxr's HQ stream, which hands its output
    # over in 1,660-sample blocks, so a window is heard 0-100 ms after it arrived. "halfband":
    # each frame at once (8 ms of filter delay): turns end about 50-90 ms sooner
    # (bench/turn_taking.py), but partial transcripts for barge-in see a little less audio,
    # and the barge-in policy was tuned on "soxr" (docs/ARCHITECTURE.md).
    resampler: Literal["soxr", "halfband"] = "soxr"


class Listener:
    """Turns a call's inbound audio into speech events. Synchronous and cheap per frame."""

    def __init__(self, vad: Vad, config: EndpointConfig | None = None) -> None:
        self._vad = vad
        self._quiet_run = getattr(vad, "quiet_run", None)  # optional (`Vad`)
        self._hold_within_ms = math.inf  # what others decide on silence (`limit_hold`)
        self.config = config or EndpointConfig()
        self.rate = getattr(vad, "sample_rate", SAMPLE_RATE)
        self._window_len = SHAPES[self.rate][0]
        self._resampler: HalfbandUpsampler | StreamResampler | None = (
            None if self.rate == 8000
            else HalfbandUpsampler() if self.config.resampler == "halfband"
            else StreamResampler(8000, SAMPLE_RATE))
        self._pending = np.zeros(0, dtype=np.float32)
        self._whole_at: list[float] = []  # when each whole window in `_pending` arrived
        preroll_windows = max(1, int(self.config.preroll_ms / WINDOW_MS))
        self._preroll: deque[np.ndarray] = deque(maxlen=preroll_windows)
        self._utterance: list[np.ndarray] = []
        # The utterance's last 16 kHz audio (at 8 kHz) and how many windows it holds: a
        # pause's audio and the end's are often the same windows (both trimmed to the tail).
        self._resampled: tuple[int, np.ndarray] | None = None
        self._in_speech = False
        self._confirmed = False
        self._paused = False
        self._voiced_run_ms = 0.0
        self._voiced_total_ms = 0.0
        self._silence_ms = 0.0
        self._utterance_ms = 0.0
        self._started_at = 0.0
        self._onset_at = 0.0
        self._last_voice_at = 0.0
        self.last_probability = 0.0

    @property
    def config(self) -> EndpointConfig:
        return self._config

    @config.setter
    def config(self, config: EndpointConfig) -> None:
        self._config = config
        self._set_hold_windows()

    def limit_hold(self, shortest_ms: float) -> None:
        """Something else decides on this listener's silence too (turn-taking's interjection
        pause, its end-of-turn budgets), the shortest after `shortest_ms`: windows wait in
        speech no longer than that (`hold_windows`)."""
        self._hold_within_ms = shortest_ms
        self._set_hold_windows()

    def _set_hold_windows(self) -> None:
        cfg = self._config
        shortest = min(cfg.silence_ms, cfg.speculative_ms or math.inf, self._hold_within_ms)
        # How many windows `feed(hold=True)` lets wait in the middle of speech.
        self.hold_windows = windows_within(shortest)

    @property
    def in_speech(self) -> bool:
        return self._in_speech

    @property
    def confirmed(self) -> bool:
        """The caller is talking now, for longer than a click."""
        return self._in_speech and self._confirmed

    @property
    def silence_ms(self) -> float:
        """Audio silence since the current utterance's last voiced window (0 outside one)."""
        return self._silence_ms if self._in_speech else 0.0

    @property
    def voiced_ms(self) -> float:
        """Voiced audio in the current utterance so far (0 outside one)."""
        return self._voiced_total_ms if self._in_speech else 0.0

    @property
    def last_voice_at(self) -> float:
        return self._last_voice_at

    @property
    def input_until_output(self) -> int:
        """8 kHz samples still to come before `feed` can score a window: audio that adds up
        to fewer would only be held, and decides nothing (`Conversation.hear` may hold those
        frames itself and hand them over as one block). At 16 kHz, what the resampler holds
        (soxr's blocks, about every fifth frame; none with "halfband"). At 8 kHz, the rest of
        the next window; in the middle of speech, where `feed(hold=True)` waits for
        `hold_windows` windows, the rest of those."""
        if self._resampler is not None:
            return self._resampler.input_until_output
        whole = self.hold_windows if self._holding() else 1
        return max(0, whole * self._window_len - self._pending.size)

    def _holding(self) -> bool:
        """In the middle of speech: the utterance confirmed and the last window voiced,
        where `feed(hold=True)` lets windows wait; not when the utterance's length cap
        (`max_utterance_ms`, which ends it on any window) could fall before the last."""
        return (self._in_speech and self._confirmed and self._silence_ms == 0.0
                and self._utterance_ms + (self.hold_windows - 1) * WINDOW_MS
                < self._config.max_utterance_ms)

    def audio(self) -> np.ndarray:
        """The current utterance so far (16 kHz float), trimmed like a pause's audio."""
        return self._audio()

    def end_turn(self, now: float) -> SpeechEnded | None:
        """End the current utterance now (an end-of-turn decision, not the silence bound);
        None when the caller is not in an utterance. Made on silence, so no window is waiting
        in speech (`feed`'s hold) to be left out."""
        if not self._in_speech:
            return None
        events: list[ListenerEvent] = []
        self._end(now, events)
        return events[0]  # type: ignore[return-value]

    def feed(self, pcm8k: np.ndarray, now: float | None = None,
             hold: bool = False) -> list[ListenerEvent]:
        """Feed 8 kHz int16 audio (a frame, or a block of them); returns the events it caused.

        Each window is scored as soon as it is whole (at 16 kHz, as the resampler gives it:
        with "soxr", three or four at a time in one model run). With `hold`, in the middle of speech (the
        utterance confirmed and the last window voiced) windows wait until `hold_windows` are
        whole, then go through one model run, cheaper a window (`bench/vad_model.py`).
        Nothing is decided later for it: each window is stamped with when it arrived, and the
        first silent one among them counts its silence from there, so a threshold of silence
        no shorter than the windows that waited is crossed on the same frame as without
        holding. `hold_windows` keeps them so: at most `HOLD_WINDOWS` (96 ms), fewer under
        the listener's own pauses and what `limit_hold` was given (turn-taking's shortest,
        the interjection pause, is 128 ms)."""
        now = time.monotonic() if now is None else now
        if self._resampler is None:  # int16 to float32 [-1, 1) in one pass
            audio = np.multiply(pcm8k, np.float32(1.0 / 32768.0), dtype=np.float32)
        else:
            audio = self._resampler.process(pcm8k)  # int16 in, float32 [-1, 1) out
        if not audio.size:
            # soxr hands its output over in blocks (about every fifth frame): until then
            # there is no new window, and the pending samples stay as they are.
            return []
        if self._pending.size:
            audio = np.concatenate((self._pending, audio))
        window = self._window_len
        count = audio.size // window
        whole_at = self._whole_at
        if count > len(whole_at):
            if self._resampler is None:
                # Stamped with the time of the frame that completed it: `now` less a frame
                # (20 ms) for each whole frame after it. A block of frames that waited (the
                # conversation's deferred ones, a quiet block) so stamps its windows as frame
                # by frame would, not all with its last frame's time; one frame, as before.
                size = audio.size
                whole_at.extend([now - (size - end) // FRAME_BYTES * FRAME_S
                                 for end in range((len(whole_at) + 1) * window,
                                                  count * window + 1, window)])
            else:  # the resampler's output: when it came (its delay is the VAD's too)
                whole_at.extend([now] * (count - len(whole_at)))
        if hold and 0 < count < self.hold_windows and self._holding():
            self._pending = audio
            return []
        events: list[ListenerEvent] = []
        if count:
            # A block of frames (held quiet ones, or windows waiting in speech) completes
            # several windows, scored together (`Vad.score_run`: one model run for the
            # ungated ones); an utterance that ends inside the block resets the VAD, and the
            # windows after it are scored again from there, as one by one would have.
            windows = audio[: count * window].reshape(count, window)
            done = 0
            if (not self._in_speech and self._quiet_run is not None and self.config.threshold > 0
                    and self._quiet_run(windows)):
                # Every window gated (a quiet line): each would be scored 0 and go to the
                # pre-roll, and none could start speech (`_window`), so they go there at once.
                self.last_probability = 0.0
                keep = windows[-self._preroll.maxlen:].copy()  # type: ignore[misc]
                self._preroll.extend(keep)
                done = count
            while done < count:
                probs = self._vad.score_run(windows[done:])
                for prob in probs:
                    done += 1
                    if (self._window(windows[done - 1], prob, whole_at[done - 1], events)
                            and done < count):
                        break
            whole_at.clear()
        self._pending = audio[count * window:].copy()
        return events

    def _window(self, window: np.ndarray, prob: float, now: float,
                events: list[ListenerEvent]) -> bool:
        """One scored window through the endpointing state machine; True when it ended the
        utterance (the VAD was reset)."""
        cfg = self.config
        self.last_probability = prob
        # Hysteresis: harder to enter speech than to stay in it.
        voiced = prob >= cfg.threshold if not self._in_speech else prob >= cfg.threshold - 0.15
        if not self._in_speech:
            self._preroll.append(window.copy())
            if voiced:
                self._start(now, events)
            return False
        self._utterance.append(window.copy())
        self._utterance_ms += WINDOW_MS
        if voiced:
            self._voiced_run_ms += WINDOW_MS
            self._voiced_total_ms += WINDOW_MS
            self._last_voice_at = now
            if self._paused:
                self._paused = False
                events.append(SpeechResumed(now))
            self._silence_ms = 0.0
            # Confirmed once the voice since onset adds up to `confirm_ms`: a click or a cough
            # never does, and a word with a dip in the middle still confirms promptly.
            if not self._confirmed and self._voiced_total_ms >= cfg.confirm_ms:
                self._confirmed = True
                events.append(SpeechConfirmed(now, self._onset_at))
        else:
            self._voiced_run_ms = 0.0
            self._silence_ms += WINDOW_MS
            if (
                not self._paused
                and cfg.speculative_ms
                and self._silence_ms >= cfg.speculative_ms
                and self._silence_ms < cfg.silence_ms
                and self._voiced_total_ms >= cfg.min_utterance_ms
            ):
                self._paused = True
                events.append(SpeechPaused(self._audio(), self._last_voice_at))
        if self._silence_ms >= cfg.silence_ms or self._utterance_ms >= cfg.max_utterance_ms:
            self._end(now, events)
            return True
        return False

    def _start(self, now: float, events: list[ListenerEvent]) -> None:
        self._in_speech = True
        self._confirmed = False
        self._paused = False
        self._utterance = list(self._preroll)
        self._resampled = None
        self._preroll.clear()
        self._utterance_ms = len(self._utterance) * WINDOW_MS
        self._voiced_run_ms = WINDOW_MS
        self._voiced_total_ms = WINDOW_MS
        self._silence_ms = 0.0
        self._started_at = now
        self._onset_at = now
        self._last_voice_at = now
        events.append(SpeechStarted(now))
        if self.config.confirm_ms <= WINDOW_MS:
            self._confirmed = True
            events.append(SpeechConfirmed(now, now))

    def _audio(self) -> np.ndarray:
        """The utterance so far at 16 kHz, trimmed to `tail_ms` of trailing silence (at 8 kHz
        its windows are resampled at once, whole)."""
        keep_tail = int(self.config.tail_ms / WINDOW_MS)
        silent_windows = round(self._silence_ms / WINDOW_MS)
        windows = self._utterance
        if silent_windows > keep_tail:
            windows = windows[: len(windows) - (silent_windows - keep_tail)]
        if not windows:
            return np.zeros(0, dtype=np.float32)
        if self.rate == SAMPLE_RATE:
            return np.concatenate(windows)
        if self._resampled is not None and self._resampled[0] == len(windows):
            return self._resampled[1]
        audio = resample(np.concatenate(windows), self.rate, SAMPLE_RATE)
        audio = audio.astype(np.float32, copy=False)
        audio.flags.writeable = False  # handed out more than once
        self._resampled = (len(windows), audio)
        return audio

    def _end(self, now: float, events: list[ListenerEvent]) -> None:
        events.append(
            SpeechEnded(
                audio=self._audio(),
                started_at=self._started_at,
                last_voice_at=self._last_voice_at,
                ended_at=now,
                voiced_ms=self._voiced_total_ms,
                confirmed=self._confirmed,
                worth_transcribing=self._voiced_total_ms >= self.config.min_utterance_ms,
            )
        )
        self._in_speech = False
        self._confirmed = False
        self._paused = False
        self._utterance = []
        self._voiced_run_ms = 0.0
        self._voiced_total_ms = 0.0
        self._silence_ms = 0.0
        self._utterance_ms = 0.0
        self._vad.reset()
