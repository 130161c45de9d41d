"""Which inputs of each op are quantized, and how: the op quantizer registry.

An op quantizer only declares roles. The QDQ inserter (:mod:`.qdq`) does the work:

- ``ACTIVATION``: per-tensor, range from calibration, QuantizeLinear → DequantizeLinear;
- ``Weight(axis)``: a constant, stored as int8, symmetric, per channel along ``axis``;
- ``BIAS``: a constant, stored as int32 with scale s_x·s_w[c] (needs the activation input 0 and
  the weight input 1 of the same node);
- ``output=True``: the op's output is quantized too, which ONNX Runtime needs to fuse
  DQ → op → Q into one integer kernel (QLinearConv, QLinearMatMul, QGemm, ...).

A MatMul's second input is a weight when it is a constant, and an activation otherwise (the
attention products q·kᵀ and p·v).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Weight:
    """A constant weight, symmetric int8, per channel along ``axis`` (negative counts back),
    or per tensor when ``axis`` is None."""

    axis: int | None


ACTIVATION = "activation"
BIAS = "bias"
Role = str | Weight


@dataclass(frozen=True)
class OpQuantizer:
    """Input index → role, and whether the output is quantized."""

    inputs: dict[int, Role] = field(default_factory=dict)
    output: bool = True


# Gemm's weight axis depends on transB; the inserter reads the attribute (see qdq._weight_axis).
QUANTIZERS: dict[str, OpQuantizer] = {
    "Conv": OpQuantizer({0: ACTIVATION, 1: Weight(axis=0), 2: BIAS}),
    # Per tensor: ONNX Runtime 1.31's fused QDQ MatMul gives wrong results with per-column
    # weight scales (benchmarks/ort_quirks.py, table 3, shows the failure).
    "MatMul": OpQuantizer({0: ACTIVATION, 1: Weight(axis=None)}),
    "Gemm": OpQuantizer({0: ACTIVATION, 1: Weight(axis=0), 2: BIAS}),
    "Add": OpQuantizer({0: ACTIVATION, 1: ACTIVATION}),
    "Mul": OpQuantizer({0: ACTIVATION, 1: ACTIVATION}),
    "Concat": OpQuantizer({0: ACTIVATION, 1: ACTIVATION}),
    "Sigmoid": OpQuantizer({0: ACTIVATION}),
    "Swish": OpQuantizer({0: ACTIVATION}),
    "Softmax": OpQuantizer({0: ACTIVATION}),
    "LayerNormalization": OpQuantizer({0: ACTIVATION}, output=True),
    "GlobalAveragePool": OpQuantizer({0: ACTIVATION}),
}

# Default, chosen by measurement on ONNX Runtime (README, "Measured results"): the
# compute-heavy ops, plus Sigmoid·Mul (Swish), Add, Concat and pooling, which keeps the conv
# stages in uint8 NHWC between integer kernels. Softmax and LayerNormalization stay float:
# quantizing Softmax (QLinearSoftmax) measured clearly slower, and ORT has no integer LayerNorm.
DEFAULT_OP_TYPES = frozenset({"Conv", "MatMul", "Gemm", "Sigmoid", "Mul", "Add", "Concat",
                              "GlobalAveragePool"})
