"""Streaming sample-rate conversion that keeps its filter state across frames.

A telephone frame is 20 ms; resampling each frame on its own would click at every boundary.
`StreamResampler` feeds frames through one soxr stream, so the output is the same as if the
whole call had been resampled at once (minus the filter delay, flushed on `flush`). soxr's
streams hand their output over in blocks, though: the HQ stream from 8 to 16 kHz gives nothing
for five 20 ms frames, then 1,660 samples at once, so whatever listens to it hears a frame
0-100 ms after it arrived. `HalfbandUpsampler` is the listener's 8 -> 16 kHz instead: a
half-band FIR, every frame's samples out at once, 8 ms of delay.
"""

from __future__ import annotations

import itertools

import numpy as np
import soxr


class StreamResampler:
    """Resample a stream of int16 or float32 chunks from `in_rate` to `out_rate`.

    int16 input is scaled to [-1, 1) float32 (what the VAD wants). soxr's stream hands its
    output over in blocks at input counts fixed by its configuration (8 -> 16 kHz HQ: 1,660
    samples once 927 are in, then every 830 more), and a call to it costs about 2.5 µs even
    when it gives nothing back. So input that cannot complete the next block is held here and
    handed over, with the chunk that completes it, in one call: the same samples come out of
    the same `process` calls as with a call per chunk (tests/media/test_resample.py), for a
    fifth of the calls on 20 ms frames. The schedule is read off a throwaway stream once per
    configuration (`_emission_schedule`); a configuration whose output does not come in
    regular blocks is fed every chunk. `process` keeps a reference to a held chunk: do not
    change it afterwards."""

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
        self._schedule = (None if self._stream is None
                          else _emission_schedule(in_rate, out_rate, self._dtype.name))
        self._held: list[np.ndarray] = []
        self._seen = 0  # input samples taken (given to soxr or held)
        self._due = self._schedule[0] if self._schedule is not None else 0  # next block's count
        self._empty = np.zeros(0, dtype=self._dtype)

    @staticmethod
    def prepare(in_rate: int, out_rate: int, dtype: str = "float32") -> None:
        """Read the block schedule for this configuration now (about 13 ms, once)."""
        if in_rate != out_rate:
            _emission_schedule(in_rate, out_rate, np.dtype(dtype).name)

    @property
    def input_until_output(self) -> int:
        """Input samples still to come before `process` gives output again: chunks that add
        up to fewer give nothing (0 when there is no schedule: any chunk may)."""
        return self._due - self._seen if self._schedule is not None else 0

    def _convert(self, samples: np.ndarray) -> np.ndarray:
        if samples.dtype == np.int16 and self._dtype == np.float32:
            return np.multiply(samples, _INT16_SCALE, dtype=np.float32)
        return samples.astype(self._dtype, copy=False)

    def process(self, samples: np.ndarray) -> np.ndarray:
        """Resample one chunk; output length varies chunk to chunk (soxr's blocks)."""
        if self._stream is None:
            return self._convert(samples)
        schedule = self._schedule
        if schedule is None:
            return self._stream.resample_chunk(self._convert(samples))
        self._seen += samples.size
        if self._seen < self._due:
            self._held.append(samples)  # cannot complete a block: nothing would come out
            return self._empty
        if self._held:
            self._held.append(samples)
            samples = np.concatenate(self._held)
            self._held.clear()
        period = schedule[1]
        while self._due <= self._seen:
            self._due += period
        return self._stream.resample_chunk(self._convert(samples))

    def flush(self) -> np.ndarray:
        """Return the samples still held in the filter (call once at end of stream)."""
        if self._stream is None:
            return np.zeros(0, dtype=self._dtype)
        if self._held:
            rest = self._convert(np.concatenate(self._held))
            self._held.clear()
            head = self._stream.resample_chunk(rest)
            return np.concatenate((head, self._stream.resample_chunk(self._empty, last=True)))
        return self._stream.resample_chunk(self._empty, last=True)


