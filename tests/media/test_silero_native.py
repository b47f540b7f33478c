"""Silero's forward pass in C (media/_silero.c, media/silero_native.py) against the official
graph, and what `SileroSession` does when it is missing or wrong."""

import logging

import numpy as np
import pytest

from media import silero_native, vad
from media.audiofile import read_wav
from media.mulaw import pcm16_to_ulaw, ulaw_to_pcm16
from media.resample import resample
from media.silero_graph import official_weights
from media.silero_native import kernel_weights, native_model
from media.vad import SHAPES, STATE, SileroSession, SileroVad, official_model_path, official_steps


def _rows(path: str, rate: int) -> np.ndarray:
    """A phone line's audio (μ-law) at `rate`, as consecutive windows with their context."""
    pcm = ulaw_to_pcm16(pcm16_to_ulaw(read_wav(path, 8000))).astype(np.float32) / 32768
    audio = resample(pcm, 8000, rate).astype(np.float32)
    window, context = SHAPES[rate]
    audio = np.concatenate([np.zeros(context, np.float32), audio])
    count = (len(audio) - context) // window
    return np.stack([audio[i * window: i * window + context + window] for i in range(count)])


def test_the_extension_is_built_here() -> None:
    """CI and `./run.sh` install with a C compiler (llama.cpp needs one), so the default
    session runs the compiled pass; without one the install goes on without it."""
    assert silero_native.available()
    assert SileroSession().kind == "native"


@pytest.mark.parametrize("rate", [8000, 16000])
def test_both_branches_score_speech_as_the_official_graph_does(fixtures_dir, rate: int) -> None:
    """Real speech in runs of 1 to 6 windows (more than the kernel's chunk of 4), from a
    non-zero state: the official graph's probabilities and states to float rounding, and its
    decisions. The 16 kHz branch checks the kernel's other shape (129 bins)."""
    model = native_model(official_model_path(), rate)
    official = SileroSession._load(str(official_model_path()))
    rows = _rows(str(fixtures_dir / "one_two_three.wav"), rate)
    rng = np.random.default_rng(3)
    h0 = (0.1 * rng.standard_normal(STATE)).astype(np.float32)
    c0 = (0.1 * rng.standard_normal(STATE)).astype(np.float32)
    want_probs, want_h, want_c = official_steps(official, rows, h0, c0, rate)
    h, c = h0.copy(), c0.copy()
    got: list[float] = []
    at = turn = 0
    while at < len(rows):
        run = np.ascontiguousarray(rows[at: at + [1, 3, 6, 2, 4][turn % 5]])
        probs = np.full(len(run), -1.0, dtype=np.float32)
        model.run(run, h, c, probs)
        got += probs.tolist()
        at += len(run)
        turn += 1
    # Float rounding: the sums run in another order, and at 16 kHz over twice the taps (the
    # ONNX Runtime graph comes within 2e-6 of the official one there, this within 1.3e-5).
    tolerance = 1e-5 if rate == 8000 else 5e-5
    assert max(abs(x - y) for x, y in zip(want_probs.tolist(), got, strict=True)) < tolerance
    assert [x > 0.5 for x in want_probs] == [y > 0.5 for y in got]
    assert max(got) > 0.9  # the comparison covers confident windows
    np.testing.assert_allclose(np.concatenate([h, c]), np.concatenate([want_h, want_c]),
                               rtol=1e-4, atol=1e-5)


def test_a_vad_on_the_compiled_pass_decides_as_one_on_onnx_runtime(fixtures_dir) -> None:
    """`SileroVad` over both kernels, in the listener's runs with gated windows between:
    the same probabilities to float rounding."""
    native, onnx = SileroSession(), SileroSession(native=False)
    assert (native.kind, onnx.kind) == ("native", "fast")
    rows = _rows(str(fixtures_dir / "open_hours.wav"), 8000)[:, 32:]
    quiet = np.full((2, 256), 1e-4, dtype=np.float32)
    stream = np.concatenate([rows[:12], quiet, rows[12:]])
    a, b = SileroVad(native), SileroVad(onnx)
    want: list[float] = []
    got: list[float] = []
    for at in range(0, len(stream), 3):
        got += a.score_run(stream[at: at + 3])
        want += b.score_run(stream[at: at + 3])
    assert max(abs(x - y) for x, y in zip(want, got, strict=True)) < 1e-5
    assert sum(p > 0.5 for p in got) >= 10


