import numpy as np
import pytest

from media.audiofile import read_wav
from media.mulaw import pcm16_to_ulaw, ulaw_to_pcm16
from media.resample import resample
from media.vad import SileroSession, SileroVad, dbfs


@pytest.fixture(scope="module", params=["8k", "8k-onnx", "16k"])
def session(request) -> SileroSession:
    """Both rates: the 8 kHz model (the default: the compiled forward pass; and in ONNX
    Runtime) and faster-whisper's 16 kHz one."""
    rate = 16000 if request.param == "16k" else 8000
    session = SileroSession(rate=rate, native=request.param == "8k")
    assert session.rate == rate
    assert session.kind == {"8k": "native", "8k-onnx": "fast", "16k": "fast"}[request.param]
    return session


def _windows(path: str, session: SileroSession) -> list[np.ndarray]:
    # Over the phone line: μ-law at 8 kHz, then (for a 16 kHz VAD) resampled.
    pcm = ulaw_to_pcm16(pcm16_to_ulaw(read_wav(path, 8000))).astype(np.float32) / 32768
    audio = resample(pcm, 8000, session.rate).astype(np.float32)
    size = session.window
    return [audio[i : i + size] for i in range(0, len(audio) - size, size)]


def test_silero_hears_a_human_voice(session: SileroSession, fixtures_dir) -> None:
    vad = SileroVad(session)
    probs = [vad.score(w) for w in _windows(str(fixtures_dir / "one_two_three.wav"), session)]
    assert max(probs) > 0.9
    assert sum(p > 0.5 for p in probs) >= 15  # three words of ~0.3 s each


def test_energy_gate_skips_silence_and_scores_it_zero(session: SileroSession) -> None:
    vad = SileroVad(session, gate_dbfs=-50)
    quiet = np.full(session.window, 1e-4, dtype=np.float32)
    assert dbfs(quiet) < -50
    assert vad.score(quiet) == 0.0


def test_a_noise_burst_is_not_sustained_speech(session: SileroSession, fixtures_dir) -> None:
    vad = SileroVad(session)
    probs = [vad.score(w) for w in _windows(str(fixtures_dir / "click.wav"), session)]
    assert sum(p > 0.5 for p in probs) <= 3


class _OneRunPerWindow:
    """What `SileroVad` promises, straight on the model, one run per window: each window with
    the 4 ms before it as context (zeros after a reset), the LSTM state carried from
    run to run; a gated window scores 0 and puts the state back to the settled silence."""

    def __init__(self, session: SileroSession, gate_dbfs: float = -50.0) -> None:
        self._session = session
        self._gate = gate_dbfs
        self.reset()

    def reset(self) -> None:
        self._h, self._c = (state.copy() for state in self._session.silence_state)
        self._context = np.zeros(self._session.context, dtype=np.float32)

    def score(self, window: np.ndarray) -> float:
        row = np.concatenate((self._context, window))[None]
        self._context = window[-self._session.context:].copy()
        if dbfs(window) < self._gate:
            self._h, self._c = (state.copy() for state in self._session.silence_state)
            return 0.0
        native = self._session.native
        if native is not None:  # the compiled forward pass, the state updated in place
            prob = np.zeros(1, dtype=np.float32)
            native.run(row, self._h, self._c, prob)
        else:
            prob, self._h, self._c = self._session.session.run(  # type: ignore[attr-defined]
                None, {"input": row, "h": self._h, "c": self._c})
        return float(prob.ravel()[0])


def test_a_run_of_windows_scores_exactly_as_one_run_per_window(session: SileroSession,
                                                               fixtures_dir) -> None:
    """`score_run` (one model run for consecutive windows) and `score` against the model run
    once per window: bit for bit, with runs of every length the listener makes, gated windows
    inside a run (state back to silence, context kept) and resets between runs."""
    words = _windows(str(fixtures_dir / "one_two_three.wav"), session)
    quiet = np.full(session.window, 1e-4, dtype=np.float32)
    stream = [*words[:20], quiet, *words[20:31], quiet, quiet, *words[31:]]
    sizes = [1, 3, 4, 2, 5, 3, 4, 3, 1, 4]
    reference, one, many = _OneRunPerWindow(session), SileroVad(session), SileroVad(session)
    expected, single, got, at, turn = [], [], [], 0, 0
    while at < len(stream):
        block = stream[at:at + sizes[turn % len(sizes)]]
        expected += [reference.score(w) for w in block]
        single += [one.score(w) for w in block]
        got += many.score_run(np.stack(block))
        at += len(block)
        turn += 1
        if turn % 7 == 0:  # an utterance ended: all start over
            reference.reset()
            one.reset()
            many.reset()
    assert single == expected
    assert got == expected
    assert sum(p > 0.5 for p in got) >= 15 and got[20] == 0.0


