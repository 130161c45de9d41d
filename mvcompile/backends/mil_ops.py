"""One lowering per ONNX op: ``(ctx, node, attrs) -> [outputs]`` built with the MIL builder.

Outputs are MIL Vars, or NumPy arrays when the result is a constant the lowering computed
itself. Each lowering states the ONNX semantics it reproduces where they are not one-to-one.
QuantizeLinear/DequantizeLinear live in :mod:`.mil_quant`, Einsum in :mod:`.mil_einsum`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.mil import Var

if TYPE_CHECKING:
    from mvcompile.backends.mil_lower import LowerContext

Value = Var | np.ndarray
Lowering = Callable[["LowerContext", onnx.NodeProto, dict[str, Any]], list[Value]]
LOWERINGS: dict[tuple[str, str], Lowering] = {}


def register(*op_types: str, domain: str = "") -> Callable[[Lowering], Lowering]:
    def decorate(fn: Lowering) -> Lowering:
        for op_type in op_types:
            LOWERINGS[(domain, op_type)] = fn
        return fn
    return decorate


def lookup(node: onnx.NodeProto) -> Lowering | None:
    _load_extra_modules()
    domain = "" if node.domain in ("", "ai.onnx") else node.domain
    return LOWERINGS.get((domain, node.op_type))


def supported_op_types() -> list[str]:
    _load_extra_modules()
    return [f"{d}.{t}" if d else t for d, t in LOWERINGS]


def _load_extra_modules() -> None:
    from mvcompile.backends import mil_einsum, mil_quant  # noqa: F401  (they register ops)


def arg(ctx: LowerContext, node: onnx.NodeProto, index: int) -> Value | None:
    """Input ``index`` of ``node``, or None when it is omitted."""
    return ctx.value(node.input[index]) if index < len(node.input) else None


def shape(value: Value) -> tuple[int, ...]:
    """The static shape of a Var or array (Core ML programs here have no symbolic dims)."""
    dims = value.shape
    if not all(isinstance(d, (int, np.integer)) for d in dims):
        raise ValueError(f"shape {dims} is not static")
    return tuple(int(d) for d in dims)


def text(attrs: dict[str, Any], name: str, default: str) -> str:
    value = attrs.get(name, default)
    return value.decode() if isinstance(value, bytes) else value


# -- element-wise ------------------------------------------------------------------------------

_BINARY = {"Add": mb.add, "Sub": mb.sub, "Mul": mb.mul, "Div": mb.real_div}


@register(*_BINARY)
def _binary(ctx: LowerContext, node: onnx.NodeProto, attrs: dict[str, Any]) -> list[Value]:
    """Numpy-style broadcasting in both ONNX and MIL; Div is real division (float graphs)."""
    return [_BINARY[node.op_type](x=arg(ctx, node, 0), y=arg(ctx, node, 1))]


@register("Sigmoid")
def _sigmoid(ctx: LowerContext, node: onnx.NodeProto, attrs: dict[str, Any]) -> list[Value]:
    return [mb.sigmoid(x=arg(ctx, node, 0))]


@register("Relu")
def _relu(ctx: LowerContext, node: onnx.NodeProto, attrs: dict[str, Any]) -> list[Value]:
    return [mb.relu(x=arg(ctx, node, 0))]


def _swish(x: Value, alpha: float) -> Var:
    """x·σ(αx): MIL ``silu`` when α = 1."""
    if alpha == 1.0:
        return mb.silu(x=x)
    return mb.mul(x=x, y=mb.sigmoid(x=mb.mul(x=x, y=np.float32(alpha))))


@register("Swish")
def _swish_op(ctx: LowerContext, node: onnx.NodeProto, attrs: dict[str, Any]) -> list[Value]:
    return [_swish(arg(ctx, node, 0), float(attrs.get("alpha", 1.0)))]


@register("QuickGelu", domain="com.microsoft")
def _quick_gelu(ctx: LowerContext, node: onnx.NodeProto, attrs: dict[str, Any]) -> list[Value]:
    return [_swish(arg(ctx, node, 0), float(attrs.get("alpha", 1.702)))]


@register("Identity")
def _identity(ctx: LowerContext, node: onnx.NodeProto, attrs: dict[str, Any]) -> list[Value]:
    return [arg(ctx, node, 0)]


@register("Constant")
def _constant(ctx: LowerContext, node: onnx.NodeProto, attrs: dict[str, Any]) -> list[Value]:
    (name, value), = attrs.items()
    if isinstance(value, onnx.TensorProto):
        return [onnx.numpy_helper.to_array(value)]
    dtype = np.float32 if name.startswith("value_float") else np.int64
    return [np.asarray(value, dtype=dtype)]


# -- convolution and normalization -------------------------------------------------------------


@register("Conv")
def _conv(ctx: LowerContext, node: onnx.NodeProto, attrs: dict[str, Any]) -> list[Value]:
    """ONNX pads [b1, b2, ..., e1, e2, ...] become MIL's [b1, e1, b2, e2, ...]."""
    x, weight, bias = (arg(ctx, node, i) for i in range(3))
    spatial = len(shape(weight)) - 2
    auto_pad = text(attrs, "auto_pad", "NOTSET")
    pad_type = {"NOTSET": "custom", "VALID": "valid", "SAME_UPPER": "same",
                "SAME_LOWER": "same_lower"}[auto_pad]
    pads = list(attrs.get("pads", [0] * 2 * spatial))
    mil_pad = [p for i in range(spatial) for p in (pads[i], pads[i + spatial])]
    const_bias = bias is None or isinstance(bias, np.ndarray) or bias.val is not None
    y = mb.conv(x=x, weight=weight, bias=bias if const_bias else None,
                strides=list(attrs.get("strides", [1] * spatial)), pad_type=pad_type,
                pad=mil_pad if pad_type == "custom" else None,
                dilations=list(attrs.get("dilations", [1] * spatial)),
                groups=int(attrs.get("group", 1)))
    if not const_bias:
        y = mb.add(x=y, y=mb.reshape(x=bias, shape=[-1] + [1] * spatial))
    return [y]


