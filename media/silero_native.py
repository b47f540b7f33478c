"""Silero's official model run by the compiled forward pass (`media/_silero.c`).

ONNX Runtime spends more on its executor's per-node work than on this model's arithmetic: a
lone 8 kHz window costs about 43 µs there, of which the products are under 10. The compiled
pass computes what `media.silero_graph.official_fast_model_bytes`'s graph computes, from the
same weights (`official_weights`), laid out here for its kernel:

- the STFT basis transposed (2 × block taps by 2 × bins: real, then imaginary columns);
- each encoder layer's kernel as taps × inputs by outputs, with only the taps that see audio,
  as the graph's Gemms take them (`silero_graph.layer_kernels`);
- the LSTM's input and recurrent weights transposed (128 × 512 each, PyTorch's gate order)
  and its two biases summed.

`NativeSilero.run(rows, h, c, probs)` takes a stream's consecutive windows with their context
and updates the state in place; `bind` takes the same arrays once (a stream reuses its own, as
with ONNX Runtime's I/O binding), and the binding's `run()` scores what they hold.
`media.vad.SileroSession` checks it against the official graph at start-up and uses ONNX
Runtime if the extension is missing or disagrees.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from media.silero_graph import OfficialWeights, layer_kernels, official_weights


class NativeBinding(Protocol):
    """`media._silero.Binding`: `NativeSilero.run`'s arrays, taken once."""

    def run(self) -> None:
        ...


class NativeSilero(Protocol):
    """`media._silero.Model`: the forward pass over one sample rate's weights."""

    def run(self, rows: np.ndarray, h: np.ndarray, c: np.ndarray, probs: np.ndarray) -> None:
        ...

    def bind(self, rows: np.ndarray, h: np.ndarray, c: np.ndarray, probs: np.ndarray
             ) -> NativeBinding:
        ...


def available() -> bool:
    """Whether the extension was built (`pip install -e .` compiles it; it is optional)."""
    try:
        import media._silero  # noqa: F401
    except ImportError:
        return False
    return True


def native_model(model: Path | str | bytes, rate: int) -> NativeSilero:
    """The compiled forward pass over the official model's weights for `rate` (ImportError
    without the extension; `UnsupportedGraph` for another model)."""
    from media._silero import Model

    return Model(**kernel_weights(official_weights(model, rate)))  # type: ignore[no-any-return]


def kernel_weights(weights: OfficialWeights) -> dict[str, object]:
    """`weights` laid out as `media._silero.Model` takes them (C-contiguous float32)."""
    def c(a: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(a, dtype=np.float32)

    w0, w1, w2, w3 = layer_kernels(weights.layers)
    b0, b1, b2, b3 = (bias for _, bias in weights.layers)
    return {
        "block": weights.block,
        "stft": c(weights.basis.T),
        "w0": c(w0), "b0": c(b0), "w1": c(w1), "b1": c(b1),
        "w2": c(w2), "b2": c(b2), "w3": c(w3), "b3": c(b3),
        "wx": c(weights.w_ih.T), "wh": c(weights.w_hh.T),
        "bias": c(weights.b_ih + weights.b_hh),
        "head": c(weights.head_w), "head_bias": weights.head_b,
    }
