"""bench/vad_batch.py: the Silero graph edited to score one window for each of many streams
in one run gives, stream by stream, exactly what the stock model gives."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from bench.vad_batch import (
    batched_model_bytes,
    check_exact,
    check_grid_exact,
    grid_model_bytes,
    speech_windows,
)
from media.vad import SileroSession


@pytest.fixture(scope="module")
def stock() -> object:
    return SileroSession(fast=False, rate=16000).session


def test_the_batched_model_matches_the_stock_model_stream_by_stream(stock: object) -> None:
    batched = SileroSession(batched_model_bytes(), rate=16000).session
    assert check_exact(stock, batched, streams=5, windows=30) == 0.0


def test_the_grid_model_matches_the_stock_model_window_by_window(stock: object) -> None:
    """Many calls × many windows in one run: window t of stream b, every state after each
    run, bit for bit what the stock model gives one window at a time."""
    grid = SileroSession(grid_model_bytes(), rate=16000).session
    assert check_grid_exact(stock, grid, streams=4, steps=3, windows=24) == 0.0
    assert check_grid_exact(stock, grid, streams=1, steps=4, windows=12) == 0.0


def test_the_stock_model_runs_its_rows_as_one_sequence(stock: object) -> None:
    """Why the edit is needed (and that the check can fail): fed the same windows as rows,
    the stock model carries its state from row to row, so streams are not independent."""
    rows = speech_windows(5, 3)[2]  # a third window of 5 streams, as one input
    zero = np.zeros((1, 1, 128), dtype=np.float32)
    together = stock.run(None, {"input": rows, "h": zero, "c": zero})[0]  # type: ignore[attr-defined]
    alone = [float(stock.run(None, {"input": row[None], "h": zero, "c": zero})[0][0])  # type: ignore[attr-defined]
             for row in rows]
    assert float(together[0]) == alone[0]  # the first row starts from the same state
    assert max(abs(float(a) - b) for a, b in zip(together[1:], alone[1:], strict=True)) > 1e-4


def test_an_unknown_graph_is_refused(tmp_path: Path) -> None:

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    path = tmp_path / "other.onnx"
    onnx.save(helper.make_model(graph), str(path))
    with pytest.raises(ValueError, match="not the Silero v6 graph"):
        batched_model_bytes(path)
    with pytest.raises(ValueError, match="not the Silero v6 graph"):
        grid_model_bytes(path)
