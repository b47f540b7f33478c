"""G.711 μ-law ⇄ 16-bit PCM, the codec of Twilio Media Streams (audio/x-mulaw, 8000 Hz, mono).

Table-driven with numpy: decoding is one lookup, encoding one lookup into a 64 Ki table built
once at import from the G.711 reference algorithm, so per-frame work allocates nothing more than
the output array. Values match the stdlib `audioop.lin2ulaw` / `audioop.ulaw2lin` exactly (the
tests compare them).
"""

from __future__ import annotations

import numpy as np

_BIAS = 0x84


def _decode_table() -> np.ndarray:
    codes = np.arange(256, dtype=np.int32)
    u = ~codes & 0xFF
    sign = u & 0x80
    exponent = (u >> 4) & 0x07
    mantissa = u & 0x0F
    magnitude = (((mantissa << 3) + _BIAS) << exponent) - _BIAS
    return np.where(sign != 0, -magnitude, magnitude).astype(np.int16)


def _encode_table() -> np.ndarray:
    # The 14-bit G.711 encoder as in CPython's audioop (st_14linear2ulaw).
    pcm = np.arange(-32768, 32768, dtype=np.int32) >> 2
    mask = np.where(pcm < 0, 0x7F, 0xFF)
    magnitude = np.minimum(np.abs(pcm), 8159) + (_BIAS >> 2)
    segment_ends = np.array([0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF])
    segment = np.searchsorted(segment_ends, magnitude, side="left")
    mantissa = (magnitude >> (np.minimum(segment, 7) + 1)) & 0x0F
    ulaw = np.where(segment >= 8, 0x7F, (segment << 4) | mantissa)
    return ((ulaw ^ mask) & 0xFF).astype(np.uint8)


ULAW_TO_PCM = _decode_table()
PCM_TO_ULAW = _encode_table()  # index: sample + 32768

# μ-law byte for digital silence; what Twilio sends on a quiet line.
ULAW_SILENCE = 0xFF
FRAME_BYTES = 160  # one Twilio media frame: 20 ms of 8 kHz μ-law

# A quiet frame: every sample within ±52 (-56 dBFS), 6 dB under the VAD's default gate, so
# none of its windows can be scored as speech. The codes, to be deleted by `bytes.translate`.
QUIET_PEAK = 52
_QUIET_CODES = bytes(int(code) for code in np.flatnonzero(np.abs(ULAW_TO_PCM) <= QUIET_PEAK))
QUIET_CODES = _QUIET_CODES  # the μ-law codes within ±`QUIET_PEAK` (`is_quiet_ulaw`)


def ulaw_to_pcm16(data: bytes) -> np.ndarray:
    """Decode μ-law bytes to int16 samples."""
    return ULAW_TO_PCM.take(np.frombuffer(data, dtype=np.uint8))  # take: no fancy-index setup


def is_quiet_ulaw(data: bytes) -> bool:
    """Is every sample of these μ-law bytes within ±`QUIET_PEAK`? (A fraction of a µs for a
    frame, without decoding it: digital silence and a faint line hiss are quiet.)"""
    return not data.translate(None, _QUIET_CODES)


def pcm16_to_ulaw(samples: np.ndarray) -> bytes:
    """Encode int16 samples to μ-law bytes."""
    return PCM_TO_ULAW[samples.astype(np.int32) + 32768].tobytes()


def float_to_pcm16(samples: np.ndarray) -> np.ndarray:
    """Float samples in [-1, 1] to int16, clipped."""
    return np.clip(samples * 32767.0, -32768, 32767).astype(np.int16)


def ulaw_silence(duration_ms: int) -> bytes:
    """μ-law silence of the given length at 8 kHz."""
    return bytes([ULAW_SILENCE]) * (8 * duration_ms)
