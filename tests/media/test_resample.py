import numpy as np

from media.resample import StreamResampler, resample, to_ulaw_8k


def _sine(rate: int, seconds: float, freq: float = 440.0) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def test_streaming_in_20ms_frames_equals_resampling_the_whole_signal() -> None:
    signal = _sine(8000, 1.0)
    stream = StreamResampler(8000, 16000)
    pieces = [stream.process(signal[i : i + 160]) for i in range(0, len(signal), 160)]
    pieces.append(stream.flush())
    streamed = np.concatenate(pieces)
    whole = resample(signal, 8000, 16000)
    assert abs(len(streamed) - len(whole)) <= 2
    n = min(len(streamed), len(whole))
    assert np.max(np.abs(streamed[:n] - whole[:n])) < 1e-3


def test_no_discontinuity_at_frame_boundaries() -> None:
    signal = _sine(8000, 0.5, freq=300)
    stream = StreamResampler(8000, 16000)
    out = np.concatenate([stream.process(signal[i : i + 160]) for i in range(0, 4000, 160)])
    # A 300 Hz sine at 16 kHz moves at most 2π·300/16000·0.5 ≈ 0.06 per sample; a click
    # at a boundary would be a jump far larger than that.
    steady = out[200:]
    assert np.max(np.abs(np.diff(steady))) < 0.07


def test_tts_audio_becomes_8k_ulaw_of_the_right_length() -> None:
    pcm = (_sine(22050, 1.0) * 32767).astype(np.int16)
    ulaw = to_ulaw_8k(pcm, 22050)
    assert abs(len(ulaw) - 8000) <= 2