@register("BatchNormalization")
def _batch_norm(ctx: LowerContext, node: onnx.NodeProto, attrs: dict[str, Any]) -> list[Value]:
    """Inference form y = (x − μ)/sqrt(σ² + ε)·γ + β with the running statistics."""
    if attrs.get("training_mode", 0) or any(node.output[1:]):
        raise NotImplementedError("training-mode BatchNormalization (batch statistics)")
    x, gamma, beta, mean, var = (arg(ctx, node, i) for i in range(5))
    return [mb.batch_norm(x=x, mean=mean, variance=var, gamma=gamma, beta=beta,
                          epsilon=np.float32(attrs.get("epsilon", 1e-5)))]


@register("LayerNormalization")
def _layer_norm(ctx: LowerContext, node: onnx.NodeProto, attrs: dict[str, Any]) -> list[Value]:
    """Normalize over axes [axis, rank): y = (x − E x)/sqrt(Var x + ε)·γ + β."""
    if any(node.output[1:]):
        raise NotImplementedError("LayerNormalization's Mean/InvStdDev outputs")
    x = arg(ctx, node, 0)
    dims = shape(x)
    axis = int(attrs.get("axis", -1)) % len(dims)
    norm_shape = dims[axis:]
    gamma = ctx.const(node.input[1], node, "scale")
    beta = ctx.const(node.input[2], node, "bias") if len(node.input) > 2 else None
    gamma = np.broadcast_to(gamma, norm_shape).astype(np.float32)
    beta = None if beta is None else np.broadcast_to(beta, norm_shape).astype(np.float32)
    return [mb.layer_norm(x=x, axes=list(range(axis, len(dims))), gamma=gamma, beta=beta,
                          epsilon=np.float32(attrs.get("epsilon", 1e-5)))]


