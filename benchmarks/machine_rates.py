"""What this machine can do: its vector ISA, its FP32 and INT8 kernel rates in ONNX Runtime,
and the latency ceilings these rates put on MobileViT.

1. The CPU's model name and the vector extensions that decide ORT's kernels (AVX2, AVX-512,
   VNNI), read from /proc/cpuinfo.
2. Kernel rates, the ORT ones interleaved in one process (2 threads, batch 1), in GMAC/s:
   - one 512×512×512 matrix product in numpy FP32, ORT MatMul FP32 and ORT MatMulInteger
     with uint8·int8, uint8·uint8 and int8·int8 operands;
   - MobileViT-XXS's largest convolution (3×3, 96→48 channels, 32²) as FP32 Conv and as
     QLinearConv with uint8 and with int8 activations (int8 weights).
3. Ceilings for the compiled XXS at 256²: its MACs, measured latency and GMAC/s; the physical
   floor MACs / SGEMM rate; and the Amdahl bound on INT8 / FP32 latency of the graph that the
   INT8 build quantizes (the ``int8`` pipeline's FP32 graph),

       bound = (t_rest + t_gemm / r) / (t_rest + t_gemm),

   where t_gemm is ORT's profiled kernel time in Conv/MatMul/Gemm (the matrix ops the INT8
   build quantizes; its FusedMatMuls stay float, so they count in t_rest), t_rest the time in
   every other kernel, and r the measured uint8·int8 over FP32 GEMM rate ratio. The bound
   assumes free quantize/dequantize steps and integer elementwise ops no slower than float.

    python benchmarks/machine_rates.py [--rounds 20]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from profile_ops import profile

from mvcompile import analysis, latency, machine, onnx_io
from mvcompile.builder import compile_graph
from mvcompile.graphs.mobilevit import MobileViTConfig, build_graph
from mvcompile.graphs.random_weights import RandomWeights

GEMM_SIZE = 512
CONV = {"cin": 96, "cout": 48, "hw": 32, "k": 3}
# The matrix ops the INT8 build makes integer; FusedMatMul (a transposed operand) stays float.
GEMM_OPS = {"Conv", "MatMul", "Gemm"}


def _model(nodes: list, inputs: list, inits: list, output_type: int,
           output_shape: list[int]) -> bytes:
    output = helper.make_tensor_value_info("y", output_type, output_shape)
    graph = helper.make_graph(nodes, "g", inputs, [output], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    onnx.checker.check_model(model, full_check=True)
    return model.SerializeToString()


def gemm_models(rng: np.random.Generator) -> dict[str, tuple[bytes, np.ndarray]]:
    """FP32 MatMul and MatMulInteger with each operand type pair, [n,n]·[n,n]."""
    n = GEMM_SIZE
    x_info = helper.make_tensor_value_info
    models = {"MatMul fp32": (_model(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        [x_info("x", TensorProto.FLOAT, [n, n])],
        [numpy_helper.from_array(rng.normal(size=(n, n)).astype(np.float32), "w")],
        TensorProto.FLOAT, [n, n]), rng.normal(size=(n, n)).astype(np.float32))}
    for a_type, w_type in ((np.uint8, np.int8), (np.uint8, np.uint8), (np.int8, np.int8)):
        info = np.iinfo(a_type)
        low = -60 if w_type is np.int8 else 0
        weight = rng.integers(low, low + 120, (n, n)).astype(w_type)
        name = f"MatMulInteger {a_type.__name__}·{w_type.__name__}"
        models[name] = (_model(
            [helper.make_node("MatMulInteger", ["x", "w", "x_zero"], ["y"])],
            [x_info("x", helper.np_dtype_to_tensor_dtype(np.dtype(a_type)), [n, n])],
            [numpy_helper.from_array(weight, "w"),
             numpy_helper.from_array(np.array(3, a_type), "x_zero")],
            TensorProto.INT32, [n, n]), rng.integers(info.min, info.max, (n, n)).astype(a_type))
    return models


def conv_models(rng: np.random.Generator) -> dict[str, tuple[bytes, np.ndarray]]:
    """FP32 Conv and QLinearConv (uint8 or int8 activations, int8 per-channel weights)."""
    cin, cout, hw, k = CONV["cin"], CONV["cout"], CONV["hw"], CONV["k"]
    weight = rng.normal(0, 0.1, (cout, cin, k, k)).astype(np.float32)
    x = rng.uniform(0, 1, (1, cin, hw, hw)).astype(np.float32)
    y_shape = [1, cout, hw, hw]
    models = {"Conv fp32": (_model(
        [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1] * 4)],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [numpy_helper.from_array(weight, "w")], TensorProto.FLOAT, y_shape), x)}
    w_scale = np.abs(weight).reshape(cout, -1).max(1) / 127
    w_q = np.round(weight / w_scale[:, None, None, None]).astype(np.int8)
    for dtype, zero in ((np.uint8, 0), (np.int8, -128)):
        elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
        inits = [numpy_helper.from_array(a, n) for a, n in (
            (np.array(1 / 255, np.float32), "x_scale"), (np.array(zero, dtype), "x_zero"),
            (w_q, "w"), (w_scale.astype(np.float32), "w_scale"),
            (np.zeros(cout, np.int8), "w_zero"), (np.array(0.05, np.float32), "y_scale"),
            (np.array(zero, dtype), "y_zero"))]
        node = helper.make_node("QLinearConv", ["x", "x_scale", "x_zero", "w", "w_scale",
                                                "w_zero", "y_scale", "y_zero"], ["y"], pads=[1] * 4)
        x_q = (np.round(x * 255) + zero).astype(dtype)
        models[f"QLinearConv {dtype.__name__} activations"] = (_model(
            [node], [helper.make_tensor_value_info("x", elem, list(x.shape))], inits, elem,
            y_shape), x_q)
    return models


def rates_table(rounds: int) -> tuple[float, float]:
    """Prints kernel rates; returns the uint8·int8 / FP32 GEMM rate ratio and the FP32 GEMM
    rate in GMAC/s."""
    rng = np.random.default_rng(0)
    macs = {"gemm": GEMM_SIZE ** 3,
            "conv": CONV["cin"] * CONV["cout"] * CONV["k"] ** 2 * CONV["hw"] ** 2}
    medians = {"numpy matmul fp32": _numpy_median(rng, 10 * rounds)}
    for models in (gemm_models(rng), conv_models(rng)):
        sessions = {k: latency.make_session(blob) for k, (blob, _) in models.items()}
        feeds = {k: {"x": x} for k, (_, x) in models.items()}
        stats = latency.measure_interleaved(sessions, {}, runs=10 * rounds, feeds=feeds)
        medians.update({k: s.median_ms for k, s in stats.items()})
    print(f"\n2. Kernel rates: {GEMM_SIZE}³ matrix product and the 3×3 {CONV['cin']}→"
          f"{CONV['cout']} conv at {CONV['hw']}², 2 threads, medians of {10 * rounds} runs")
    print("| kernel | median ms | GMAC/s |")
    print("|---|---|---|")
    rate = {}
    for name, ms in medians.items():
        work = macs["conv"] if name.startswith(("Conv", "QLinearConv")) else macs["gemm"]
        rate[name] = work / ms / 1e6
        print(f"| {name} | {ms:.3f} | {rate[name]:.1f} |")
    return rate["MatMulInteger uint8·int8"] / rate["MatMul fp32"], rate["MatMul fp32"]


def _numpy_median(rng: np.random.Generator, runs: int) -> float:
    """numpy's FP32 matrix product, timed alone: OpenBLAS's threads busy-wait after each call
    and would take the cores from an ORT session interleaved with it."""
    a = rng.normal(size=(GEMM_SIZE, GEMM_SIZE)).astype(np.float32)
    b = rng.normal(size=(GEMM_SIZE, GEMM_SIZE)).astype(np.float32)
    samples = []
    for _ in range(runs + 5):
        start = time.perf_counter()
        a @ b
        samples.append(time.perf_counter() - start)
    return float(np.median(samples[5:])) * 1000


def ceilings_table(int8_ratio: float, sgemm_gmacs: float, rounds: int) -> None:
    """Row 3: the compiled FP32 XXS against the rates, and the Amdahl bound computed on the
    FP32 graph that the INT8 build quantizes (the ``int8`` pipeline: attention as MatMul and
    Softmax nodes, so ORT's fused Attention, whose kernel includes the softmax, is not mixed
    into the matrix time)."""
    cfg = MobileViTConfig.for_size("xxs", resolution=256)
    plain = build_graph(cfg, RandomWeights(0))
    proto = onnx_io.to_proto(compile_graph(plain, "fp32")[0])
    to_quantize = onnx_io.to_proto(compile_graph(plain, "int8")[0])  # compiles a copy
    macs, _ = analysis.count_macs(proto)
    session = latency.make_session(proto.SerializeToString())
    median = latency.measure(session, latency.random_feed(session), runs=10 * rounds).median_ms
    per_op = profile(to_quantize.SerializeToString(), runs=30, threads=2)
    t_gemm = sum(ms for op, ms in per_op.items() if op in GEMM_OPS)
    t_rest = sum(per_op.values()) - t_gemm
    bound = (t_rest + t_gemm / int8_ratio) / (t_rest + t_gemm)
    print("\n3. Compiled XXS FP32 at 256² against this machine's rates")
    print("| quantity | value |")
    print("|---|---|")
    print(f"| MACs | {macs / 1e6:.0f} M |")
    print(f"| median latency | {median:.2f} ms ({macs / median / 1e6:.1f} GMAC/s) |")
    print(f"| floor: MACs / ORT SGEMM rate | {macs / sgemm_gmacs / 1e6:.2f} ms |")
    print(f"| graph to quantize: profiled kernel time in Conv/MatMul/Gemm | {t_gemm:.2f} ms "
          f"({100 * t_gemm / (t_gemm + t_rest):.0f}%) |")
    print(f"| uint8·int8 / FP32 GEMM rate | {int8_ratio:.2f}× |")
    print(f"| Amdahl bound on INT8 / FP32 latency | {bound:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=20, help="10 × this many timed runs each")
    args = parser.parse_args()
    cpu = machine.cpu_summary()
    print(f"1. CPU: {cpu['name']}; "
          + ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in cpu["isa"].items()))
    ratio, sgemm = rates_table(args.rounds)
    ceilings_table(ratio, sgemm, args.rounds)


if __name__ == "__main__":
    main()
