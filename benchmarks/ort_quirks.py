"""The ONNX Runtime 1.31 behaviours that decided mvcompile's defaults, measured here.

1. Activation kernels: six Conv → activation layers on 32×128×128, with the activation written
   as Sigmoid·Mul, com.microsoft.QuickGelu and opset-24 Swish (interleaved medians).
2. u8·s8 saturation: the trained digits model (benchmarks/train_digits.py) with only its stem
   convolution quantized, 8-bit vs 7-bit weights, run unfused (ORT_DISABLE_ALL: the QDQ maths
   in float) and fused (ORT_ENABLE_ALL: QLinearConv). Output SQNR against FP32.
3. Per-column MatMul weights: y = x·W quantized with per-column vs per-tensor weight scales,
   fused vs unfused, max abs error at batch 1 and 4.

    python benchmarks/ort_quirks.py [--weights runs/digits_xxs/best.safetensors]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from mvcompile import latency, metrics, onnx_io
from mvcompile.calibration.collect import collect_ranges
from mvcompile.calibration.data import digits
from mvcompile.calibration.qdq import QuantPlan, insert_qdq, plan_tensors
from mvcompile.graphs.factory import create_mobilevit
from mvcompile.graphs.mobilevit import MobileViTConfig
from mvcompile.int8_build import int8_source

FUSED = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
UNFUSED = ort.GraphOptimizationLevel.ORT_DISABLE_ALL


def activation_table(rounds: int) -> None:
    """Each activation, plus a second identical QuickGelu model: with spinning on, identical
    graphs time differently depending on their neighbours; with it off they agree."""
    rng = np.random.default_rng(0)
    names = ("Sigmoid·Mul", "QuickGelu", "Swish", "QuickGelu (again)")
    models = {name: _conv_act_model(name.split(" ")[0], rng) for name in names}
    feed = {"x": rng.uniform(-1, 1, (1, 32, 128, 128)).astype(np.float32)}
    medians = {}
    for spinning in (True, False):
        sessions = {k: latency.make_session(m.SerializeToString(), spinning=spinning)
                    for k, m in models.items()}
        medians[spinning] = latency.measure_interleaved(sessions, feed, runs=10 * rounds)
    print("\n1. Six Conv(32→32, 1x1) → activation layers at 128², batch 1, 2 threads, "
          "interleaved")
    print("| activation | median ms, ORT thread spinning on | spinning off |")
    print("|---|---|---|")
    for name in names:
        print(f"| {name} | {medians[True][name].median_ms:.2f} | "
              f"{medians[False][name].median_ms:.2f} |")


def _conv_act_model(activation: str, rng: np.random.Generator) -> onnx.ModelProto:
    nodes, inits, x = [], [], "x"
    for i in range(6):
        inits.append(numpy_helper.from_array(
            rng.normal(0, 0.25, (32, 32, 1, 1)).astype(np.float32), f"w{i}"))
        nodes.append(helper.make_node("Conv", [x, f"w{i}"], [f"c{i}"]))
        if activation == "Sigmoid·Mul":
            nodes += [helper.make_node("Sigmoid", [f"c{i}"], [f"s{i}"]),
                      helper.make_node("Mul", [f"c{i}", f"s{i}"], [f"a{i}"])]
        elif activation == "QuickGelu":
            nodes.append(helper.make_node("QuickGelu", [f"c{i}"], [f"a{i}"], alpha=1.0,
                                          domain="com.microsoft"))
        else:
            nodes.append(helper.make_node("Swish", [f"c{i}"], [f"a{i}"]))
        x = f"a{i}"
    value = helper.make_tensor_value_info
    inputs = [value("x", onnx.TensorProto.FLOAT, [1, 32, 128, 128])]
    graph = helper.make_graph(nodes, "acts", inputs, [value(x, onnx.TensorProto.FLOAT, None)],
                              inits)
    opsets = [helper.make_opsetid("", 24), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=10)


def saturation_table(weights: str) -> None:
    cfg = MobileViTConfig.for_size("xxs", resolution=64, num_classes=10)
    source = int8_source(create_mobilevit(cfg, weights)[0], True)[0]
    calib, val = digits(64, "train", 64), digits(64, "val")
    reference = _logits(onnx_io.to_proto(source), val, FUSED)
    print(f"\n2. Only the stem conv quantized; output SQNR vs FP32 on {len(val.pixels)} digits "
          "validation images")
    print("| weight bits | unfused (QDQ maths) dB | fused QLinearConv dB |")
    print("|---|---|---|")
    for qmax, bits in ((127, 8), (63, 7)):
        model = source.clone()
        stem = next(n for n in model.graph if n.op_type == "Conv")
        plan = QuantPlan(frozenset({"Conv"}), weight_qmax=qmax,
                         keep_float={n.name for n in model.graph
                                     if n.op_type == "Conv" and n is not stem})
        names = [v.name for v in plan_tensors(model.graph, plan)]
        insert_qdq(model, collect_ranges(model, names, calib.batches(), "percentile"), plan)
        proto = onnx_io.to_proto(model)
        unfused, fused = (metrics.sqnr_db(reference, _logits(proto, val, level))
                          for level in (UNFUSED, FUSED))
        print(f"| {bits} | {unfused:.1f} | {fused:.1f} |")


def _logits(proto: onnx.ModelProto, images, level) -> np.ndarray:
    session = latency.make_session(proto.SerializeToString(), level=level)
    return np.concatenate([session.run(None, {"pixel_values": b})[0] for b in images.batches()])


def per_column_table() -> None:
    rng = np.random.default_rng(2)
    w = rng.normal(0, 0.5, (6, 6)).astype(np.float32)
    x = rng.normal(0, 1, (4, 4, 6)).astype(np.float32)
    print("\n3. y = x·W, x [B,4,6] uint8, W int8; max abs error vs float")
    print("| weight scales | batch | unfused | fused |")
    print("|---|---|---|---|")
    for per_column in (True, False):
        proto = _qdq_matmul(w, x, per_column)
        for batch in (1, 4):
            errors = [np.abs(_run(proto, x[:batch], level) - x[:batch] @ w).max()
                      for level in (UNFUSED, FUSED)]
            print(f"| {'per column' if per_column else 'per tensor'} | {batch} | "
                  f"{errors[0]:.3f} | {errors[1]:.3f} |")


def _qdq_matmul(w: np.ndarray, x: np.ndarray, per_column: bool) -> onnx.ModelProto:
    bound = np.abs(w).max(axis=0) if per_column else np.abs(w).max()
    w_scale = (bound / 127).astype(np.float32)
    w_q = np.clip(np.round(w / w_scale), -127, 127).astype(np.int8)
    x_scale, y_scale = np.float32(np.abs(x).max() / 127), np.float32(np.abs(x @ w).max() / 127)
    inits = [numpy_helper.from_array(a, n) for a, n in (
        (w_q, "wq"), (w_scale, "ws"), (np.zeros_like(w_scale, np.int8), "wz"),
        (x_scale, "xs"), (np.uint8(128), "xz"), (y_scale, "ys"), (np.uint8(128), "yz"))]
    axis = {"axis": 1} if per_column else {}
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
             helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wd"], **axis),
             helper.make_node("MatMul", ["xd", "wd"], ["m"]),
             helper.make_node("QuantizeLinear", ["m", "ys", "yz"], ["mq"]),
             helper.make_node("DequantizeLinear", ["mq", "ys", "yz"], ["y"])]
    value = helper.make_tensor_value_info
    graph = helper.make_graph(nodes, "mm", [value("x", onnx.TensorProto.FLOAT, ["B", 4, 6])],
                              [value("y", onnx.TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


def _run(proto: onnx.ModelProto, x: np.ndarray, level) -> np.ndarray:
    session = latency.make_session(proto.SerializeToString(), level=level)
    return session.run(None, {"x": x})[0]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--weights", default="runs/digits_xxs/best.safetensors")
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    ort.set_default_logger_severity(3)  # the unused-initializer warnings would split the tables
    activation_table(args.rounds)
    if Path(args.weights).exists():
        saturation_table(args.weights)
    else:
        print(f"\n{args.weights} not found: train it with benchmarks/train_digits.py")
    per_column_table()


if __name__ == "__main__":
    main()
