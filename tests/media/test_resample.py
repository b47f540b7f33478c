import numpy as np

from media.resample import HalfbandUpsampler, StreamResampler, resample, to_ulaw_8k


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


def _level_db(signal: np.ndarray, rate: int, freq: float) -> float:
    """The level of one frequency in a signal (a Hann-windowed DFT bin), dB re a full sine."""
    window = np.hanning(signal.size)
    t = np.arange(signal.size) / rate
    amplitude = 2 * abs(np.sum(signal * window * np.exp(-2j * np.pi * freq * t))) / window.sum()
    return 20 * np.log10(max(amplitude, 1e-12))


def test_the_halfband_upsampler_gives_each_frame_at_once_and_streams_like_the_whole() -> None:
    """A 20 ms frame in, its 320 samples at 16 kHz out at once, and any chunking gives the
    signal one call over all of it gives."""
    signal = _sine(8000, 1.0, freq=700)
    stream = HalfbandUpsampler()
    pieces = [stream.process(signal[i : i + 160]) for i in range(0, len(signal), 160)]
    assert all(piece.size == 320 for piece in pieces)
    odd = HalfbandUpsampler()
    uneven = [odd.process(signal[i : i + 97]) for i in range(0, len(signal), 97)]
    whole = HalfbandUpsampler().process(signal)
    assert np.allclose(np.concatenate(pieces), whole, atol=1e-6)
    assert np.allclose(np.concatenate(uneven), whole, atol=1e-6)


def test_the_halfband_upsampler_keeps_the_band_and_rejects_the_images() -> None:
    """A tone in the telephone band comes out at 16 kHz at its level, 8 ms late, with its
    image (8 kHz minus the tone) 70 dB down or more; int16 in is scaled like soxr's float."""
    stream = HalfbandUpsampler()
    for freq in (300.0, 1000.0, 3000.0, 3400.0, 3750.0):
        tone = _sine(8000, 1.0, freq=freq)
        out = stream.process(tone)[2000:]  # past the filter's start-up
        assert abs(_level_db(out, 16000, freq) - _level_db(tone[1000:], 8000, freq)) < 0.05
        assert _level_db(out, 16000, 8000 - freq) < _level_db(out, 16000, freq) - 70
    assert abs(stream.delay_s - 0.0079) < 0.0001
    click = np.zeros(400, dtype=np.float32)
    click[100] = 1.0
    peak = int(np.argmax(HalfbandUpsampler().process(click)))
    assert abs(peak / 16000 - (100 / 8000 + stream.delay_s)) <= 1 / 16000
    as_int = HalfbandUpsampler().process((_sine(8000, 0.1) * 32767).astype(np.int16))
    as_float = HalfbandUpsampler().process(_sine(8000, 0.1))
    assert np.max(np.abs(as_int - as_float)) < 1e-4


def test_held_chunks_give_the_same_samples_at_the_same_calls_as_soxr_fed_every_chunk() -> None:
    """`StreamResampler` holds what cannot complete soxr's next block: every `process` call
    returns exactly what a soxr stream fed every chunk returns for it, frames, quiet blocks
    of ten frames and odd sizes alike, int16 in."""
    import soxr

    from media.resample import _emission_schedule

    assert _emission_schedule(8000, 16000, "float32") == (927, 830)
    rng = np.random.default_rng(7)
    sizes = [160] * 40 + [1600, 160, 160, 1600, 1600] + [int(n) for n in rng.integers(1, 900, 60)]
    pcm = (rng.standard_normal(sum(sizes)) * 3000).astype(np.int16)
    held = StreamResampler(8000, 16000)
    inner = held._stream
    assert inner is not None
    soxr_calls: list[int] = []
    real = inner.resample_chunk

    def counted(x: np.ndarray, last: bool = False) -> np.ndarray:
        out = real(x, last)
        soxr_calls.append(out.size)
        return out

    inner.resample_chunk = counted  # type: ignore[method-assign]
    every = soxr.ResampleStream(8000, 16000, 1, dtype="float32", quality="HQ")
    at = 0
    calls_with_output = 0
    for size in sizes:
        chunk = pcm[at:at + size]
        at += size
        want = every.resample_chunk(chunk.astype(np.float32) / np.float32(32768.0))
        got = held.process(chunk)
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, want)
        calls_with_output += bool(want.size)
    assert calls_with_output > 20
    assert len(soxr_calls) == calls_with_output and 0 not in soxr_calls  # never called in vain
    np.testing.assert_array_equal(held.flush(), every.resample_chunk(
        np.zeros(0, dtype=np.float32), last=True))


def test_a_stream_cut_short_flushes_what_it_held() -> None:
    signal = _sine(8000, 0.05)  # 400 samples: less than the first block
    stream = StreamResampler(8000, 16000)
    assert stream.process(signal).size == 0
    whole = resample(signal, 8000, 16000)
    assert abs(stream.flush().size - whole.size) <= 2
