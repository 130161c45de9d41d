"""FP32 latency table: compiled MobileViT vs our plain graph vs the transformers peer.

Contenders, interleaved round by round in one process (ORT CPU, ORT_ENABLE_ALL, batch 1,
256², 2 threads), same random weights for all:

- compiled fp32: our graph through the ``fp32`` pipeline (ORT-tuned, no Transpose);
- compiled mobile: the ``mobile`` pipeline (standard ONNX, transpose-free), timed on ORT;
- plain: our unoptimised graph;
- peer: transformers' MobileViTForImageClassification → torch.onnx.export → onnxsim;
- compiled fp32 (again): a second session of the first graph, an A/A check: its ratio to the
  first row is how far position in the interleaving moves a median.

Under two thread-spinning conditions, each a set of sessions of its own:

- ``off``: workers sleep whenever they run out of work, so each parallel node wakes them;
- ``in-run``: ORT's default spinning inside a run, stopped when the run returns
  (``session.force_spinning_stop``), so that no session's spinning workers compete with the
  next session's run. This is the latency an application that calls Run once per frame sees.

    python benchmarks/bench_fp32.py [--sizes xxs s] [--rounds 15] [--spinning off in-run]
"""

from __future__ import annotations

import argparse

import numpy as np
import onnx

from mvcompile import latency, onnx_io
from mvcompile.builder import compile_graph
from mvcompile.graphs.mobilevit import MobileViTConfig, build_graph
from mvcompile.graphs.random_weights import RandomWeights
from mvcompile.optimize import max_abs_diff
from mvcompile.reference import export_peer


def contenders(size: str, resolution: int) -> dict[str, onnx.ModelProto]:
    cfg = MobileViTConfig.for_size(size, resolution=resolution)
    source = RandomWeights(0)
    plain = build_graph(cfg, source)
    models = {name: onnx_io.to_proto(compile_graph(plain, pipeline)[0]) for name, pipeline in (
        ("compiled fp32", "fp32"), ("fp32, 1 Transpose/direction", "fp32-transpose"),
        ("compiled mobile", "mobile"))}
    models["plain (ours)"] = onnx_io.to_proto(plain)
    models["peer (HF export)"] = export_peer(cfg, source.tensors)
    return models


SPINNING = {"off": {"spinning": False},
            "in-run": {"spinning": True, "stop_spinning_after_run": True}}
AGAIN = " (again)"


def time_condition(blobs: dict[str, bytes], spinning: str, threads: int,
                   feed: dict[str, np.ndarray], runs: int) -> dict[str, float]:
    """Median ms of each serialized model plus an A/A second session of the first,
    interleaved."""
    first = next(iter(blobs))
    sessions = {k: latency.make_session(b, threads=threads, **SPINNING[spinning])
                for k, b in {**blobs, first + AGAIN: blobs[first]}.items()}
    stats = latency.measure_interleaved(sessions, feed, runs=runs)
    return {k: s.median_ms for k, s in stats.items()}


def describe(models: dict[str, onnx.ModelProto]) -> dict[str, tuple[int, int, float]]:
    """Each model's node count, Transpose count and max |Δ| to the plain graph."""
    rows = {}
    for name, proto in models.items():
        ops = [n.op_type for n in proto.graph.node]
        rows[name] = (len(ops), ops.count("Transpose"),
                      max_abs_diff(models["plain (ours)"], proto))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", nargs="+", default=["xxs", "s"])
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--spinning", nargs="+", choices=sorted(SPINNING),
                        default=["off", "in-run"])
    args = parser.parse_args()
    print(f"ORT CPU, ORT_ENABLE_ALL, batch 1, {args.resolution}², {args.threads} threads; "
          f"medians of {10 * args.rounds} runs each, interleaved in blocks")
    print("| size | spinning | model | nodes | Transpose | median ms | × peer | × plain "
          "| max |Δ| vs plain |")
    print("|---|---|---|---|---|---|---|---|---|")
    feed = {"pixel_values": np.random.default_rng(0).uniform(
        0, 1, (1, 3, args.resolution, args.resolution)).astype(np.float32)}
    for size in args.sizes:
        models = contenders(size, args.resolution)
        rows = describe(models)
        blobs = {name: proto.SerializeToString() for name, proto in models.items()}
        for spinning in args.spinning:
            med = time_condition(blobs, spinning, args.threads, feed, 10 * args.rounds)
            for name, ms in med.items():
                nodes, transposes, diff = rows[name.removesuffix(AGAIN)]
                print(f"| {size} | {spinning} | {name} | {nodes} | {transposes} | {ms:.2f} | "
                      f"{ms / med['peer (HF export)']:.2f} | {ms / med['plain (ours)']:.2f} | "
                      f"{diff:.1e} |", flush=True)


if __name__ == "__main__":
    main()
