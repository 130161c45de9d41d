"""Real range → (scale, zero_point), the one formula every quantizer uses.

Asymmetric uint8 (activations):   scale = (hi − lo) / 255,  zp = round(−lo / scale) ∈ [0, 255]
Symmetric int8 (weights, or activations when chosen):  scale = max(|lo|, |hi|) / 127,  zp = 0

The range is first widened to include 0, so that 0.0 (padding, ReLU/Swish zeros) is exactly
representable. A degenerate range (lo = hi, e.g. a constant or all-zero tensor) gets a tiny
positive scale (MIN_SCALE) instead of 0, which would divide by zero in QuantizeLinear. (Not
1.0, as ONNX Runtime's calibration uses: a conv reading an all-zero tensor would then have its
bias quantized at 1.0·s_w and lose it; at MIN_SCALE·s_w the bias overflows int32 and the layer
is kept in float, exact.)
"""

from __future__ import annotations

import numpy as np

MIN_SCALE = float(np.finfo(np.float32).tiny) * 1e6  # ~1.2e-32: positive, and 1/scale finite

QRANGES = {"uint8": (0, 255), "int8": (-128, 127)}


def quant_params(lo: float, hi: float, dtype: str = "uint8", symmetric: bool = False
                 ) -> tuple[np.float32, np.integer]:
    """(scale, zero_point) for quantizing the real interval [lo, hi] to ``dtype``."""
    if dtype not in QRANGES:
        raise ValueError(f"dtype must be one of {sorted(QRANGES)}, got {dtype!r}")
    if not (np.isfinite(lo) and np.isfinite(hi)) or lo > hi:
        raise ValueError(f"invalid range [{lo}, {hi}]")
    qmin, qmax = QRANGES[dtype]
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    np_dtype = np.uint8 if dtype == "uint8" else np.int8
    if symmetric:
        bound = max(-lo, hi)
        scale = max(bound / ((qmax - qmin) // 2), MIN_SCALE)  # 127: ±bound exact
        zero_point = (qmin + qmax + 1) // 2  # 0 for int8, 128 for uint8
    else:
        scale = max((hi - lo) / (qmax - qmin), MIN_SCALE)
        zero_point = int(np.clip(round(qmin - lo / scale), qmin, qmax))
    return np.float32(scale), np_dtype(zero_point)


def weight_scales(weight: np.ndarray, axis: int = 0, qmax: int = 127) -> np.ndarray:
    """Per-channel symmetric scales along ``axis``: s_c = max|W_c| / qmax (1.0 for a zero
    channel). qmax = 127 is full int8; 63 is the 7-bit "reduced range" (see
    :data:`REDUCED_QMAX`)."""
    reduce_axes = tuple(i for i in range(weight.ndim) if i != axis)
    bound = np.abs(weight).max(axis=reduce_axes) if reduce_axes else np.abs(weight)
    return np.where(bound > 0, bound / qmax, 1.0).astype(np.float32)


def quantize_weight(weight: np.ndarray, scales: np.ndarray, axis: int = 0, qmax: int = 127
                    ) -> np.ndarray:
    """q = clip(round(W / s_c), −qmax, qmax) as int8 (symmetric: −128 unused)."""
    shape = [1] * weight.ndim
    shape[axis] = -1
    return np.clip(np.round(weight / scales.reshape(shape)), -qmax, qmax).astype(np.int8)


# 7-bit weights. x86 u8·s8 integer kernels without VNNI add adjacent products in int16
# (vpmaddubsw), which saturates when both are near 255·127; ONNX Runtime 1.31's fused
# QLinearConv does this on an AVX2 Zen 3 (benchmarks/ort_quirks.py, table 2: stem conv 42.7 dB
# unfused vs 18.2 dB fused; equal on a VNNI Zen 5). Halving the weight range keeps every pair
# sum within int16; mvcompile.machine.auto_weight_bits decides when it is needed.
REDUCED_QMAX = 63


def bias_fits_int32(bias: np.ndarray, input_scale: float, weight_scales: np.ndarray) -> bool:
    """Whether round(b / (s_x·s_w)) fits int32; a bias that does not is left in float."""
    scales = (np.float32(input_scale) * weight_scales).astype(np.float64)
    return bool(np.all(np.abs(np.round(bias.astype(np.float64) / scales)) <= 2**31 - 1))


def quantize_bias(bias: np.ndarray, input_scale: float, weight_scales: np.ndarray) -> tuple[
        np.ndarray, np.ndarray]:
    """int32 bias with scale s_x·s_w[c] and zero point 0, as QLinearConv expects. Divided and
    clipped in float64: in float32, 2³¹ − 1 rounds to 2³¹, which wraps to −2³¹ as int32. A
    bias beyond the int32 range (:func:`bias_fits_int32`; the quantizer keeps such a node in
    float, and QDQ insertion refuses it otherwise) saturates."""
    scales = (np.float32(input_scale) * weight_scales).astype(np.float32)
    exact = np.round(bias.astype(np.float64) / scales.astype(np.float64))
    return np.clip(exact, -(2**31), 2**31 - 1).astype(np.int32), scales