def test_a_quiet_block_is_taken_in_one_pass_as_score_run_takes_it(session: SileroSession,
                                                                  fixtures_dir) -> None:
    """`quiet_run` on windows all below the gate leaves the stream where `score_run` leaves
    it (the next words score bit for bit the same); with one window above the gate, or a
    block within a thousandth of the gate's power (a lone window `dbfs` does gate), it
    refuses and changes nothing."""
    words = np.stack(_windows(str(fixtures_dir / "one_two_three.wav"), session))
    rng = np.random.default_rng(5)
    hiss = (rng.standard_normal((4, session.window)) * 10 ** (-62 / 20)).astype(np.float32)
    for quiet in (hiss, hiss[:1]):
        one_pass, by_window = SileroVad(session), SileroVad(session)
        one_pass.score_run(words[:6])
        by_window.score_run(words[:6])
        assert one_pass.quiet_run(quiet)
        assert by_window.score_run(quiet) == [0.0] * len(quiet)
        assert one_pass.score_run(words[6:20]) == by_window.score_run(words[6:20])

    vad = SileroVad(session)
    vad.score_run(words[:6])
    before = vad._input.copy(), vad._h.copy(), vad._c.copy()
    at_the_gate = np.full(session.window, 10 ** (-50 / 20), dtype=np.float32)  # -50 dBFS: the gate
    for block in (np.concatenate([hiss, words[10:11]]), np.stack([hiss[0], at_the_gate * 0.9999]),
                  at_the_gate[None] * 0.9999):
        assert not vad.quiet_run(block)
        after = vad._input, vad._h, vad._c
        assert all(np.array_equal(a, b) for a, b in zip(before, after, strict=True))
    assert dbfs(at_the_gate * 0.9999) < -50.0  # gated by `score`, all the same
    # A gate under `dbfs`'s floor for digital silence (-120) scores silence: no one pass.
    floor = SileroVad(session, gate_dbfs=-130.0)
    assert not floor.quiet_run(np.zeros((3, session.window), dtype=np.float32))


def test_the_vad_rate_setting_picks_the_model_and_the_listeners_windows(monkeypatch) -> None:
    """`VAD_RATE` from the environment (a string there): 8000 by default, 16000 on request,
    anything else a settings error naming the key; the factory's VADs say their rate, which
    the listener follows."""
    from pipeline.factory import build_vad_factory
    from pipeline.listener import Listener
    from voicebot.settings import SettingsError, load_settings

    monkeypatch.delenv("VAD_RATE", raising=False)
    assert load_settings().vad_rate == 8000
    for rate, window in (("16000", 512), ("8000", 256)):
        monkeypatch.setenv("VAD_RATE", rate)
        settings = load_settings()
        for kind in ("silero", "energy"):
            vad = build_vad_factory(settings, kind)()
            assert vad.sample_rate == int(rate)
            listener = Listener(vad)
            assert (listener.rate, listener._window_len) == (int(rate), window)
    monkeypatch.setenv("VAD_RATE", "11025")
    with pytest.raises(SettingsError, match="VAD_RATE"):
        load_settings()


def test_the_vad_kernel_setting_picks_what_runs_silero(monkeypatch, caplog) -> None:
    """`VAD_KERNEL`: the compiled forward pass by default, ONNX Runtime on request (the start-up
    log says which), anything else a settings error naming the key."""
    import logging

    from pipeline import factory
    from voicebot.settings import SettingsError, load_settings

    monkeypatch.delenv("VAD_RATE", raising=False)
    monkeypatch.delenv("VAD_KERNEL", raising=False)
    assert load_settings().vad_kernel == "native"
    for kernel, says in (("onnx", "fast graph"), ("native", "compiled forward pass")):
        monkeypatch.setenv("VAD_KERNEL", kernel)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger=factory.__name__):
            vad = factory.build_vad_factory(load_settings())()
        assert f"Silero VAD at 8000 Hz ({says})" in caplog.text
        assert (vad._native is not None) == (kernel == "native")  # type: ignore[attr-defined]
    monkeypatch.setenv("VAD_KERNEL", "gpu")
    with pytest.raises(SettingsError, match="VAD_KERNEL"):
        load_settings()
