"""Per-layer sensitivity: how much quantization error each quantized layer adds by itself.

The QDQ model keeps the original float tensor names (a QDQ graph quantizes a tensor after it
is produced). For a quantized node n with output y and activation inputs a_i, let â_i be what
n would read if kept in float: the dequantized tensor when an integer kernel writes a_i (it is
quantized either way), else the float a_i of the quantized graph (n's own input quantization
goes away). One run of each model with those tensors exposed gives

    in(n) = min_i SQNR(a_i, â_i),   out(n) = SQNR(y, ŷ)   [dB]

Kept in float, n's output is still quantized where the next integer layer reads it: that
requantization, r(n) = SQNR(y, DQ(Q(y))) with the scale and zero point of the QuantizeLinear
on y (the 100 dB cap where nothing requantizes y), stays either way. (Nearly: where every
reader of y stays float and only n's integer kernel needed that Q, keeping n in float drops it,
and r(n) then counts noise that would go away.) Independent noises add in
power, so with ⊕ the SQNR of two noises together, a ⊕ b = −10·log10(10^(−a/10) + 10^(−b/10)),

    degradation(n) = (in(n) ⊕ r(n)) − (out(n) ⊕ r(n))   [dB]

the SQNR that the next layer would win back, without the error n inherits from upstream or
the requantization that stays. (Without r, a layer that reads the exact graph input scored
its whole output error, about 60 dB, even though its output is requantized at once.) The
node with the largest degradation is the first to keep in float.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from mvcompile import metrics
from mvcompile.calibration.collect import observation_session
from mvcompile.calibration.data import ImageSet
from mvcompile.calibration.qdq import QuantPlan, can_stay_float, quantizable_nodes
from mvcompile.calibration.registry import QUANTIZERS


@dataclass(frozen=True)
class LayerSensitivity:
    node: str
    op_type: str
    degradation_db: float


def logits(model: ir.Model, images: ImageSet) -> np.ndarray:
    """The model's first output over all images, run as users run it: ORT_ENABLE_ALL, so
    that QDQ pairs are fused into the integer kernels (and their int16 arithmetic)."""
    from mvcompile import onnx_io
    from mvcompile.evaluate import predict

    return predict(onnx_io.to_proto(model).SerializeToString(), images)


def _tensors(model: ir.Model, images: ImageSet, names: list[str]) -> dict[str, np.ndarray]:
    session = observation_session(model, names)
    feed_name = session.get_inputs()[0].name
    chunks: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for batch in images.batches():
        for name, value in zip(names, session.run(names, {feed_name: batch}), strict=True):
            chunks[name].append(value)
    return {n: np.concatenate(v) for n, v in chunks.items()}


def rank_layers(fp32: ir.Model, quantized: ir.Model, plan: QuantPlan, images: ImageSet
                ) -> list[LayerSensitivity]:
    """Quantized nodes that may stay float (:func:`.qdq.can_stay_float`), most sensitive
    first (nodes already kept float are left out). A node's input error is measured on what
    it would read if kept in float (:func:`_kept_input`); the output is compared by name."""
    readers = {n.name: n for n in quantized.graph}
    integer = {n.name for n in quantizable_nodes(fp32.graph, plan)
               if QUANTIZERS[n.op_type].output}
    nodes = []  # (name, op type, [(fp32 input, quantized input)], output)
    for node in quantizable_nodes(fp32.graph, plan):
        if not can_stay_float(node) or node.name not in readers:
            continue
        read = readers[node.name].inputs
        pairs = [(v.name, _kept_input(read[i], integer)) for i, v in enumerate(node.inputs)
                 if v is not None and v.const_value is None and read[i] is not None]
        nodes.append((node.name, node.op_type, pairs, node.outputs[0].name))
    reference = _tensors(fp32, images, sorted({t for _, _, pairs, y in nodes
                                               for t in (*(a for a, _ in pairs), y)}))
    available = {v.name for n in quantized.graph for v in n.outputs} | {
        v.name for v in quantized.graph.inputs}
    observed = _tensors(quantized, images, sorted(
        {t for _, _, pairs, y in nodes for t in (*(b for _, b in pairs), y)} & available))
    outputs = {v.name: v for n in quantized.graph for v in n.outputs}
    ranking = []
    for name, op, pairs, y in nodes:
        if y not in observed:
            continue
        inherited = min((_sqnr(reference, observed, a, b) for a, b in pairs),
                        default=_finite(None))
        requantized = _requantized_sqnr(reference[y], outputs[y])
        gain = (_together(inherited, requantized)
                - _together(_sqnr(reference, observed, y, y), requantized))
        ranking.append(LayerSensitivity(name, op, gain))
    return sorted(ranking, key=lambda s: s.degradation_db, reverse=True)


def _requantized_sqnr(y: np.ndarray, value: ir.Value) -> float:
    """r(n): the SQNR of ``y`` (FP32) through the per-tensor QuantizeLinear that reads
    ``value`` in the quantized graph and back, DQ(Q(y)) = (clip(round(y/s) + z) − z)·s; the
    cap (see :func:`_finite`) where no such QuantizeLinear reads it."""
    q = next((node for node, _ in value.uses() if node.op_type == "QuantizeLinear"), None)
    if q is None or q.inputs[1] is None or q.inputs[1].const_value is None:
        return _finite(None)
    scale = q.inputs[1].const_value.numpy()
    zero = (q.inputs[2].const_value.numpy() if len(q.inputs) > 2 and q.inputs[2] is not None
            and q.inputs[2].const_value is not None else np.zeros((), np.uint8))
    if scale.size != 1 or zero.size != 1 or zero.dtype.kind not in "iu":
        return _finite(None)
    limits = np.iinfo(zero.dtype)
    s, z = float(scale.reshape(())), float(zero.reshape(()))
    codes = np.clip(np.round(y.astype(np.float64) / s) + z, limits.min, limits.max)
    return _finite(metrics.sqnr_db(y, ((codes - z) * s).astype(np.float32)))


def _together(a_db: float, b_db: float) -> float:
    """a ⊕ b: the SQNR of two independent noises of SQNR a and b together (powers add)."""
    return float(-10.0 * np.log10(10.0 ** (-a_db / 10.0) + 10.0 ** (-b_db / 10.0)))


def _kept_input(read: ir.Value, integer: set[str]) -> str:
    """The tensor a node that reads ``read`` (a DQ output) would read if kept in float: the
    same dequantized values when an integer kernel writes the tensor (it is quantized either
    way), else the float tensor before the Q (its own quantization error goes away)."""
    dq = read.producer()
    q = dq.inputs[0].producer() if dq is not None and dq.op_type == "DequantizeLinear" else None
    if q is None or q.op_type != "QuantizeLinear":
        return read.name
    source = q.inputs[0]
    writer = source.producer()
    return read.name if writer is not None and writer.name in integer else source.name


def _sqnr(reference: dict[str, np.ndarray], observed: dict[str, np.ndarray], fp32_name: str,
          quantized_name: str) -> float:
    """SQNR of the quantized graph's tensor against the FP32 one (capped, see _finite);
    the cap when the quantized graph does not have the tensor."""
    if quantized_name not in observed:
        return _finite(None)
    return _finite(metrics.sqnr_db(reference[fp32_name], observed[quantized_name]))


def _finite(value: float | None, cap: float = 100.0) -> float:
    """SQNR of an exact tensor is +inf; cap it so differences stay meaningful."""
    if value is None:
        return cap
    return min(value, cap)
