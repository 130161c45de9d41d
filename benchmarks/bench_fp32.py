"""FP32 latency table: compiled MobileViT vs our plain graph vs the transformers peer.

Contenders, interleaved round by round in one process (ORT CPU, ORT_ENABLE_ALL, batch 1,
256², 2 threads), same random weights for all:

- compiled fp32: our graph through the ``fp32`` pipeline (ORT-tuned, no Transpose);
- compiled mobile: the ``mobile`` pipeline (standard ONNX, transpose-free), timed on ORT;
- plain: our unoptimised graph;
- peer: transformers' MobileViTForImageClassification → torch.onnx.export → onnxsim.

    python benchmarks/bench_fp32.py [--sizes xxs s] [--rounds 15]
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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", nargs="+", default=["xxs", "s"])
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    print(f"ORT CPU, ORT_ENABLE_ALL, batch 1, {args.resolution}², {args.threads} threads; "
          f"medians of {10 * args.rounds} runs each, interleaved in blocks")
    print("| size | model | nodes | Transpose | median ms | × peer | × plain | max |Δ| vs plain |")
    print("|---|---|---|---|---|---|---|---|")
    for size in args.sizes:
        models = contenders(size, args.resolution)
        sessions = {k: latency.make_session(p.SerializeToString(), threads=args.threads)
                    for k, p in models.items()}
        feed = {"pixel_values": np.random.default_rng(0).uniform(
            0, 1, (1, 3, args.resolution, args.resolution)).astype(np.float32)}
        stats = latency.measure_interleaved(sessions, feed, runs=10 * args.rounds)
        med = {k: s.median_ms for k, s in stats.items()}
        for name, proto in models.items():
            ops = [n.op_type for n in proto.graph.node]
            diff = max_abs_diff(models["plain (ours)"], proto)
            print(f"| {size} | {name} | {len(ops)} | {ops.count('Transpose')} | "
                  f"{med[name]:.2f} | {med[name] / med['peer (HF export)']:.2f} | "
                  f"{med[name] / med['plain (ours)']:.2f} | {diff:.1e} |")


if __name__ == "__main__":
    main()