@register("Softmax")
def _softmax(ctx: LowerContext, node: onnx.NodeProto, attrs: dict[str, Any]) -> list[Value]:
    x = arg(ctx, node, 0)
    rank = len(shape(x))
    axis = int(attrs.get("axis", -1 if ctx.opset >= 13 else 1)) % rank
    if ctx.opset < 13 and axis != rank - 1:
        raise NotImplementedError("Softmax before opset 13 over a flattened 2-D view "
                                  "(axis is not the last)")
    return [mb.softmax(x=x, axis=axis)]


# -- matrix products ---------------------------------------------------------------------------


@register("MatMul")
def _matmul(ctx: LowerContext, node: onnx.NodeProto, attrs: dict[str, Any]) -> list[Value]:
    return [mb.matmul(x=arg(ctx, node, 0), y=arg(ctx, node, 1))]


@register("FusedMatMul", domain="com.microsoft")
def _fused_matmul(ctx: LowerContext, node: onnx.NodeProto, attrs: dict[str, Any]) -> list[Value]:
    """α·op(A)·op(B) with op = transpose of the last two axes when transA/transB."""
    if attrs.get("transBatchA", 0) or attrs.get("transBatchB", 0):
        raise NotImplementedError("FusedMatMul with transBatchA/transBatchB")
    y = mb.matmul(x=arg(ctx, node, 0), y=arg(ctx, node, 1),
                  transpose_x=bool(attrs.get("transA", 0)),
                  transpose_y=bool(attrs.get("transB", 0)))
    alpha = float(attrs.get("alpha", 1.0))
    return [y if alpha == 1.0 else mb.mul(x=y, y=np.float32(alpha))]


def _is_constexpr(value: Value | None) -> bool:
    """A Var computed at load time from stored constants (an int8 weight)."""
    return isinstance(value, Var) and value.op is not None and value.op.op_type.startswith(
        "constexpr")


def _is_const(value: Value | None) -> bool:
    return isinstance(value, np.ndarray) or (value is not None and value.val is not None)


@register("Gemm")
def _gemm(ctx: LowerContext, node: onnx.NodeProto, attrs: dict[str, Any]) -> list[Value]:
    """Y = α·op(A)·op(B) + β·C. A constant B (or a constexpr int8 one) in the [N, K] layout
    becomes MIL ``linear`` with C folded into its bias."""
    a, b, c = (arg(ctx, node, i) for i in range(3))
    alpha, beta = float(attrs.get("alpha", 1.0)), float(attrs.get("beta", 1.0))
    trans_a, trans_b = bool(attrs.get("transA", 0)), bool(attrs.get("transB", 0))
    n = shape(b)[0 if trans_b else 1]
    constexpr_b = _is_constexpr(b)
    if isinstance(b, Var) and b.val is not None and not constexpr_b:
        b = np.asarray(b.val)
    # a per-column bias: C of shape (), (1,), (N,), (1, 1) or (1, N); [M, 1] adds per row
    bias_ok = c is None or (_is_const(c) and tuple(shape(c)) in ((), (1,), (n,), (1, 1), (1, n)))
    if (isinstance(b, np.ndarray) or (constexpr_b and trans_b)) and bias_ok:
        weight = b if trans_b else np.ascontiguousarray(b.T)
        if isinstance(weight, np.ndarray) and alpha != 1.0:
            weight, alpha = (weight * alpha).astype(np.float32), 1.0
        bias = np.zeros(n, np.float32) if c is None else np.broadcast_to(
            np.asarray(c.val if isinstance(c, Var) else c, np.float32).reshape(-1), (n,)) * beta
        bias = bias / alpha  # α·(x·Wᵀ + β·C/α) = α·x·Wᵀ + β·C, for a constexpr W
        x = mb.transpose(x=a, perm=[1, 0]) if trans_a else a
        y = mb.linear(x=x, weight=weight, bias=np.ascontiguousarray(bias, np.float32))
        return [y if alpha == 1.0 else mb.mul(x=y, y=np.float32(alpha))]
    y = mb.matmul(x=a, y=b, transpose_x=trans_a, transpose_y=trans_b)
    if alpha != 1.0:
        y = mb.mul(x=y, y=np.float32(alpha))
    if c is not None:
        y = mb.add(x=y, y=c if beta == 1.0 else mb.mul(x=c, y=np.float32(beta)))
    return [y]


