"""Silero v6's encoder rewritten as matrix products: the same model, less than half the CPU.

The stock graph (faster-whisper's `silero_vad_v6.onnx`) computes its STFT as a 1-D
convolution with a 256-sample kernel, and its four encoder layers as 1-D convolutions over 4,
2 and 1 time steps. ONNX Runtime runs those convolutions through im2col and a GEMM shaped for
images (channels × time, with time 1 to 4), and they were two thirds of a window's cost. This
module builds a graph that computes the same function with the same weights, laid out for
matrix products over rows of (window, time step):

- the STFT: the window (576 samples with its context) padded on the right by reflection as the
  stock graph pads it, cut into five 128-sample blocks, and the four frames the model keeps
  (the stock graph computes five and drops the first) gathered as pairs of blocks and
  multiplied by the transposed STFT basis: one MatMul;
- the magnitude: squares of the real and imaginary halves, summed and square-rooted;
- each encoder layer (kernel 3, padding 1, stride 1 or 2): its taps gathered from the
  zero-padded time steps (one Gather with precomputed indices) and one Gemm with the bias,
  then ReLU; a layer over one or two time steps keeps only the taps that see audio;
- the LSTM, the decoder and the outputs are the stock graph's own nodes.

Rows are independent until the LSTM, so consecutive windows of a stream still go through in
one run as a sequence. The probabilities and states agree with the stock model to within
float rounding (about 1e-6; `tests/media/test_silero_graph.py` checks real speech), not bit
for bit: the sums run in another order. `bench/vad_model.py` times both.

`fast_model_bytes` checks the stock graph's shape before rewriting (a different model raises
`UnsupportedGraph`), and `SileroSession` compares the two models on a probe at start-up and
falls back to the stock one if they disagree (`media/vad.py`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

STFT_BASIS = "encoder.feature_extractor.forward_basis_buffer"
LSTM_INPUT = "/Transpose_output_0"  # the stock encoder's output, laid out for the LSTM
LAYER_STRIDES = (1, 2, 2, 1)  # the encoder's four convolutions
FRAMES = 4  # STFT frames per window that reach the encoder
BLOCK = 128  # the STFT's hop


class UnsupportedGraph(ValueError):
    """The model is not the Silero v6 graph this rewrite knows."""


def _check(condition: bool, what: str) -> None:
    if not condition:
        raise UnsupportedGraph(f"not the Silero v6 graph this rewrite knows: {what}")


def fast_model_bytes(model: Path | str | bytes) -> bytes:
    """The rewritten model, serialized, from the stock one (a file or its bytes)."""
    import onnx
    from onnx import numpy_helper

    stock = onnx.load_from_string(model) if isinstance(model, bytes) else onnx.load(str(model))
    graph = stock.graph
    weights = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    nodes = list(graph.node)
    _check([i.name for i in graph.input] == ["input", "h", "c"], "inputs")
    basis = weights.get(STFT_BASIS)
    _check(basis is not None and basis.shape == (258, 1, 256), "STFT basis")
    stft = next((n for n in nodes if n.op_type == "Conv" and STFT_BASIS in n.input), None)
    _check(stft is not None and _ints(stft, "strides") == [BLOCK], "STFT stride")
    pad = next((n for n in nodes if n.op_type == "Pad"), None)
    _check(pad is not None and _attr(pad, "mode") == b"reflect"
           and weights.get(pad.input[1]) is not None
           and list(weights[pad.input[1]]) == [0, BLOCK, 0, BLOCK], "STFT padding")
    for k, stride in enumerate(LAYER_STRIDES):
        w = weights.get(f"encoder.conv_layers.{k}.weight")
        _check(w is not None and w.shape[2] == 3, f"encoder layer {k}")
        conv = next((n for n in nodes if n.input[1:2] == [f"encoder.conv_layers.{k}.weight"]),
                    None)
        _check(conv is not None and _ints(conv, "strides") == [stride]
               and _ints(conv, "pads") == [1, 1], f"encoder layer {k} stride")
    lstm_at = next((i for i, n in enumerate(nodes) if n.op_type == "LSTM"), None)
    _check(lstm_at is not None and nodes[lstm_at].input[0] == LSTM_INPUT, "LSTM input")
    assert lstm_at is not None

    g = _Graph()
    # The STFT: the stock graph pads 128 on each side by reflection and keeps frames 1..4 of
    # five; those start at 0, 128, 256 and 384 of the window and only reach 64 samples into
    # the right padding.
    x = _stft(g, "input", basis[:, 0, :], BLOCK)
    x = _encoder(g, x, [(weights[f"encoder.conv_layers.{k}.weight"],
                         weights[f"encoder.conv_layers.{k}.bias"])
                        for k in range(len(LAYER_STRIDES))])
    g.node("Reshape", [x, g.const("fast/lstm_rows", np.array([-1, 1, 128], np.int64))],
           LSTM_INPUT)

    del graph.node[:]
    graph.node.extend(g.nodes + nodes[lstm_at:])
    used = {name for n in graph.node for name in n.input}
    kept = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    graph.initializer.extend(g.initializers())
    onnx.checker.check_model(stock)
    return stock.SerializeToString()  # type: ignore[no-any-return]


class _Graph:
    """The nodes and weights of a graph being built. `node` adds a node and returns the name
    of its (first) output; `const` adds a weight and returns its name."""

    def __init__(self) -> None:
        self.nodes: list[Any] = []  # onnx.NodeProto
        self.weights: dict[str, np.ndarray] = {}

    def const(self, name: str, value: np.ndarray) -> str:
        self.weights[name] = value
        return name

    def node(self, op: str, inputs: list[str], output: str, *more: str, **attrs: object) -> str:
        from onnx import helper

        self.nodes.append(helper.make_node(op, inputs, [output, *more], **attrs))
        return output

    def initializers(self) -> list[Any]:  # onnx.TensorProto
        from onnx import numpy_helper

        return [numpy_helper.from_array(np.asarray(value), name)
                for name, value in self.weights.items()]


def _stft(g: _Graph, x: str, basis: np.ndarray, block: int) -> str:
    """The magnitudes of the four STFT frames a window (with its context: 4.5 blocks) gives,
    as rows of (window, frame): the window padded on the right by reflection (half a block),
    cut into five blocks, frames gathered as pairs of blocks and multiplied by the transposed
    basis (`basis`: 2 × bins rows of `2 * block` taps, real then imaginary)."""
    bins = basis.shape[0] // 2
    node, const = g.node, g.const
    x = node("Pad", [x, const("fast/pads", np.array([0, 0, 0, block // 2], np.int64))],
             "fast/padded", mode="reflect")
    x = node("Reshape", [x, const("fast/blocks", np.array([-1, FRAMES + 1, block], np.int64))],
             "fast/blocks_out")
    pairs = np.array([[t, t + 1] for t in range(FRAMES)], np.int64)
    x = node("Gather", [x, const("fast/pairs", pairs)], "fast/frames4", axis=1)
    x = node("Reshape", [x, const("fast/frame_rows", np.array([-1, 2 * block], np.int64))],
             "fast/frames")
    x = node("MatMul", [x, const("fast/stft", np.ascontiguousarray(basis.T))], "fast/spectrum")
    x = node("Mul", [x, x], "fast/squares")
    x = node("Reshape", [x, const("fast/halves", np.array([-1, 2, bins], np.int64))],
             "fast/halves_out")
    x = node("ReduceSum", [x, const("fast/axis1", np.array([1], np.int64))], "fast/power",
             keepdims=0)
    return node("Sqrt", [x], "fast/magnitude")  # (windows × 4) × bins


def layer_kernels(layers: list[tuple[np.ndarray, np.ndarray]]) -> list[np.ndarray]:
    """Each encoder layer's kernel (weights out × in × 3) laid out for one product with its
    taps: (taps × in) by out, tap by tap, keeping only the taps that see audio. Over four
    steps every tap; over two with stride 2, taps 1 and 2 (they see steps 0 and 1); over one,
    the middle tap (the padding is on both sides). The graph (`_encoder`) and the compiled
    forward pass (`media.silero_native`) both take them so."""
    kernels = []
    steps = FRAMES
    for (w, _), stride in zip(layers, LAYER_STRIDES, strict=True):
        out_ch, in_ch, _ = w.shape
        out_steps = (steps - 1) // stride + 1
        if steps == 1:
            kernel = w[:, :, 1].T
        elif out_steps == 1 and stride == 2 and steps == 2:
            kernel = np.concatenate([w[:, :, 1].T, w[:, :, 2].T])
        else:
            kernel = w.transpose(2, 1, 0).reshape(3 * in_ch, out_ch)
        kernels.append(np.ascontiguousarray(kernel))
        steps = out_steps
    _check(steps == 1, "encoder output steps")
    return kernels


def _encoder(g: _Graph, x: str, layers: list[tuple[np.ndarray, np.ndarray]]) -> str:
    """The four encoder layers (kernel 3, padding 1, strides `LAYER_STRIDES`, ReLU) over
    the rows of (window, frame): one row of 128 per window out. Each layer's taps are gathered
    from the zero-padded time steps (one Gather with precomputed indices) and go through one
    Gemm with the bias; a layer over one or two time steps keeps only the taps that see
    audio (`layer_kernels`)."""
    node, const = g.node, g.const
    steps = FRAMES
    for k, ((w, bias), stride, kernel) in enumerate(zip(layers, LAYER_STRIDES,
                                                        layer_kernels(layers), strict=True)):
        in_ch = w.shape[1]
        out_steps = (steps - 1) // stride + 1
        name = f"fast/layer{k}"
        taps = len(kernel) // in_ch
        if taps == 1:  # one step: its rows are the middle tap's
            cols = x
        elif taps == 2:  # two steps, stride 2: both steps in one row
            cols = node("Reshape", [x, const(f"{name}/rows", np.array([-1, 2 * in_ch],
                                                                      np.int64))], f"{name}/cols")
        else:  # every tap: gather them from the zero-padded steps
            x = node("Reshape", [x, const(f"{name}/steps", np.array([-1, steps, in_ch],
                                                                    np.int64))], f"{name}/x")
            x = node("Pad", [x, const(f"{name}/pads", np.array([0, 1, 0, 0, 1, 0], np.int64))],
                     f"{name}/padded")
            indices = np.array([[t * stride + j for j in range(3)] for t in range(out_steps)],
                               np.int64)
            x = node("Gather", [x, const(f"{name}/taps", indices)], f"{name}/gathered", axis=1)
            cols = node("Reshape", [x, const(f"{name}/rows", np.array([-1, 3 * in_ch],
                                                                      np.int64))], f"{name}/cols")
        x = node("Gemm", [cols, const(f"{name}/kernel", kernel),
                          const(f"{name}/bias", bias)], f"{name}/gemm")
        x = node("Relu", [x], f"{name}/relu")
        steps = out_steps
    return x


# The official model's branches (silero-vad's `silero_vad.onnx`, v6.2): the STFT's hop and
# the window, by sample rate. Both take 4.5 blocks per window with its context.
OFFICIAL_BLOCKS = {8000: 64, 16000: 128}


@dataclass(frozen=True)
class OfficialWeights:
    """One sample rate's weights from Silero's official model (silero-vad 6.2's
    `silero_vad.onnx`): what `official_fast_model_bytes` and the compiled forward pass
    (`media.silero_native`) are built from."""

    block: int  # the STFT's hop
    basis: np.ndarray  # 2 × bins rows of 2 × block taps, real then imaginary
    layers: list[tuple[np.ndarray, np.ndarray]]  # the encoder's (weight out × in × 3, bias)
    w_ih: np.ndarray  # the LSTM cell's, PyTorch's gate order i, f, g, o: 512 × 128
    w_hh: np.ndarray
    b_ih: np.ndarray
    b_hh: np.ndarray
    head_w: np.ndarray  # the decoder's 128 weights
    head_b: float


def official_weights(model: Path | str | bytes, rate: int) -> OfficialWeights:
    """The weights of the official model's branch for `rate` (both rates sit behind an `If`
    on its `sr` input), after checking their shapes (`UnsupportedGraph` otherwise)."""
    import onnx
    from onnx import numpy_helper

    block = OFFICIAL_BLOCKS.get(rate)
    if block is None:
        raise ValueError(f"Silero takes 8000 or 16000 Hz, not {rate}")
    stock = onnx.load_from_string(model) if isinstance(model, bytes) else onnx.load(str(model))
    graph = stock.graph
    _check([i.name for i in graph.input] == ["input", "state", "sr"], "official inputs")
    branch = next((n for n in graph.node if n.op_type == "If"), None)
    _check(branch is not None, "official rate branch")
    assert branch is not None
    # `sr == 16000` takes the then-branch (the first Constant the condition compares).
    wanted = "then_branch" if rate == 16000 else "else_branch"
    body = next(a.g for a in branch.attribute if a.name == wanted)
    weights: dict[str, np.ndarray] = {}
    for n in body.node:
        if n.op_type == "Constant" and "Inline_0__" in n.output[0]:
            weights[n.output[0].split("Inline_0__", 1)[1]] = numpy_helper.to_array(
                n.attribute[0].t)
    basis = weights.get("stft.forward_basis_buffer")
    _check(basis is not None and basis.shape[1:] == (1, 2 * block)
           and basis.shape[0] == 2 * (block + 1), f"STFT basis at {rate} Hz")
    assert basis is not None
    layers = []
    for k in range(len(LAYER_STRIDES)):
        w = weights.get(f"encoder.{k}.reparam_conv.weight")
        bias = weights.get(f"encoder.{k}.reparam_conv.bias")
        _check(w is not None and bias is not None and w.shape[2] == 3, f"encoder layer {k}")
        assert w is not None and bias is not None
        layers.append((w.astype(np.float32), bias.astype(np.float32)))
    _check([w.shape[:2] for w, _ in layers] == [(128, block + 1), (64, 128), (64, 64),
                                                (128, 64)], "encoder shapes")
    rnn = [f"decoder.rnn.{name}" for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
    _check(all(name in weights and weights[name].shape[0] == 512 for name in rnn), "LSTM cell")
    head_w, head_b = weights.get("decoder.decoder.2.weight"), weights.get("decoder.decoder.2.bias")
    _check(head_w is not None and head_w.shape == (1, 128, 1) and head_b is not None,
           "decoder")
    assert head_w is not None and head_b is not None
    w_ih, w_hh, b_ih, b_hh = (weights[name].astype(np.float32) for name in rnn)
    return OfficialWeights(block, basis[:, 0, :].astype(np.float32), layers, w_ih, w_hh,
                           b_ih, b_hh, head_w[0, :, 0].astype(np.float32),
                           float(head_b.reshape(-1)[0]))


def official_fast_model_bytes(model: Path | str | bytes, rate: int) -> bytes:
    """One sample rate of Silero's official ONNX model (silero-vad 6.2's `silero_vad.onnx`,
    both rates behind an `If` on its `sr` input, one window per stream and step) as a graph
    of the shape this module's rewrite has: inputs `input` (n × 4.5 blocks: consecutive
    windows of one stream with their context), `h` and `c` (1 × 1 × 128); outputs
    `speech_probs` (n), `hn` and `cn`. The encoder is the rewrite's; the LSTM cell the
    official graph spells out in elementwise steps becomes one LSTM node run over the rows as
    a sequence (its gates reordered from PyTorch's i, f, g, o to ONNX's i, o, f, c), so a
    call's windows go through in one run as with faster-whisper's export. The weights are
    read from the branch for `rate` (`official_weights`); the result is checked against the
    official graph at start-up (`media.vad`), not here."""
    import onnx
    from onnx import TensorProto, helper

    weights = official_weights(model, rate)
    block = weights.block
    g = _Graph()
    node, const = g.node, g.const
    x = _stft(g, "input", weights.basis, block)
    x = _encoder(g, x, weights.layers)
    x = node("Reshape", [x, const("fast/lstm_rows", np.array([-1, 1, 128], np.int64))],
             "fast/sequence")

    def gates(a: np.ndarray) -> np.ndarray:  # PyTorch's i, f, g, o -> ONNX's i, o, f, c
        i, f, g, o = np.split(a.astype(np.float32), 4, axis=0)
        return np.concatenate([i, o, f, g], axis=0)

    w_ih, w_hh, b_ih, b_hh = weights.w_ih, weights.w_hh, weights.b_ih, weights.b_hh
    node("LSTM", [x, const("fast/lstm_w", gates(w_ih)[None]),
                  const("fast/lstm_r", gates(w_hh)[None]),
                  const("fast/lstm_b", np.concatenate([gates(b_ih), gates(b_hh)])[None]),
                  "", "h", "c"],
         "fast/lstm_y", "hn", "cn", hidden_size=128)
    x = node("Reshape", ["fast/lstm_y", const("fast/y_rows", np.array([-1, 128], np.int64))],
             "fast/y")
    x = node("Relu", [x], "fast/y_relu")
    x = node("Gemm", [x, const("fast/head", weights.head_w[:, None].copy()),
                      const("fast/head_bias", np.array([weights.head_b], np.float32))],
             "fast/logit")
    x = node("Sigmoid", [x], "fast/prob")
    node("Reshape", [x, const("fast/flat", np.array([-1], np.int64))], "speech_probs")

    row = 9 * block // 2
    state = [1, 1, 128]
    fast = helper.make_graph(
        g.nodes, f"silero_v6_2_{rate}_fast",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["windows", row]),
         helper.make_tensor_value_info("h", TensorProto.FLOAT, state),
         helper.make_tensor_value_info("c", TensorProto.FLOAT, state)],
        [helper.make_tensor_value_info("speech_probs", TensorProto.FLOAT, ["windows"]),
         helper.make_tensor_value_info("hn", TensorProto.FLOAT, state),
         helper.make_tensor_value_info("cn", TensorProto.FLOAT, state)],
        g.initializers())
    result = helper.make_model(fast, opset_imports=[helper.make_opsetid("", 17)])
    result.ir_version = 8
    onnx.checker.check_model(result)
    return result.SerializeToString()  # type: ignore[no-any-return]


def _attr(node: object, name: str) -> object:
    from onnx import helper

    for attribute in node.attribute:  # type: ignore[attr-defined]
        if attribute.name == name:
            return helper.get_attribute_value(attribute)
    return None


def _ints(node: object, name: str) -> list[int] | None:
    value = _attr(node, name)
    return None if value is None else list(value)  # type: ignore[call-overload]
