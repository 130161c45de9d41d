"""Per-op-type ONNX Runtime time of a built model, from ORT's own profiler.

    python benchmarks/profile_ops.py out/mobilevit_xxs/model.onnx out/mobilevit_xxs/model_int8.onnx

Prints, for each model, the summed kernel time per op type per inference (batch 1, 2 threads,
ORT_ENABLE_ALL, after fusions: QLinearConv, QGemm, ... appear as ORT runs them). Profiling adds
overhead, so compare shares within a model rather than with the latency tables.

    python benchmarks/profile_ops.py MODEL.onnx --vs-threads 1

adds, per op type, the kernel time with that many threads and the speed-up that
``--threads`` gives over it (< 1: the op runs slower with more threads, where handing work
to the other threads costs more than it saves).
"""

from __future__ import annotations

import argparse
import collections
import json
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort


def profile(model: str | bytes, runs: int, threads: int) -> collections.Counter:
    """Kernel ms per op type per inference of ``model`` (a path or serialized bytes), averaged
    over ``runs`` runs after one untimed warm-up run."""
    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "profile")
        session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        inp = session.get_inputs()[0]
        shape = [d if isinstance(d, int) else 1 for d in inp.shape]
        feed = {inp.name: np.random.default_rng(0).uniform(0, 1, shape).astype(np.float32)}
        for _ in range(runs + 1):  # the first (cold) run is left out below
            session.run(None, feed)
        events = json.loads(Path(session.end_profiling()).read_text())
    first = min((e for e in events if e.get("name") == "model_run"), key=lambda e: e["ts"])
    warm_from = first["ts"] + first["dur"]
    per_op: collections.Counter = collections.Counter()
    for event in events:
        if (event.get("cat") == "Node" and event["name"].endswith("_kernel_time")
                and event["ts"] >= warm_from):
            per_op[event["args"]["op_name"]] += event["dur"] / runs / 1000.0
    return per_op


def _table(per_op: collections.Counter, top: int) -> None:
    total = sum(per_op.values())
    print("| op | ms | share |")
    print("|---|---|---|")
    for op, ms in per_op.most_common(top):
        print(f"| {op} | {ms:.2f} | {100 * ms / total:.0f}% |")


def _scaling_table(per_op: collections.Counter, baseline: collections.Counter,
                   threads: int, baseline_threads: int, top: int) -> None:
    print(f"| op | ms, {baseline_threads} thread(s) | ms, {threads} threads | speed-up |")
    print("|---|---|---|---|")
    for op, ms in per_op.most_common(top):
        print(f"| {op} | {baseline[op]:.2f} | {ms:.2f} | {baseline[op] / ms:.2f} |")
    print(f"| all | {sum(baseline.values()):.2f} | {sum(per_op.values()):.2f} | "
          f"{sum(baseline.values()) / sum(per_op.values()):.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("models", nargs="+")
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--vs-threads", type=int, default=None,
                        help="also profile with this many threads and print the speed-up")
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args()
    for path in args.models:
        per_op = profile(path, args.runs, args.threads)
        print(f"\n{path}: {sum(per_op.values()):.2f} ms of kernel time per inference, "
              f"{args.threads} threads")
        if args.vs_threads is None:
            _table(per_op, args.top)
        else:
            baseline = profile(path, args.runs, args.vs_threads)
            _scaling_table(per_op, baseline, args.threads, args.vs_threads, args.top)


if __name__ == "__main__":
    main()
