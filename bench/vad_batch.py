"""Silero VAD for many calls in one model run: exact, and what it would save.

Silero v6 (the copy inside faster-whisper) runs its LSTM over the rows of its input as one
sequence, with a state for one stream (`h`, `c`: 1 × 1 × 128). So a window of call A and a
window of call B cannot share a run, and every scored window pays the model's fixed cost
alone; under load that is a fifth of the media path's CPU (`perf`, README "Capacity").

Two edits to the graph make one run score one window for each of B streams, each with its own
state: the Transpose in front of the LSTM takes `perm (2, 0, 1)` instead of `(0, 2, 1)` (the
rows become the LSTM's batch, one time step each, instead of its time steps), and the state's
second dimension is left free (`h`, `c`: 1 × B × 128). Nothing else changes: the encoder
already works row by row, and the decoder's own Transpose puts the batch back in order.

A third variant, the grid, scores T consecutive windows of each of B streams in one run: the
LSTM's Transpose becomes a Reshape to (T, B, 128), rows time-major (`grid_model_bytes`).

This script builds the variants from the installed model (with the `onnx` package, a dev
dependency), checks them against the stock model stream by stream on real speech (every
probability and state must be bit-identical), and times them per window:

    .venv/bin/python bench/vad_batch.py                      # table + bench/results/vad_batch.json
    .venv/bin/python bench/vad_batch.py --sizes 1 8 32 --repeats 5

The call path does not use it: the stock model, fed consecutive windows of one stream as
rows, scores them as a sequence (bit for bit what one run each gives), and the listener gets
its windows three or four at a time, so it scores a call's block in one run
(`SileroVad.score_run`). That is timed here too: it saves about two thirds of what one run
for 8 or more calls saves, without holding any window until the end of the event loop's tick
(docs/ARCHITECTURE.md, "Capacity: what is left"). The grid shows where the floor is: about
31 µs per window however many calls and windows share a run, the encoder's own work.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from media.audiofile import read_wav  # noqa: E402
from media.vad import CONTEXT, WINDOW, SileroSession, silero_model_path  # noqa: E402

LSTM_INPUT = "/Transpose_output_0"  # the encoder's output, laid out for the LSTM
STATE = ("h", "c", "hn", "cn")


def _lstm_transpose(graph: object) -> object:
    """The Transpose that lays the encoder's output out for the LSTM (refuses other graphs)."""
    transposes = [n for n in graph.node  # type: ignore[attr-defined]
                  if n.op_type == "Transpose" and n.output[0] == LSTM_INPUT]
    if len(transposes) != 1:
        raise ValueError("not the Silero v6 graph this edit knows (no single LSTM Transpose)")
    perm = next(a for a in transposes[0].attribute if a.name == "perm")
    if list(perm.ints) != [0, 2, 1]:
        raise ValueError(f"unexpected Transpose perm {list(perm.ints)}")
    return transposes[0]


def _free_batch_and_save(model: object) -> bytes:
    import onnx

    graph = model.graph  # type: ignore[attr-defined]
    for value in [*graph.input, *graph.output]:
        dims = value.type.tensor_type.shape.dim
        if value.name in STATE:
            dims[1].dim_param = "batch"
        elif value.name == "speech_probs":
            dims[0].dim_param = "rows"
    del graph.value_info[:]  # shapes inferred for one stream; the runtime infers its own
    onnx.checker.check_model(model)
    return model.SerializeToString()  # type: ignore[attr-defined,no-any-return]


def batched_model_bytes(path: Path | None = None) -> bytes:
    """The v6 model with the batch edits (see the module docstring), serialized: one window
    for each of B streams per run."""
    import onnx

    model = onnx.load(str(path or silero_model_path()))
    perm = next(a for a in _lstm_transpose(model.graph).attribute if a.name == "perm")
    del perm.ints[:]
    perm.ints.extend([2, 0, 1])
    return _free_batch_and_save(model)


