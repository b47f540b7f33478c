import numpy as np
import pytest

from media.audiofile import AudioFileError, decode_mp3, read_wav, write_wav


def test_mp3_decodes_in_process_at_its_own_rate(fixtures_dir) -> None:
    samples, rate = decode_mp3((fixtures_dir / "tone.mp3").read_bytes())
    assert rate == 24000  # no detour through 44.1 kHz
    assert 0.45 < len(samples) / rate < 0.6
    assert np.abs(samples).max() > 1000


def test_garbage_is_not_mp3() -> None:
    with pytest.raises(AudioFileError):
        decode_mp3(b"not an mp3 at all" * 10)


def test_wav_round_trip_and_resampling(tmp_path) -> None:
    tone = (np.sin(np.arange(16000) * 2 * np.pi * 440 / 16000) * 10000).astype(np.int16)
    write_wav(tmp_path / "t.wav", tone, 16000)
    assert np.array_equal(read_wav(tmp_path / "t.wav", 16000), tone)
    assert abs(len(read_wav(tmp_path / "t.wav", 8000)) - 8000) <= 1


def test_not_a_wav(tmp_path) -> None:
    (tmp_path / "x.wav").write_bytes(b"RIFF....nope")
    with pytest.raises(AudioFileError):
        read_wav(tmp_path / "x.wav", 8000)
