"""The rewritten Silero graphs (media/silero_graph.py) against the stock ones: faster-whisper's
v6 at 16 kHz, and the 8 kHz branch of Silero's official v6.2 model."""

import logging
from collections.abc import Callable

import numpy as np
import pytest

from media import silero_graph, vad
from media.audiofile import read_wav
from media.mulaw import pcm16_to_ulaw, ulaw_to_pcm16
from media.resample import resample
from media.silero_graph import UnsupportedGraph, fast_model_bytes, official_fast_model_bytes
from media.vad import (
    CONTEXT,
    WINDOW,
    SileroSession,
    SileroVad,
    official_model_path,
    official_steps,
    silero_model_path,
)


@pytest.fixture(scope="module")
def stock() -> SileroSession:
    return SileroSession(fast=False, rate=16000)


@pytest.fixture(scope="module")
def fast() -> SileroSession:
    return SileroSession(rate=16000)


def _windows(path: str) -> np.ndarray:
    pcm = ulaw_to_pcm16(pcm16_to_ulaw(read_wav(path, 8000))).astype(np.float32) / 32768
    audio = resample(pcm, 8000, 16000).astype(np.float32)
    return np.stack([audio[i : i + WINDOW] for i in range(0, len(audio) - WINDOW, WINDOW)])


def test_the_default_session_runs_the_rewritten_model(stock: SileroSession,
                                                      fast: SileroSession) -> None:
    import onnx

    assert fast.kind == "fast"
    assert stock.kind == "stock"
    graph = onnx.load_from_string(fast_model_bytes(silero_model_path())).graph
    convs = [node.name for node in graph.node if node.op_type == "Conv"]
    assert convs == ["/decoder/conv1d/Conv"]  # the encoder is matrix products
    assert sum(node.op_type == "Gemm" for node in graph.node) == 4


@pytest.mark.parametrize("wav", ["one_two_three.wav", "click.wav", "open_hours.wav"])
def test_the_rewrite_scores_real_audio_as_the_stock_model_does(stock: SileroSession,
                                                               fast: SileroSession,
                                                               fixtures_dir, wav: str) -> None:
    """Streamed through `SileroVad` in the runs the listener makes (1, 3 and 4 windows, a
    gated window inside), both models give the same probabilities to float rounding."""
    windows = _windows(str(fixtures_dir / wav))
    quiet = np.full((1, WINDOW), 1e-4, dtype=np.float32)
    stream = np.concatenate([windows[:10], quiet, windows[10:]])
    sizes = [1, 3, 4, 3, 2]
    a, b = SileroVad(stock), SileroVad(fast)
    want: list[float] = []
    got: list[float] = []
    at = turn = 0
    while at < len(stream):
        block = stream[at : at + sizes[turn % len(sizes)]]
        want += a.score_run(block)
        got += b.score_run(block)
        at += len(block)
        turn += 1
    assert len(want) == len(stream)
    assert max(abs(x - y) for x, y in zip(want, got, strict=True)) < 1e-5
    assert [x > 0.5 for x in want] == [y > 0.5 for y in got]
    if wav != "click.wav":
        assert max(want) > 0.9  # real speech: the comparison covers confident windows


def test_the_states_agree_too(stock: SileroSession, fast: SileroSession, fixtures_dir) -> None:
    rows = _windows(str(fixtures_dir / "one_two_three.wav"))[20:24]
    rows = np.concatenate([np.zeros((4, CONTEXT), np.float32), rows], axis=1)
    h, c = stock.silence_state
    feeds = {"input": rows, "h": h, "c": c}
    for want, got in zip(stock.session.run(None, feeds), fast.session.run(None, feeds),
                         strict=True):
        assert want.shape == got.shape
        # The cell state is unbounded (about ±1.5 here): rounding is relative to it.
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_another_graph_is_refused() -> None:
    import onnx

    model = onnx.load(str(silero_model_path()))
    for node in model.graph.node:
        if node.name == "/encoder/conv_layers.1/Conv":
            for attribute in node.attribute:
                if attribute.name == "strides":
                    attribute.ints[:] = [1]
    with pytest.raises(UnsupportedGraph, match="encoder layer 1 stride"):
        fast_model_bytes(model.SerializeToString())
    with pytest.raises(UnsupportedGraph, match="inputs"):
        from bench.vad_batch import batched_model_bytes

        model = onnx.load_from_string(batched_model_bytes())
        model.graph.input[0].name = "audio"
        fast_model_bytes(model.SerializeToString())


def test_a_rewrite_that_disagrees_falls_back_to_the_stock_model(monkeypatch, caplog) -> None:
    """Whatever goes wrong in the rewrite, the VAD still runs: on the stock model."""
    real = silero_graph.fast_model_bytes

    def off_by_a_little(path: object) -> bytes:
        return _nudged(real(path), "fast/layer0/bias", 0.01)  # type: ignore[arg-type]

    monkeypatch.setattr(silero_graph, "fast_model_bytes", off_by_a_little)
    with caplog.at_level(logging.WARNING, logger=vad.__name__):
        session = SileroSession(rate=16000)
    assert session.kind == "stock"
    assert "disagrees" in caplog.text

    def broken(path: object) -> bytes:
        raise UnsupportedGraph("not the Silero v6 graph this rewrite knows: test")

    monkeypatch.setattr(silero_graph, "fast_model_bytes", broken)
    assert SileroSession(rate=16000).kind == "stock"



