"""QuantizeLinear/DequantizeLinear (our QDQ graphs) → Core ML int8.

ONNX:  Q(x) = saturate(round(x/s) + z),   DQ(q) = (q − z)·s   (per tensor, or per channel
along ``axis``). The lowering depends on the int8 mode:

- ``w8a8`` (iOS17): activation Q/DQ become MIL ``quantize``/``dequantize``; the Core ML
  compiler fuses dequantize → conv/matmul → quantize into int8 compute where the hardware has
  it. Constant int8 weights become ``constexpr_affine_dequantize`` (stored as int8).
- ``weight-only`` (iOS16): constant int8 weights become ``constexpr_affine_dequantize``;
  activation Q → DQ pairs are dropped, so activations stay float.

In both modes an int32 bias (scale s_x·s_w) is dequantized here to a float constant: Core ML has
no int32 constexpr, and the compiler folds the bias into the op anyway.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.mil import Var

from mvcompile.backends.mil_ops import Value, arg, register, shape

if TYPE_CHECKING:
    from mvcompile.backends.mil_lower import LowerContext

_INT8 = {np.dtype(np.int8): "int8", np.dtype(np.uint8): "uint8"}


def _params(ctx: LowerContext, node: onnx.NodeProto, attrs: dict[str, Any], rank: int
            ) -> tuple[np.ndarray, np.ndarray | None, int | None]:
    """(scale, zero point, axis or None for per-tensor) from constant inputs."""
    if attrs.get("block_size", 0):
        raise NotImplementedError("blocked quantization (block_size)")
    scale = np.asarray(ctx.const(node.input[1], node, "scale"), np.float32)
    zero = ctx.const(node.input[2], node, "zero point") if len(node.input) > 2 else None
    if scale.size == 1:
        return scale.reshape(()), None if zero is None else zero.reshape(()), None
    return scale.reshape(-1), None if zero is None else zero.reshape(-1), int(
        attrs.get("axis", 1)) % rank


@register("QuantizeLinear")
def _quantize(ctx: LowerContext, node: onnx.NodeProto, attrs: dict[str, Any]) -> list[Value]:
    x = arg(ctx, node, 0)
    if ctx.int8_mode == "weight-only":
        ctx.passthrough.add(node.output[0])
        return [x]
    scale, zero, axis = _params(ctx, node, attrs, len(shape(x)))
    if zero is None:
        dtype = np.int8 if attrs.get("output_dtype") == onnx.TensorProto.INT8 else np.uint8
        zero = np.zeros(scale.shape, dtype)
    if zero.dtype not in _INT8:
        raise NotImplementedError(f"quantizing to {zero.dtype} (Core ML has int8 and uint8)")
    return [mb.quantize(input=x, scale=scale, zero_point=zero, axis=axis,
                        output_dtype=_INT8[zero.dtype])]


@register("DequantizeLinear")
def _dequantize(ctx: LowerContext, node: onnx.NodeProto, attrs: dict[str, Any]) -> list[Value]:
    x = arg(ctx, node, 0)
    if node.input[0] in ctx.passthrough:
        return [x]
    constant = isinstance(x, np.ndarray) or x.val is not None
    q = np.asarray(x if isinstance(x, np.ndarray) else x.val) if constant else None
    scale, zero, axis = _params(ctx, node, attrs, len(shape(x)))
    if constant and q.dtype in _INT8 and q.ndim:  # a scalar has no axis: folded below
        zero = np.zeros(scale.shape, q.dtype) if zero is None else zero.astype(q.dtype)
        return [mb.constexpr_affine_dequantize(quantized_data=q, zero_point=zero, scale=scale,
                                               axis=0 if axis is None else axis)]
    if constant:
        return [_dequantize_numpy(q, scale, zero, axis)]
    if not isinstance(x, Var) or ctx.int8_mode != "w8a8":
        raise NotImplementedError("an integer graph input (only float inputs are supported)")
    return [mb.dequantize(input=x, scale=scale, zero_point=zero, axis=axis)]


def _dequantize_numpy(q: np.ndarray, scale: np.ndarray, zero: np.ndarray | None,
                      axis: int | None) -> np.ndarray:
    """(q − z)·s in float32, broadcasting per-channel parameters along ``axis``."""
    shape_ = [1] * q.ndim
    if axis is not None:
        shape_[axis] = -1
    z = 0.0 if zero is None else zero.astype(np.float64).reshape(shape_ if axis is not None
                                                                   else ())
    s = scale.astype(np.float64).reshape(shape_ if axis is not None else ())
    return ((q.astype(np.float64) - z) * s).astype(np.float32)
