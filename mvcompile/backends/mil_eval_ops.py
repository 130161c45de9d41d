"""NumPy definitions of the MIL ops our lowering (and coremltools' passes) emit, by op type.

Each function takes the op's MIL input names as keyword arguments (NumPy values; strings and
flags arrive as 0-d arrays) and returns one array or a list of arrays. Formulas follow the MIL
op reference (coremltools.converters.mil.mil.ops.defs).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

OPS: dict[str, Callable[..., object]] = {}


def op(*names: str) -> Callable[[Callable[..., object]], Callable[..., object]]:
    def decorate(fn: Callable[..., object]) -> Callable[..., object]:
        OPS.update(dict.fromkeys(names, fn))
        return fn
    return decorate


def f32(a: np.ndarray) -> np.ndarray:
    """Compute float16 tensors in float32 (the result is rounded back by the evaluator)."""
    a = np.asarray(a)
    return a.astype(np.float32) if a.dtype == np.float16 else a


def along(v: np.ndarray, axis: object, ndim: int) -> np.ndarray:
    """A per-channel parameter vector broadcast along ``axis`` of a rank-``ndim`` tensor."""
    v = f32(np.asarray(v))
    if v.ndim == 0 or axis is None:
        return v
    shape = [1] * ndim
    shape[int(axis) % ndim] = -1
    return v.reshape(shape)


# -- element-wise ------------------------------------------------------------------------------

for _name, _fn in {"add": np.add, "sub": np.subtract, "mul": np.multiply,
                   "real_div": np.divide, "maximum": np.maximum, "minimum": np.minimum}.items():
    OPS[_name] = lambda x, y, _fn=_fn: _fn(f32(x), f32(y))


@op("sigmoid")
def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-f32(x)))


@op("silu")
def silu(x: np.ndarray) -> np.ndarray:
    """x·σ(x)."""
    return f32(x) * sigmoid(x)


@op("relu")
def relu(x: np.ndarray) -> np.ndarray:
    return np.maximum(f32(x), 0)


@op("identity", "cast")
def identity(x: np.ndarray, dtype: np.ndarray | None = None) -> np.ndarray:
    return x  # the evaluator stores every result in the op's declared output type


# -- linear algebra ----------------------------------------------------------------------------


@op("matmul")
def matmul(x: np.ndarray, y: np.ndarray, transpose_x: np.ndarray | bool = False,
           transpose_y: np.ndarray | bool = False) -> np.ndarray:
    x, y = f32(x), f32(y)
    if bool(transpose_x):
        x = np.swapaxes(x, -1, -2)
    if bool(transpose_y):
        y = np.swapaxes(y, -1, -2)
    return np.matmul(x, y)


@op("linear")
def linear(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    """y = x·Wᵀ + b, W: [out, in]."""
    y = f32(x) @ f32(weight).T
    return y if bias is None else y + f32(bias)


def _same_pads(size: int, kernel: int, stride: int, dilation: int, lower: bool
               ) -> tuple[int, int]:
    out = -(-size // stride)
    total = max((out - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    small, big = total // 2, total - total // 2
    return (big, small) if lower else (small, big)


@op("conv")
def conv(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None = None,
         strides: np.ndarray | None = None, pad_type: np.ndarray | str = "valid",
         pad: np.ndarray | None = None, dilations: np.ndarray | None = None,
         groups: np.ndarray | int = 1) -> np.ndarray:
    """2-D grouped convolution as sliding windows · weights (cross-correlation, NCHW/OIHW)."""
    x, w = f32(x), f32(weight)
    if x.ndim != 4:
        raise NotImplementedError("the MIL evaluator's conv handles 2-D convolutions only")
    n, c = x.shape[:2]
    o, cg, kh, kw = w.shape
    s = [int(v) for v in (strides if strides is not None else (1, 1))]
    d = [int(v) for v in (dilations if dilations is not None else (1, 1))]
    kind = str(pad_type)
    if kind == "custom":
        pads = [int(v) for v in pad]
    elif kind == "valid":
        pads = [0, 0, 0, 0]
    else:
        lower = kind == "same_lower"
        pads = [*_same_pads(x.shape[2], kh, s[0], d[0], lower),
                *_same_pads(x.shape[3], kw, s[1], d[1], lower)]
    xp = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[1]), (pads[2], pads[3])))
    win = sliding_window_view(xp, ((kh - 1) * d[0] + 1, (kw - 1) * d[1] + 1), axis=(2, 3))
    win = win[:, :, ::s[0], ::s[1], ::d[0], ::d[1]]  # [n, c, oh, ow, kh, kw]
    g = int(groups)
    oh, ow = win.shape[2:4]
    win = win.reshape(n, g, c // g, oh, ow, kh, kw)
    y = np.einsum("ngchwij,gocij->ngohw", win, w.reshape(g, o // g, cg, kh, kw), optimize=True)
    y = y.reshape(n, o, oh, ow)
    return y if bias is None else y + f32(bias).reshape(1, -1, 1, 1)


# -- normalization -----------------------------------------------------------------------------


@op("layer_norm")
def layer_norm(x: np.ndarray, axes: np.ndarray, gamma: np.ndarray | None = None,
               beta: np.ndarray | None = None, epsilon: np.ndarray | float = 1e-5
               ) -> np.ndarray:
    """(x − E x)/sqrt(Var x + ε)·γ + β over ``axes`` (statistics in float64)."""
    x64 = f32(x).astype(np.float64)
    axes = tuple(int(a) % x64.ndim for a in np.atleast_1d(axes))
    mean = x64.mean(axis=axes, keepdims=True)
    var = ((x64 - mean) ** 2).mean(axis=axes, keepdims=True)
    y = (x64 - mean) / np.sqrt(var + float(epsilon))
    if gamma is not None:
        y = y * f32(gamma)
    return y if beta is None else y + f32(beta)


@op("batch_norm")
def batch_norm(x: np.ndarray, mean: np.ndarray, variance: np.ndarray,
               gamma: np.ndarray | None = None, beta: np.ndarray | None = None,
               epsilon: np.ndarray | float = 1e-5) -> np.ndarray:
    shape = [1, -1] + [1] * (np.ndim(x) - 2)
    y = (f32(x) - f32(mean).reshape(shape)) / np.sqrt(f32(variance).reshape(shape)
                                                       + float(epsilon))
    if gamma is not None:
        y = y * f32(gamma).reshape(shape)
    return y if beta is None else y + f32(beta).reshape(shape)


@op("softmax")
def softmax(x: np.ndarray, axis: np.ndarray | int = -1) -> np.ndarray:
    x = f32(x)
    e = np.exp(x - x.max(axis=int(axis), keepdims=True))
    return e / e.sum(axis=int(axis), keepdims=True)


# -- reductions --------------------------------------------------------------------------------

for _name, _fn in {"reduce_mean": np.mean, "reduce_sum": np.sum, "reduce_max": np.max}.items():
    OPS[_name] = lambda x, axes=None, keep_dims=False, _fn=_fn: _fn(
        f32(x), axis=None if axes is None else tuple(int(a) for a in np.atleast_1d(axes)),
        keepdims=bool(keep_dims))


# -- shape and layout --------------------------------------------------------------------------


@op("reshape")
def reshape(x: np.ndarray, shape: np.ndarray) -> np.ndarray:
    return np.reshape(x, [int(v) for v in shape])


@op("transpose")
def transpose(x: np.ndarray, perm: np.ndarray) -> np.ndarray:
    return np.transpose(x, [int(v) for v in perm])


@op("expand_dims")
def expand_dims(x: np.ndarray, axes: np.ndarray) -> np.ndarray:
    return np.expand_dims(x, tuple(int(a) for a in np.atleast_1d(axes)))


@op("squeeze")
def squeeze(x: np.ndarray, axes: np.ndarray | None = None) -> np.ndarray:
    return np.squeeze(x, None if axes is None else tuple(int(a) for a in np.atleast_1d(axes)))


@op("concat")
def concat(values: list[np.ndarray], axis: np.ndarray | int,
           interleave: np.ndarray | bool = False) -> np.ndarray:
    if bool(interleave):
        raise NotImplementedError("concat with interleave")
    return np.concatenate([f32(v) for v in values], axis=int(axis))


@op("split")
def split(x: np.ndarray, num_splits: np.ndarray | int | None = None,
          split_sizes: np.ndarray | None = None, axis: np.ndarray | int = 0
          ) -> list[np.ndarray]:
    axis = int(axis)
    if split_sizes is None:
        return np.split(x, int(num_splits), axis=axis)
    return np.split(x, np.cumsum([int(s) for s in split_sizes])[:-1], axis=axis)


@op("slice_by_index")
def slice_by_index(x: np.ndarray, begin: np.ndarray, end: np.ndarray,
                   stride: np.ndarray | None = None, begin_mask: np.ndarray | None = None,
                   end_mask: np.ndarray | None = None,
                   squeeze_mask: np.ndarray | None = None) -> np.ndarray:
    """Python slicing per axis; masks ignore begin/end, squeeze_mask takes one element."""
    index: list[object] = []
    for i in range(np.ndim(x)):
        b = None if begin_mask is not None and begin_mask[i] else int(begin[i])
        e = None if end_mask is not None and end_mask[i] else int(end[i])
        s = 1 if stride is None else int(stride[i])
        index.append(b if squeeze_mask is not None and squeeze_mask[i] else slice(b, e, s))
    return x[tuple(index)]


@op("space_to_depth")
def space_to_depth(x: np.ndarray, block_size: np.ndarray | int) -> np.ndarray:
    """y[n, (i·b + j)·C + c, h, w] = x[n, c, h·b + i, w·b + j]."""
    b = int(block_size)
    n, c, h, w = x.shape
    y = x.reshape(n, c, h // b, b, w // b, b).transpose(0, 3, 5, 1, 2, 4)
    return y.reshape(n, c * b * b, h // b, w // b)


@op("depth_to_space")
def depth_to_space(x: np.ndarray, block_size: np.ndarray | int) -> np.ndarray:
    """Inverse of space_to_depth (ONNX DepthToSpace, DCR)."""
    b = int(block_size)
    n, c, h, w = x.shape
    y = x.reshape(n, b, b, c // (b * b), h, w).transpose(0, 3, 4, 1, 5, 2)
    return y.reshape(n, c // (b * b), h * b, w * b)


@op("pixel_shuffle")
def pixel_shuffle(x: np.ndarray, upscale_factor: np.ndarray | int) -> np.ndarray:
    """ONNX DepthToSpace CRD / torch pixel_shuffle."""
    b = int(upscale_factor)
    n, c, h, w = x.shape
    y = x.reshape(n, c // (b * b), b, b, h, w).transpose(0, 1, 4, 2, 5, 3)
    return y.reshape(n, c // (b * b), h * b, w * b)


# -- quantization ------------------------------------------------------------------------------


@op("quantize")
def quantize(input: np.ndarray, scale: np.ndarray,  # noqa: A002
             zero_point: np.ndarray | None = None, axis: np.ndarray | int | None = None,
             output_dtype: np.ndarray | str = "uint8") -> np.ndarray:
    """clip(round(x/s) + z) to the int8/uint8 range (round half to even)."""
    info = np.iinfo(np.dtype(str(output_dtype)))
    ndim = np.ndim(input)
    axis = None if axis is None else int(axis)
    z = 0 if zero_point is None else along(zero_point, axis, ndim).astype(np.float32)
    q = np.round(f32(input) / along(scale, axis, ndim)) + z
    return np.clip(q, info.min, info.max)


@op("dequantize")
def dequantize(input: np.ndarray, scale: np.ndarray,  # noqa: A002
               zero_point: np.ndarray | None = None, axis: np.ndarray | int | None = None
               ) -> np.ndarray:
    """(q − z)·s."""
    ndim = np.ndim(input)
    axis = None if axis is None else int(axis)
    z = 0 if zero_point is None else along(zero_point, axis, ndim).astype(np.float32)
    return (np.asarray(input, np.float32) - z) * along(scale, axis, ndim)


@op("constexpr_affine_dequantize")
def constexpr_affine_dequantize(quantized_data: np.ndarray, zero_point: np.ndarray,
                                scale: np.ndarray, axis: np.ndarray | int) -> np.ndarray:
    return dequantize(quantized_data, scale, zero_point, axis)