# -- shape and layout --------------------------------------------------------------------------


def reshape(x: Value, target: list[int]) -> Value:
    """Reshape a Var with MIL, or a constant with NumPy."""
    if isinstance(x, np.ndarray):
        return x.reshape(target)
    return x if list(shape(x)) == list(target) else mb.reshape(x=x, shape=list(target))


def transpose(x: Value, perm: list[int]) -> Value:
    if list(perm) == sorted(perm):
        return x
    return np.transpose(x, perm) if isinstance(x, np.ndarray) else mb.transpose(x=x, perm=perm)


@register("Reshape")
def _reshape(ctx: LowerContext, node: onnx.NodeProto, attrs: dict[str, Any]) -> list[Value]:
    """ONNX target shape: 0 copies the input dim (unless allowzero), −1 is inferred."""
    x = arg(ctx, node, 0)
    dims = shape(x)
    target = [int(d) for d in ctx.const(node.input[1], node, "shape")]
    if not attrs.get("allowzero", 0):
        target = [dims[i] if d == 0 else d for i, d in enumerate(target)]
    if -1 in target:
        known = math.prod(d for d in target if d != -1)
        target[target.index(-1)] = math.prod(dims) // max(known, 1)
    return [reshape(x, target)]


@register("Flatten")
def _flatten(ctx: LowerContext, node: onnx.NodeProto, attrs: dict[str, Any]) -> list[Value]:
    x = arg(ctx, node, 0)
    dims = shape(x)
    axis = int(attrs.get("axis", 1))
    axis = axis + len(dims) if axis < 0 else axis  # ONNX: axis in [-r, r]
    return [reshape(x, [math.prod(dims[:axis]), math.prod(dims[axis:])])]


@register("Transpose")
def _transpose(ctx: LowerContext, node: onnx.NodeProto, attrs: dict[str, Any]) -> list[Value]:
    x = arg(ctx, node, 0)
    perm = list(attrs.get("perm", reversed(range(len(shape(x))))))
    return [transpose(x, perm)]


@register("Concat")
def _concat(ctx: LowerContext, node: onnx.NodeProto, attrs: dict[str, Any]) -> list[Value]:
    values = [ctx.value(name) for name in node.input]
    axis = int(attrs["axis"])
    if all(isinstance(v, np.ndarray) for v in values):
        return [np.concatenate(values, axis=axis)]
    return [mb.concat(values=values, axis=axis, interleave=False)]


