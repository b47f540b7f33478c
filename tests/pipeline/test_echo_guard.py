"""The echo guard's cheap arithmetic agrees with the obvious (slow) one."""

import itertools

import numpy as np

from pipeline.echo_guard import EchoGuard, _best_lag, _fft_size, _fit_fir


def test_the_fir_fit_from_correlations_matches_least_squares() -> None:
    rng = np.random.default_rng(7)
    samples, taps = 3072, 48
    ref = rng.normal(0, 0.1, samples + taps - 1).astype(np.float32)
    matrix = np.lib.stride_tricks.sliding_window_view(ref, taps)[:samples]
    near = (matrix @ rng.normal(0, 0.2, taps) + rng.normal(0, 0.01, samples)).astype(np.float32)
    expected, *_ = np.linalg.lstsq(matrix.astype(np.float64), near.astype(np.float64),
                                   rcond=None)
    solution, left = _fit_fir(ref, near)
    assert np.allclose(solution, expected, atol=1e-6)
    residual = near - matrix @ expected
    assert abs(left - float(np.dot(residual, residual))) < 1e-3 * left


def test_a_pure_tone_from_the_bot_still_fits() -> None:
    # One sine is a rank-2 reference: the normal equations are singular without the ridge.
    taps, samples = 48, 3072
    ref = (0.3 * np.sin(2 * np.pi * 440 * np.arange(samples + taps - 1) / 8000)).astype(
        np.float32)
    matrix = np.lib.stride_tricks.sliding_window_view(ref, taps)[:samples]
    near = (0.2 * matrix[:, 10] - 0.1 * matrix[:, 11]).astype(np.float32)
    solution, left = _fit_fir(ref, near)
    assert np.all(np.isfinite(solution))
    assert left < 1e-6 * float(np.dot(near, near))


def test_the_rings_wrap_around_like_modular_indexing() -> None:
    guard = EchoGuard(history_s=0.1)  # 800 samples: these spans wrap
    rng = np.random.default_rng(3)
    timeline = np.zeros(4000, dtype=np.float32)
    at = 0
    for size in (300, 700, 1, 799, 800, 1234, 5):
        samples = rng.normal(0, 1, size).astype(np.float32)
        guard._write(guard._ref, at, samples)
        timeline[at:at + size] = samples
        at += size
        for start in (s for s in (at - 800, at - 500, at - 7) if s >= 0):
            assert np.array_equal(guard._span(guard._ref, start, at), timeline[start:at])
    guard._fill(guard._ref, at - 650, at - 20)
    timeline[at - 650:at - 20] = 0.0
    assert np.array_equal(guard._span(guard._ref, at - 800, at), timeline[at - 800:at])


def test_the_correlation_finds_what_a_direct_one_finds_at_its_fast_fft_size() -> None:
    """`_best_lag` correlates over 2^a 3^b 5^c points (10,000 for a refit, not 16,384): the
    lags it reads must not wrap around. Checked against `np.correlate` directly."""
    rng = np.random.default_rng(11)
    for n, max_lag, early, delay in ((3072, 4800, 2000, 1000), (1280, 4800, 2000, -1500),
                                     (1280, 4800, 2000, 4800)):
        ref = rng.normal(0, 0.1, n + max_lag + early).astype(np.float32)
        near = ref[max_lag - delay:max_lag - delay + n] * 0.3
        near = (near + rng.normal(0, 0.02, n)).astype(np.float32)
        xcorr = np.correlate(ref.astype(np.float64), near.astype(np.float64), "valid")
        energy = np.cumsum(np.concatenate(([0.0], ref.astype(np.float64) ** 2)))
        window = energy[n:] - energy[:-n]
        window = np.maximum(window, 0.05 * window.max() + 1e-12)
        score = np.abs(xcorr) / (np.sqrt(window * float(np.dot(near, near))) + 1e-12)
        lag, corr = _best_lag(near, ref, max_lag, early)
        assert lag == delay == max_lag - int(np.argmax(score))
        assert abs(corr - float(score.max())) < 1e-5
    assert _fft_size(9872) == 10000 and _fft_size(8080) == 8100 and _fft_size(16384) == 16384


def test_on_a_line_without_echo_a_talking_caller_is_looked_at_every_300_ms() -> None:
    """A handset line (the bot's voice never comes back): once 1.5 s of bot audio has shown
    no echo, a caller talking over the bot is checked for one every third `refit_ms`, not
    every one (each look is an FFT correlation over 1.2 s of audio)."""
    guard = EchoGuard()
    looks: list[int] = []
    refit = guard._refit

    def counted() -> None:
        looks.append(guard.near_end)
        refit()

    guard._refit = counted  # type: ignore[method-assign]
    rng = np.random.default_rng(11)
    tone = (0.3 * 32767 * np.sin(2 * np.pi * 440 * np.arange(160) / 8000)).astype(np.int16)
    for frame in range(250):  # the bot talks for 5 s; the caller from 2 s on
        guard.far_end(tone, frame * 0.02)
        caller = (np.zeros(160) if frame < 100 else rng.normal(0, 3000, 160)).astype(np.int16)
        guard.process(caller)
    talking = [at for at in looks if at > 100 * 160]
    assert guard._filter is None and guard.stats.correlation < guard.min_correlation
    gaps = {b - a for a, b in itertools.pairwise(talking[1:])}
    assert gaps == {3 * guard.refit}  # 300 ms apart once the first look found the caller
    assert len(talking) <= 11  # 3 s of talking: 10 or 11 looks, not 30