def test_a_compiled_pass_that_disagrees_leaves_onnx_runtime(monkeypatch, caplog) -> None:
    real = silero_native.kernel_weights

    def off_by_a_little(weights):  # type: ignore[no-untyped-def]
        laid_out = real(weights)
        laid_out["head_bias"] += 0.05
        return laid_out

    monkeypatch.setattr(silero_native, "kernel_weights", off_by_a_little)
    with caplog.at_level(logging.WARNING, logger=vad.__name__):
        session = SileroSession()
    assert (session.kind, session.rate, session.native) == ("fast", 8000, None)
    assert "disagrees" in caplog.text
    assert SileroVad(session).score(np.zeros(256, np.float32)) == 0.0


def test_without_the_extension_onnx_runtime_runs_it(monkeypatch, caplog) -> None:
    monkeypatch.setattr(silero_native, "available", lambda: False)
    with caplog.at_level(logging.INFO, logger=vad.__name__):
        session = SileroSession()
    assert (session.kind, session.native) == ("fast", None)
    assert "not built" in caplog.text


def test_bad_arrays_are_refused_with_a_clear_error() -> None:
    model = native_model(official_model_path(), 8000)
    rows = np.zeros((2, 288), np.float32)
    h, c, probs = (np.zeros(128, np.float32) for _ in range(3))
    model.run(rows, h, c, probs[:2])
    with pytest.raises(ValueError, match="rows must be n x 288"):
        model.run(np.zeros((2, 300), np.float32), h, c, probs)
    with pytest.raises(ValueError, match="probs at least n"):
        model.run(rows, h, c, probs[:1])
    with pytest.raises(ValueError, match="float32"):
        model.run(rows.astype(np.float64), h, c, probs)
    with pytest.raises(ValueError, match="h and c 128"):
        model.run(rows, np.zeros(64, np.float32), c, probs)
    with pytest.raises(ValueError, match="not C-contiguous"):
        model.run(rows, h[::2], c, probs)
    with pytest.raises(TypeError):
        model.run(rows, h, c)
    frozen = np.zeros(128, np.float32)
    frozen.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        model.run(rows, frozen, c, probs)


def test_weights_of_the_wrong_shape_are_refused() -> None:
    from media._silero import Model

    laid_out = kernel_weights(official_weights(official_model_path(), 8000))
    with pytest.raises(ValueError, match="w1: want 384 x 64"):
        Model(**{**laid_out, "w1": laid_out["w1"][:-1]})  # type: ignore[index]
    with pytest.raises(ValueError, match="block"):
        Model(**{**laid_out, "block": 32})
    with pytest.raises(ValueError, match="stft: want 128 x 130"):
        Model(**{**laid_out, "stft": laid_out["stft"].astype(np.float64)})  # type: ignore[union-attr]


def test_a_binding_scores_what_its_arrays_hold_now() -> None:
    """`bind` takes a stream's arrays once; each `run()` reads the rows as they are then and
    updates the state in place, as `run` with the same arrays does."""
    model = native_model(official_model_path(), 8000)
    rng = np.random.default_rng(5)
    rows = np.zeros((3, 288), np.float32)
    h, c, probs = np.zeros(128, np.float32), np.zeros(128, np.float32), np.zeros(3, np.float32)
    binding = model.bind(rows, h, c, probs)
    h2, c2, probs2 = h.copy(), c.copy(), probs.copy()
    for _ in range(3):
        rows[:] = (0.2 * rng.standard_normal(rows.shape)).astype(np.float32)
        binding.run()
        model.run(rows, h2, c2, probs2)
        np.testing.assert_array_equal(probs, probs2)
        np.testing.assert_array_equal(h, h2)
        np.testing.assert_array_equal(c, c2)
    assert h.any() and probs.any()
    with pytest.raises(ValueError, match="rows must be n x 288"):
        model.bind(np.zeros(100, np.float32), h, c, probs)
    with pytest.raises(TypeError):
        model.bind(rows, h, c)
    del binding
    rows.resize((2, 288), refcheck=False)  # the binding is gone: the arrays are free again