# The 8 kHz model: Silero's official graph runs one window per step, its state (h over c)
# carried by hand; the rewrite takes a call's consecutive windows as one sequence.


def _official_one_by_one(rows: np.ndarray, h: np.ndarray, c: np.ndarray,
                         rate: int = 8000) -> tuple[list[float], np.ndarray]:
    official = SileroSession._load(str(official_model_path()))
    probs, hn, cn = official_steps(official, rows, h, c, rate)
    return probs.tolist(), np.concatenate([hn, cn])


def _nudged(model: bytes, weight: str, by: float) -> bytes:
    """`model` with `by` added to one of its weights: a rewrite that is slightly wrong."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load_from_string(model)
    for init in graph.graph.initializer:
        if init.name == weight:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) + by, init.name))
    return graph.SerializeToString()  # type: ignore[no-any-return]


Run = Callable[[np.ndarray, np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]]


def _rewrite_8k(kernel: str) -> tuple[SileroSession, Run]:
    """The 8 kHz session, and a run of its rewrite: ONNX Runtime's graph ("fast"), or the
    compiled forward pass ("native")."""
    fast8 = SileroSession(native=kernel == "native")
    assert (fast8.kind, fast8.rate, fast8.window, fast8.context) == (kernel, 8000, 256, 32)
    if kernel == "fast":
        assert fast8.native is None
        return fast8, lambda run, h, c: tuple(fast8.session.run(None, {"input": run, "h": h,
                                                                        "c": c}))
    native = fast8.native
    assert native is not None

    def run_native(run: np.ndarray, h: np.ndarray, c: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        h, c = h.copy(), c.copy()
        probs = np.zeros(len(run), dtype=np.float32)
        native.run(np.ascontiguousarray(run), h, c, probs)
        return probs, h, c
    return fast8, run_native


@pytest.mark.parametrize("kernel", ["fast", "native"])
@pytest.mark.parametrize("wav", ["one_two_three.wav", "open_hours.wav", "click.wav"])
def test_the_8k_rewrite_scores_real_audio_as_the_official_model_does(fixtures_dir, wav: str,
                                                                     kernel: str) -> None:
    """A phone line's audio (μ-law, no resampling) in runs of 1 to 4 windows through the
    rewrite (ONNX Runtime's graph, and the compiled forward pass), against the official graph
    a window at a time: the same probabilities and states to float rounding, the same
    decisions."""
    fast8, run_8k = _rewrite_8k(kernel)
    pcm = ulaw_to_pcm16(pcm16_to_ulaw(read_wav(str(fixtures_dir / wav), 8000)))
    audio = np.concatenate([np.zeros(32, np.float32), pcm.astype(np.float32) / 32768])
    count = (len(audio) - 32) // 256
    rows = np.stack([audio[i * 256 : i * 256 + 288] for i in range(count)])
    h, c = fast8.silence_state
    want, state = _official_one_by_one(rows, h, c)
    got: list[float] = []
    at = turn = 0
    sizes = [1, 3, 4, 3, 2]
    while at < count:
        run = rows[at : at + sizes[turn % len(sizes)]]
        probs, h, c = run_8k(run, h, c)
        got += probs.tolist()
        at += len(run)
        turn += 1
    assert max(abs(x - y) for x, y in zip(want, got, strict=True)) < 1e-5
    assert [x > 0.5 for x in want] == [y > 0.5 for y in got]
    np.testing.assert_allclose(np.concatenate([h, c]), state, rtol=1e-4, atol=1e-5)
    if wav != "click.wav":
        assert max(want) > 0.9  # real speech: the comparison covers confident windows


def test_the_official_16k_branch_builds_the_same_way(fixtures_dir) -> None:
    """The builder reads either branch: at 16 kHz it agrees with the official graph too."""
    session = SileroSession._load(official_fast_model_bytes(official_model_path(), 16000))
    rows = _windows(str(fixtures_dir / "one_two_three.wav"))[18:24]
    rows = np.concatenate([np.zeros((len(rows), CONTEXT), np.float32), rows], axis=1)
    h = np.zeros((1, 1, 128), np.float32)
    want, _ = _official_one_by_one(rows, h, h, rate=16000)
    got, _, _ = session.run(None, {"input": rows, "h": h, "c": h})
    assert max(abs(x - y) for x, y in zip(want, got.tolist(), strict=True)) < 1e-5
    with pytest.raises(ValueError, match="8000 or 16000"):
        official_fast_model_bytes(official_model_path(), 11025)


def test_an_8k_rewrite_that_disagrees_falls_back_to_16k(monkeypatch, caplog) -> None:
    """The VAD still runs, at 16 kHz (the listener follows the session's rate)."""
    real = silero_graph.official_fast_model_bytes

    def off_by_a_little(path: object, rate: int) -> bytes:
        return _nudged(real(path, rate), "fast/head_bias", 0.05)  # type: ignore[arg-type]

    monkeypatch.setattr(silero_graph, "official_fast_model_bytes", off_by_a_little)
    with caplog.at_level(logging.WARNING, logger=vad.__name__):
        session = SileroSession()
    assert (session.kind, session.rate, session.window) == ("fast", 16000, 512)
    assert "disagrees" in caplog.text
    assert SileroVad(session).sample_rate == 16000
    with pytest.raises(ValueError, match="only runs rewritten"):
        SileroSession(fast=False)
    with pytest.raises(ValueError, match="8000 or 16000"):
        SileroSession(rate=22050)