def grid_model_bytes(path: Path | None = None) -> bytes:
    """The v6 model edited to score T consecutive windows of each of B streams in one run.

    The rows come time-major (window t of stream b is row t·B + b; B is read from the state's
    second dimension). The LSTM's Transpose becomes a Reshape to (T, B, 128): T time steps
    for a batch of B streams. The decoder needs no edit: its own Transpose and Conv treat the
    streams as its batch and the windows as its length, so `speech_probs[b·T + t]` is window t
    of stream b, and `hn`, `cn` are each stream's state after its last window."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(path or silero_model_path()))
    graph = model.graph
    transpose = _lstm_transpose(graph)
    at = list(graph.node).index(transpose)
    graph.initializer.extend([
        helper.make_tensor("grid_minus_one", TensorProto.INT64, [1], [-1]),
        helper.make_tensor("grid_features", TensorProto.INT64, [1], [128]),
        helper.make_tensor("grid_one", TensorProto.INT64, [1], [1])])
    nodes = [helper.make_node("Shape", ["h"], ["grid_state_shape"]),
             helper.make_node("Gather", ["grid_state_shape", "grid_one"], ["grid_streams"],
                              axis=0),
             helper.make_node("Concat", ["grid_minus_one", "grid_streams", "grid_features"],
                              ["grid_shape"], axis=0),
             helper.make_node("Reshape", [transpose.input[0], "grid_shape"], [LSTM_INPUT])]
    graph.node.remove(transpose)
    for offset, node in enumerate(nodes):
        graph.node.insert(at + offset, node)
    return _free_batch_and_save(model)


def speech_windows(streams: int, windows: int) -> np.ndarray:
    """(windows, streams, CONTEXT + WINDOW) model inputs: the fixture's words at 16 kHz, each
    stream starting at a different place, with each window's 64 samples of context."""
    words = read_wav(ROOT / "tests" / "fixtures" / "one_two_three.wav", 16000)
    audio = np.tile(words.astype(np.float32) / 32768.0, 2 + windows * WINDOW // words.size)
    out = np.zeros((windows, streams, CONTEXT + WINDOW), dtype=np.float32)
    for s in range(streams):
        start = CONTEXT + (s * 1237) % words.size
        for w in range(windows):
            at = start + w * WINDOW
            out[w, s] = audio[at - CONTEXT:at + WINDOW]
    return out


def check_exact(stock: object, batched: object, streams: int = 7, windows: int = 40) -> float:
    """Largest difference between the batched model (one window of each stream per run) and
    the stock model (0.0 when exact): the grid check with one window per run."""
    return check_grid_exact(stock, batched, streams, 1, windows)


def check_grid_exact(stock: object, grid: object, streams: int = 5, steps: int = 3,
                     windows: int = 30) -> float:
    """Largest difference between the grid model (`steps` windows of `streams` streams per
    run) and the stock model one window at a time (0.0 when exact)."""
    inputs = speech_windows(streams, windows)
    worst = 0.0
    h = [np.zeros((1, 1, 128), dtype=np.float32) for _ in range(streams)]
    c = [np.zeros((1, 1, 128), dtype=np.float32) for _ in range(streams)]
    hb = np.zeros((1, streams, 128), dtype=np.float32)
    cb = np.zeros((1, streams, 128), dtype=np.float32)
    for first in range(0, windows - steps + 1, steps):
        rows = inputs[first:first + steps].reshape(steps * streams, CONTEXT + WINDOW)
        probs, hb, cb = grid.run(None, {"input": rows, "h": hb, "c": cb})  # type: ignore[attr-defined]
        for s in range(streams):
            for t in range(steps):
                prob, h[s], c[s] = stock.run(None, {"input": inputs[first + t, s][None],  # type: ignore[attr-defined]
                                                    "h": h[s], "c": c[s]})
                worst = max(worst, abs(float(prob[0]) - float(probs[s * steps + t])))
            worst = max(worst, float(np.abs(h[s][0, 0] - hb[0, s]).max()),
                        float(np.abs(c[s][0, 0] - cb[0, s]).max()))
    return worst


def time_us_per_window(model: object, streams: int, steps: int, windows: int,
                       repeats: int) -> float:
    """Best-of-`repeats` µs per window for runs of `steps` consecutive windows of each of
    `streams` streams, about `windows` windows timed in all. Rows go time-major, as the grid
    model takes them: with one step that is the batched model's layout, with one stream a
    call's run of windows through the stock model (what `SileroVad.score_run` does)."""
    rows = speech_windows(streams, steps).reshape(steps * streams, CONTEXT + WINDOW).copy()
    state = np.zeros((1, streams, 128), dtype=np.float32)
    feed = {"input": rows, "h": state, "c": state}
    runs = max(1, windows // len(rows))
    for _ in range(10):
        model.run(None, feed)  # type: ignore[attr-defined]
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(runs):
            model.run(None, feed)  # type: ignore[attr-defined]
        best = min(best, (time.perf_counter() - start) / runs)
    return best / len(rows) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    parser.add_argument("--windows", type=int, default=2048, help="windows timed per size")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=str(ROOT / "bench" / "results" / "vad_batch.json"))
    args = parser.parse_args()

    # The sessions the server makes (one thread each, the same options), for both models.
    stock = SileroSession(fast=False, rate=16000).session
    batched = SileroSession(batched_model_bytes(), rate=16000).session
    worst = check_exact(stock, batched)
    print(f"batched against stock, 7 streams × 40 windows of speech: largest difference {worst}")
    if worst != 0.0:
        raise SystemExit("the batched model does not match the stock model")
    stock_us = time_us_per_window(stock, 1, 1, args.windows, args.repeats)
    print(f"stock model, one window per run: {stock_us:.1f} µs per window")
    print(f"{'streams per run':>15} {'µs per window':>14} {'vs stock':>9}")
    rows = []
    for size in args.sizes:
        us = time_us_per_window(batched, size, 1, args.windows, args.repeats)
        rows.append({"streams": size, "us_per_window": round(us, 1),
                     "vs_stock": round(us / stock_us, 3)})
        print(f"{size:>15} {us:>14.1f} {us / stock_us:>9.2f}")
    print(f"{'one call, windows per run':>25} {'µs per window':>14} {'vs stock':>9}")
    runs = []
    for size in (1, 2, 3, 4, 6):
        us = time_us_per_window(stock, 1, size, args.windows, args.repeats)
        runs.append({"windows": size, "us_per_window": round(us, 1),
                     "vs_stock": round(us / stock_us, 3)})
        print(f"{size:>25} {us:>14.1f} {us / stock_us:>9.2f}")
    grid = SileroSession(grid_model_bytes(), rate=16000).session
    grid_worst = check_grid_exact(stock, grid)
    print(f"grid (calls × windows per run) against stock: largest difference {grid_worst}")
    if grid_worst != 0.0:
        raise SystemExit("the grid model does not match the stock model")
    print(f"{'calls':>6} {'windows each':>13} {'µs per window':>14} {'vs stock':>9}")
    grid_rows = []
    for streams in (8, 32, 64):
        for steps in (1, 3, 4):
            us = time_us_per_window(grid, streams, steps, args.windows, args.repeats)
            grid_rows.append({"streams": streams, "windows": steps,
                              "us_per_window": round(us, 1), "vs_stock": round(us / stock_us, 3)})
            print(f"{streams:>6} {steps:>13} {us:>14.1f} {us / stock_us:>9.2f}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({
        "when": time.strftime("%Y-%m-%dT%H:%M:%S"), "machine": platform.node(),
        "largest_difference": worst, "stock_us_per_window": round(stock_us, 1),
        "batched": rows, "one_call_run_of_windows": runs,
        "grid_largest_difference": grid_worst, "grid": grid_rows}, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