_INT16_SCALE = np.float32(1.0 / 32768.0)
_SCHEDULES: dict[tuple[int, int, str], tuple[int, int] | None] = {}


def _emission_schedule(in_rate: int, out_rate: int, dtype: str) -> tuple[int, int] | None:
    """When soxr's HQ stream gives output: (input count of the first block, input per block
    after it), read off a throwaway stream fed one sample at a time, or None when its first
    four blocks are not of one size at a fixed spacing."""
    key = (in_rate, out_rate, dtype)
    if key not in _SCHEDULES:
        probe = soxr.ResampleStream(in_rate, out_rate, 1, dtype=dtype, quality="HQ")
        one = np.zeros(1, dtype=dtype)
        blocks: list[tuple[int, int]] = []  # (input count when it came, its length)
        limit = 4 * max(in_rate // 4, 4096)
        for count in range(1, limit + 1):
            out = probe.resample_chunk(one)
            if out.size:
                blocks.append((count, out.size))
                if len(blocks) == 4:
                    break
        schedule = None
        if len(blocks) == 4:
            gaps = {b[0] - a[0] for a, b in itertools.pairwise(blocks)}
            if len({size for _, size in blocks}) == 1 and len(gaps) == 1:
                schedule = (blocks[0][0], gaps.pop())
        _SCHEDULES[key] = schedule
    return _SCHEDULES[key]


class HalfbandUpsampler:
    """8 -> 16 kHz (any rate to twice it), frame by frame: each chunk's samples come out at
    once, two for every one in, with the filter's state kept across chunks.

    A linear-phase half-band low-pass (a Kaiser-windowed sinc, `4 * half - 1` taps, cut-off at
    the input's Nyquist frequency) after zero-stuffing. Half its taps are zero and the centre
    one is 1/2, so in polyphase form every other output sample is an input sample (delayed)
    and the rest are one `2 * half`-tap FIR over the input. With `half=64` (255 taps): flat
    to within 0.01 dB up to 3.8 kHz, -6 dB at 4 kHz, images from 4.2 kHz on 83 dB down, and
    7.9 ms of delay; about 2 µs a frame more than soxr's stream, without its blocks. Shorter
    filters let a scrape's images through to Silero (`noise_scrape` in bench/turn_taking.py
    barges in with 79 or 95 taps, not with 191 or more).
    """

    def __init__(self, half: int = 64, beta: float = 8.0) -> None:
        if half < 2:
            raise ValueError("half must be at least 2")
        self.half = half
        taps = 4 * half - 1
        offsets = np.arange(taps) - (taps - 1) // 2
        h = 0.5 * np.sinc(offsets / 2.0) * np.kaiser(taps, beta)
        phase = 2.0 * h[0::2]  # the taps on input samples for the in-between outputs
        phase /= phase.sum()  # unity gain at DC, as the other phase has
        self._taps = phase[::-1].astype(np.float32)  # for `np.correlate`
        self._history = np.zeros(2 * half - 1, dtype=np.float32)

    input_until_output = 0  # every chunk's samples come out at once

    @property
    def delay_s(self) -> float:
        """The filter's delay in seconds of input at 8 kHz."""
        return (self.half - 0.5) / 8000

    def process(self, samples: np.ndarray) -> np.ndarray:
        """Twice as many float32 samples as `samples` has (int16 is scaled to [-1, 1))."""
        if samples.dtype == np.int16:
            samples = np.multiply(samples, np.float32(1 / 32768), dtype=np.float32)
        n = samples.size
        buffer = np.concatenate((self._history, samples.astype(np.float32, copy=False)))
        out = np.empty(2 * n, dtype=np.float32)
        out[0::2] = np.correlate(buffer, self._taps, "valid")
        out[1::2] = buffer[self.half : self.half + n]
        self._history = buffer[n:]
        return out

    def reset(self) -> None:
        self._history[:] = 0.0


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
