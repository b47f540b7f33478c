"""Silero VAD per window: the stock graph against the rewritten ones (media/silero_graph.py).

At 16 kHz, faster-whisper's stock v6 graph ("stock") against its rewrite ("fast"); and the
rewrite of the 8 kHz branch of Silero's official v6.2 model ("fast 8k", `VAD_RATE=8000`,
256-sample windows of the same audio at 8 kHz). Those three are timed as one ONNX Runtime
`run` each. Then the 8 kHz model as a call's VAD runs it (`SileroVad._run`: the rows laid out
and the stream's bound arrays run), in ONNX Runtime ("8k onnx", `VAD_KERNEL=onnx`) and by the
compiled forward pass ("8k native", `VAD_KERNEL=native`, the default; media/_silero.c).

Times one model run of 1, 3 and 4 consecutive windows (the listener scores a call's windows
three or four at a time, `SileroVad.score_run`), best of `--repeats` rounds of `--runs` runs,
from the settled silence state, on windows of real speech (the fixture "one two three"). Both
models run in this process, alternated round by round (the machine's speed drifts). Prints a
table and writes bench/results/vad_model.json.

    .venv/bin/python bench/vad_model.py
    .venv/bin/python bench/vad_model.py --sizes 1 3 --repeats 9
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from media.audiofile import read_wav  # noqa: E402
from media.resample import resample  # noqa: E402
from media.vad import SileroSession, SileroVad  # noqa: E402

FIXTURE = ROOT / "tests" / "fixtures" / "one_two_three.wav"


def _rows(count: int, session: SileroSession) -> np.ndarray:
    """`count` consecutive voiced windows with their context, as the model takes them."""
    audio = resample(read_wav(str(FIXTURE), 8000).astype(np.float32) / 32768, 8000,
                     session.rate)
    window, context = session.window, session.context
    start = 20 * window  # inside "one"
    rows = [audio[start + i * window - context : start + (i + 1) * window]
            for i in range(count)]
    return np.stack(rows).astype(np.float32)


def _time(session: SileroSession, rows: np.ndarray, runs: int,
          vad: SileroVad | None = None) -> float:
    """µs per window over `runs` runs of `rows`: one ONNX Runtime run each, or with `vad`, that
    call VAD's run of the windows."""
    if vad is not None:
        windows = np.ascontiguousarray(rows[:, session.context:])
        run_vad = vad._run
        start = time.perf_counter()
        for _ in range(runs):
            run_vad(windows)
        return (time.perf_counter() - start) / runs / len(rows) * 1e6
    h, c = session.silence_state
    feeds = {"input": rows, "h": h, "c": c}
    run = session.session.run
    start = time.perf_counter()
    for _ in range(runs):
        run(None, feeds)
    return (time.perf_counter() - start) / runs / len(rows) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 3, 4])
    parser.add_argument("--runs", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=str(ROOT / "bench" / "results" / "vad_model.json"))
    args = parser.parse_args()

    models = {"stock": SileroSession(fast=False, rate=16000),
              "fast": SileroSession(rate=16000), "fast 8k": SileroSession(rate=8000, native=False),
              "8k onnx": SileroSession(rate=8000, native=False),
              "8k native": SileroSession(rate=8000)}
    assert models["fast"].kind == "fast", "the rewritten model did not load (see the log)"
    assert models["fast 8k"].rate == 8000, "the 8 kHz model did not load (see the log)"
    assert models["8k native"].kind == "native", "the compiled pass did not load (see the log)"
    vads = {name: SileroVad(models[name], gate_dbfs=-200.0) for name in ("8k onnx", "8k native")}
    results = []
    print(f"{'windows per run':>15} {'stock µs/window':>16} {'fast µs/window':>15} {'ratio':>6}"
          f" {'fast 8k µs/window':>18} {'8k/fast':>8} {'8k onnx (vad)':>14}"
          f" {'8k native (vad)':>16} {'native/onnx':>12}")
    for size in args.sizes:
        rows = {name: _rows(size, session) for name, session in models.items()}
        times: dict[str, list[float]] = {name: [] for name in models}
        for name, session in models.items():  # warm up
            _time(session, rows[name], 200, vads.get(name))
        for _ in range(args.repeats):
            for name, session in models.items():
                times[name].append(_time(session, rows[name], args.runs, vads.get(name)))
        best = {name: min(values) for name, values in times.items()}
        median = {name: statistics.median(values) for name, values in times.items()}
        ratio = best["fast"] / best["stock"]
        print(f"{size:>15} {best['stock']:>16.1f} {best['fast']:>15.1f} {ratio:>6.2f}"
              f" {best['fast 8k']:>18.1f} {best['fast 8k'] / best['fast']:>8.2f}"
              f" {best['8k onnx']:>14.1f} {best['8k native']:>16.1f}"
              f" {best['8k native'] / best['8k onnx']:>12.2f}")
        results.append({"windows_per_run": size, "best_us_per_window": best,
                        "median_us_per_window": median, "runs": times})
    out = {"machine": platform.processor() or platform.machine(),
           "cpu": cpu_model(), "date": time.strftime("%Y-%m-%d"), "results": results}
    Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.json}")


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), or the architecture where there is none."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


if __name__ == "__main__":
    main()