@register("Split")
def _split(ctx: LowerContext, node: onnx.NodeProto, attrs: dict[str, Any]) -> list[Value]:
    """Sizes from the ``split`` input (or attribute before opset 13); otherwise
    ``num_outputs`` pieces of ceil(dim/n), the last one smaller."""
    x = arg(ctx, node, 0)
    dims = shape(x)
    axis = int(attrs.get("axis", 0)) % len(dims)
    if len(node.input) > 1 and node.input[1]:
        sizes = [int(s) for s in ctx.const(node.input[1], node, "split sizes")]
    elif "split" in attrs:
        sizes = [int(s) for s in attrs["split"]]
    else:
        count = len(node.output)
        chunk = -(-dims[axis] // count)
        sizes = [chunk] * (count - 1) + [dims[axis] - chunk * (count - 1)]
    if len(sizes) == 1:
        return [x]
    return list(mb.split(x=x, split_sizes=sizes, axis=axis))


@register("Slice")
def _slice(ctx: LowerContext, node: onnx.NodeProto, attrs: dict[str, Any]) -> list[Value]:
    """Per axis, ONNX's clamping of (start, end, step) is Python's ``slice.indices``."""
    x = arg(ctx, node, 0)
    dims = shape(x)
    starts, ends, axes, steps = _slice_inputs(ctx, node, attrs)
    axes = list(range(len(starts))) if axes is None else [int(a) % len(dims) for a in axes]
    steps = [1] * len(axes) if steps is None else steps
    begin, end, stride = [0] * len(dims), list(dims), [1] * len(dims)
    end_mask = [False] * len(dims)
    for a, s0, e0, st in zip(axes, starts, ends, steps, strict=True):
        begin[a], end[a], stride[a] = slice(int(s0), int(e0), int(st)).indices(dims[a])
        end_mask[a] = stride[a] < 0 and end[a] < 0  # runs past index 0
    if isinstance(x, np.ndarray):
        index = tuple(slice(b, None if m else e, s)
                      for b, e, s, m in zip(begin, end, stride, end_mask, strict=True))
        return [x[index]]
    return [mb.slice_by_index(x=x, begin=begin, end=[0 if m else e for e, m in
                                                       zip(end, end_mask, strict=True)],
                              stride=stride, end_mask=end_mask)]


def _slice_inputs(ctx: LowerContext, node: onnx.NodeProto, attrs: dict[str, Any]
                  ) -> tuple[Sequence[int] | np.ndarray | None, ...]:
    """(starts, ends, axes, steps): inputs since opset 10, attributes before."""
    if ctx.opset < 10:
        return attrs["starts"], attrs["ends"], attrs.get("axes"), None
    names = list(node.input) + [""] * (5 - len(node.input))
    return tuple(ctx.const(names[i], node, what)
                 for i, what in enumerate(["starts", "ends", "axes", "steps"], start=1))


@register("SpaceToDepth")
def _space_to_depth(ctx: LowerContext, node: onnx.NodeProto, attrs: dict[str, Any]) -> list[Value]:
    """y[n, (i·b + j)·C + c, h, w] = x[n, c, h·b + i, w·b + j] (same order in MIL)."""
    x, block = arg(ctx, node, 0), int(attrs["blocksize"])
    return [x if block == 1 else mb.space_to_depth(x=x, block_size=block)]


@register("DepthToSpace")
def _depth_to_space(ctx: LowerContext, node: onnx.NodeProto, attrs: dict[str, Any]) -> list[Value]:
    """DCR is MIL ``depth_to_space``; CRD is MIL ``pixel_shuffle``."""
    x, block = arg(ctx, node, 0), int(attrs["blocksize"])
    if block == 1:
        return [x]
    if text(attrs, "mode", "DCR") == "CRD":
        return [mb.pixel_shuffle(x=x, upscale_factor=block)]
    return [mb.depth_to_space(x=x, block_size=block)]


# -- reductions --------------------------------------------------------------------------------


@register("GlobalAveragePool", "GlobalMaxPool")
def _global_pool(ctx: LowerContext, node: onnx.NodeProto, attrs: dict[str, Any]) -> list[Value]:
    x = arg(ctx, node, 0)
    axes = list(range(2, len(shape(x))))
    reduce = mb.reduce_mean if node.op_type == "GlobalAveragePool" else mb.reduce_max
    return [reduce(x=x, axes=axes, keep_dims=True)]


@register("ReduceSum", "ReduceMean")
def _reduce(ctx: LowerContext, node: onnx.NodeProto, attrs: dict[str, Any]) -> list[Value]:
    """Axes from the second input (ReduceSum ≥ 13, ReduceMean ≥ 18) or the attribute."""
    x = arg(ctx, node, 0)
    rank = len(shape(x))
    if len(node.input) > 1 and node.input[1]:
        axes = [int(a) for a in ctx.const(node.input[1], node, "axes")]
    else:
        axes = [int(a) for a in attrs.get("axes", [])]
    if not axes:
        if attrs.get("noop_with_empty_axes", 0):
            return [x]
        axes = list(range(rank))
    reduce = mb.reduce_sum if node.op_type == "ReduceSum" else mb.reduce_mean
    return [reduce(x=x, axes=[a % rank for a in axes], keep_dims=bool(attrs.get("keepdims", 1)))]
