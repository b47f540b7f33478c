"""Reading audio files into mono PCM at a chosen rate: WAV (stdlib) and MP3 (miniaudio,
in-process, no subprocess)."""

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np

from media.resample import resample


class AudioFileError(Exception):
    """The file is not audio we can read."""

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        super().__init__(f"{path}: {reason}")


def read_wav(path: str | Path, rate: int) -> np.ndarray:
    """Read a PCM WAV file as mono int16 samples at `rate`."""
    try:
        with wave.open(str(path), "rb") as wav:
            channels, width, in_rate = wav.getnchannels(), wav.getsampwidth(), wav.getframerate()
            raw = wav.readframes(wav.getnframes())
    except (wave.Error, EOFError) as exc:
        raise AudioFileError(str(path), f"not a PCM WAV file ({exc})") from None
    if width == 2:
        samples = np.frombuffer(raw, dtype=np.int16).astype(np.float32) / 32768.0
    elif width == 1:
        samples = (np.frombuffer(raw, dtype=np.uint8).astype(np.float32) - 128.0) / 128.0
    elif width == 4:
        samples = np.frombuffer(raw, dtype=np.int32).astype(np.float32) / 2147483648.0
    else:
        raise AudioFileError(str(path), f"unsupported sample width {width}")
    if channels > 1:
        samples = samples.reshape(-1, channels).mean(axis=1)
    out = resample(samples, in_rate, rate)
    return np.clip(out * 32768.0, -32768, 32767).astype(np.int16)


def write_wav(path: str | Path, samples: np.ndarray, rate: int) -> None:
    """Write mono int16 samples as a WAV file."""
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(rate)
        wav.writeframes(samples.astype(np.int16).tobytes())


def decode_mp3(data: bytes) -> tuple[np.ndarray, int]:
    """Decode MP3 bytes (gTTS output) to mono int16 samples and their rate."""
    import miniaudio

    try:
        # Decode at the file's own rate (gTTS: 24 kHz); miniaudio would resample to 44.1 kHz.
        rate = miniaudio.mp3_get_info(data).sample_rate
        decoded = miniaudio.decode(data, output_format=miniaudio.SampleFormat.SIGNED16,
                                   nchannels=1, sample_rate=rate)
    except miniaudio.DecodeError as exc:
        raise AudioFileError("<mp3>", f"cannot decode MP3 ({exc})") from None
    return np.frombuffer(decoded.samples, dtype=np.int16).copy(), decoded.sample_rate
