"""Streaming sample-rate conversion (libsoxr) that keeps its filter state across frames.

A telephone frame is 20 ms; resampling each frame on its own would click at every boundary.
`StreamResampler` feeds frames through one soxr stream, so the output is the same as if the
whole call had been resampled at once (minus the filter delay, flushed on `flush`).
"""

from __future__ import annotations

import numpy as np
import soxr


class StreamResampler:
    """Resample a stream of int16 or float32 chunks from `in_rate` to `out_rate`."""

    def __init__(self, in_rate: int, out_rate: int, dtype: str = "float32") -> None:
        self.in_rate = in_rate
        self.out_rate = out_rate
        self._dtype = np.dtype(dtype)
        self._passthrough = in_rate == out_rate
        self._stream = (
            None
            if self._passthrough
            else soxr.ResampleStream(in_rate, out_rate, 1, dtype=self._dtype, quality="HQ")
        )

    def process(self, samples: np.ndarray) -> np.ndarray:
        """Resample one chunk; output length varies slightly chunk to chunk (filter delay)."""
        samples = samples.astype(self._dtype, copy=False)
        if self._stream is None:
            return samples
        return self._stream.resample_chunk(samples)

    def flush(self) -> np.ndarray:
        """Return the samples still held in the filter (call once at end of stream)."""
        if self._stream is None:
            return np.zeros(0, dtype=self._dtype)
        return self._stream.resample_chunk(np.zeros(0, dtype=self._dtype), last=True)


def resample(samples: np.ndarray, in_rate: int, out_rate: int) -> np.ndarray:
    """Resample a whole clip at once (TTS output, fixtures)."""
    if in_rate == out_rate:
        return samples
    return soxr.resample(samples, in_rate, out_rate, quality="HQ")


def to_ulaw_8k(samples: np.ndarray, rate: int) -> bytes:
    """int16 (or float) mono audio at any rate → 8 kHz μ-law bytes, as Twilio plays it."""
    from media.mulaw import pcm16_to_ulaw

    if samples.dtype == np.int16:
        floats = samples.astype(np.float32) * (1.0 / 32768.0)
    else:
        floats = samples.astype(np.float32, copy=False)
    out = resample(floats, rate, 8000)
    return pcm16_to_ulaw(np.clip(out * 32768.0, -32768, 32767).astype(np.int16))
