"""INT8 tables: latency (ours vs ORT quantize_static on the peer export) and accuracy.

Latency — XXS at 256², batch 1, 2 threads, ORT CPU ORT_ENABLE_ALL, one process, interleaved:
  ours INT8 (mvcompile build --int8, with the weight range --weight-bits auto picks on this
  machine), ours FP32 (compiled), the peer FP32 (transformers →
  torch.onnx.export → onnxsim) and the peer INT8 (onnxruntime.quantization.quant_pre_process,
  then quantize_static: QDQ, per-channel, MinMax, uint8 activations / int8 weights) on that
  export.

Accuracy — a trained model (default runs/digits_xxs/best.safetensors from
benchmarks/train_digits.py; XXS, 64², 10 classes): FP32 and INT8 top-1 on the digits
validation split, and top-1 agreement with FP32, for ours and for quantize_static with MinMax
and with Percentile, each with full 8-bit weights (ORT's default) and with reduce_range (7-bit
weights, which ORT's documentation advises on CPUs without VNNI), all calibrated on the same
images.

    python benchmarks/bench_int8.py [--weights PATH] [--rounds 15] [--skip-latency]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import onnx
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

from mvcompile import latency, machine, metrics, onnx_io
from mvcompile.builder import compile_graph
from mvcompile.calibration.data import ImageSet, bundled_photos, digits
from mvcompile.calibration.observers import OBSERVERS
from mvcompile.calibration.quantize import QuantizeOptions, quantize
from mvcompile.calibration.registry import DEFAULT_OP_TYPES
from mvcompile.evaluate import predict
from mvcompile.graphs.checkpoints import load_state_dict
from mvcompile.graphs.factory import create_mobilevit
from mvcompile.graphs.mobilevit import MobileViTConfig, build_graph
from mvcompile.graphs.random_weights import RandomWeights
from mvcompile.int8_build import int8_source
from mvcompile.reference import export_peer


class _Reader(CalibrationDataReader):
    def __init__(self, images: ImageSet, name: str) -> None:
        self._batches = iter([{name: images.pixels[i:i + 1]} for i in range(len(images.pixels))])

    def get_next(self) -> dict | None:
        return next(self._batches, None)


def ort_quantize_static(proto: onnx.ModelProto, images: ImageSet, method: CalibrationMethod,
                        reduce_range: bool = False) -> onnx.ModelProto:
    """The peer INT8 as ORT's documentation does it: ``quant_pre_process`` (shape inference
    and ORT's basic graph optimizations), then static QDQ quantization, per-channel;
    ``reduce_range`` gives 7-bit weights."""
    with tempfile.TemporaryDirectory() as tmp:
        src, pre, dst = (Path(tmp) / name for name in ("fp32.onnx", "pre.onnx", "int8.onnx"))
        onnx.save(proto, str(src))
        quant_pre_process(str(src), str(pre))
        quantize_static(str(pre), str(dst), _Reader(images, proto.graph.input[0].name),
                        quant_format=QuantFormat.QDQ, per_channel=True,
                        reduce_range=reduce_range, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, calibrate_method=method)
        return onnx.load(str(dst))


# The weight range `mvcompile build --int8` picks on this machine (--weight-bits auto).
AUTO_BITS, AUTO_WHY = machine.auto_weight_bits(machine.cpu_summary())


def ours(cfg: MobileViTConfig, weights: str | None, images: ImageSet) -> tuple[
        onnx.ModelProto, onnx.ModelProto]:
    plain, _ = create_mobilevit(cfg, weights)
    fp32, _ = compile_graph(plain)
    int8, _ = quantize(int8_source(plain, True)[0], images,
                       QuantizeOptions(weight_bits=AUTO_BITS))
    return onnx_io.to_proto(fp32), onnx_io.to_proto(int8)


def latency_table(rounds: int, threads: int) -> None:
    cfg = MobileViTConfig.for_size("xxs", resolution=256)
    images = bundled_photos(256, 32)
    source = RandomWeights(0)
    build_graph(cfg, source)
    fp32, int8 = ours(cfg, None, images)
    peer = export_peer(cfg, source.tensors)
    peer_int8 = ort_quantize_static(peer, images, CalibrationMethod.MinMax)
    models = {"ours INT8": int8, "ours FP32": fp32, "peer FP32": peer, "peer INT8": peer_int8}
    med = _medians(models, images, rounds, threads)
    print(f"\nLatency: XXS 256², batch 1, {threads} threads, ORT CPU; medians of {10 * rounds} "
          "runs, interleaved in blocks")
    print("| model | median ms | × ours FP32 | × peer INT8 | × peer FP32 |")
    print("|---|---|---|---|---|")
    for name in models:
        print(f"| {name} | {med[name]:.2f} | {med[name] / med['ours FP32']:.2f} | "
              f"{med[name] / med['peer INT8']:.2f} | {med[name] / med['peer FP32']:.2f} |")


def accuracy_table(weights: str, calib_size: int) -> None:
    cfg = MobileViTConfig.for_size("xxs", resolution=64, num_classes=10)
    calib = digits(64, "train", calib_size)
    val = digits(64, "val")
    fp32, int8 = ours(cfg, weights, calib)
    peer = export_peer(cfg, load_state_dict(weights))
    rows = {"ours FP32": fp32, "ours INT8": int8}
    for reduce_range in (False, True):
        for method in (CalibrationMethod.MinMax, CalibrationMethod.Percentile):
            name = f"quantize_static {method.name}" + (", reduce_range" if reduce_range else "")
            rows[name] = ort_quantize_static(peer, calib, method, reduce_range)
    ref = predict(fp32.SerializeToString(), val, batch_size=1)
    print(f"\nAccuracy: XXS 64², digits val ({len(val.pixels)} images), calibration: "
          f"{calib.description}; weights {weights}; ours: {AUTO_BITS}-bit weights ({AUTO_WHY})")
    print("| model | top-1 | Δ vs FP32 (points) | top-1 agreement with FP32 | SQNR dB |")
    print("|---|---|---|---|---|")
    base = metrics.top1_accuracy(ref, val.labels)
    for name, proto in rows.items():
        logits = predict(proto.SerializeToString(), val, batch_size=1)  # peer: static batch 1
        top1 = metrics.top1_accuracy(logits, val.labels)
        print(f"| {name} | {100 * top1:.2f}% | {100 * (top1 - base):+.2f} | "
              f"{100 * metrics.top1_agreement(ref, logits):.2f}% | "
              f"{metrics.sqnr_db(ref, logits):.1f} |")


def methods_table(weights: str, calib_size: int) -> None:
    """Every --calib-method at this machine's auto weight range, and the default method at
    the other range."""
    cfg = MobileViTConfig.for_size("xxs", resolution=64, num_classes=10)
    plain, _ = create_mobilevit(cfg, weights)
    source = int8_source(plain, True)[0]
    calib, val = digits(64, "train", calib_size), digits(64, "val")
    ref = predict(onnx_io.to_proto(source).SerializeToString(), val)
    print(f"\nCalibration methods: XXS 64², digits val ({len(val.pixels)} images), "
          f"{calib.description}; FP32 top-1 {100 * metrics.top1_accuracy(ref, val.labels):.2f}%")
    print("| method | weight bits | INT8 top-1 | agreement with FP32 | SQNR dB |")
    print("|---|---|---|---|---|")
    runs = [(m, AUTO_BITS) for m in OBSERVERS] + [("percentile", 8 if AUTO_BITS == 7 else 7)]
    for method, bits in runs:
        int8, _ = quantize(source, calib, QuantizeOptions(method=method, weight_bits=bits))
        logits = predict(onnx_io.to_proto(int8).SerializeToString(), val)
        print(f"| {method} | {bits} | {100 * metrics.top1_accuracy(logits, val.labels):.2f}% | "
              f"{100 * metrics.top1_agreement(ref, logits):.2f}% | "
              f"{metrics.sqnr_db(ref, logits):.1f} |")


def variants_table(rounds: int, threads: int) -> None:
    """Latency of INT8 graphs that quantize different op sets, vs our FP32 (XXS 256²)."""
    cfg = MobileViTConfig.for_size("xxs", resolution=256)
    images = bundled_photos(256, 16)
    plain, _ = create_mobilevit(cfg)
    source = int8_source(plain, True)[0]
    models = {"FP32": onnx_io.to_proto(compile_graph(plain)[0])}
    conv_matmul = frozenset({"Conv", "MatMul", "Gemm"})
    for label, ops in (("Conv/MatMul/Gemm", conv_matmul),
                       ("+ Sigmoid·Mul", conv_matmul | {"Sigmoid", "Mul"}),
                       ("+ Add/Concat/pool (default)", DEFAULT_OP_TYPES),
                       ("+ Softmax", DEFAULT_OP_TYPES | {"Softmax"})):
        int8, _ = quantize(source, images, QuantizeOptions(op_types=ops, weight_bits=AUTO_BITS))
        models[label] = onnx_io.to_proto(int8)
    med = _medians(models, images, rounds, threads)
    print(f"\nINT8 op sets: XXS 256², batch 1, {threads} threads; medians of {10 * rounds} "
          "runs, interleaved in blocks")
    print("| quantized ops | median ms | × FP32 |")
    print("|---|---|---|")
    for name, ms in med.items():
        print(f"| {name} | {ms:.2f} | {ms / med['FP32']:.2f} |")


def _medians(models: dict[str, onnx.ModelProto], images: ImageSet, rounds: int,
             threads: int) -> dict[str, float]:
    stats = latency.time_models({k: m.SerializeToString() for k, m in models.items()},
                                {"pixel_values": images.pixels[:1]}, 10 * rounds, threads)
    return {k: s.median_ms for k, s in stats.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--weights", default="runs/digits_xxs/best.safetensors")
    parser.add_argument("--calib-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-latency", action="store_true")
    parser.add_argument("--skip-accuracy", action="store_true")
    parser.add_argument("--variants", action="store_true", help="also time INT8 op sets")
    args = parser.parse_args()
    if not args.skip_latency:
        latency_table(args.rounds, args.threads)
    if args.variants:
        variants_table(args.rounds, args.threads)
    if not args.skip_accuracy:
        if Path(args.weights).exists():
            accuracy_table(args.weights, args.calib_size)
            methods_table(args.weights, args.calib_size)
        else:
            print(f"\n{args.weights} not found: train it with benchmarks/train_digits.py")


if __name__ == "__main__":
    main()
