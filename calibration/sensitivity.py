"""Per-layer sensitivity: how much quantization error each quantized layer adds by itself.

Both the FP32 and the QDQ model keep the original float tensor names (a QDQ graph quantizes a
tensor after it is produced), so one run of each with those tensors exposed gives, for every
quantized node n with activation inputs a_i and output y,

    degradation(n) = min_i SQNR(a_i) − SQNR(y)   [dB]

the SQNR lost inside n itself, without the error it merely inherits from upstream. The node
with the largest degradation is the first to keep in float.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from mvcompile import metrics
from mvcompile.calibration.collect import observation_session
from mvcompile.calibration.data import ImageSet
from mvcompile.calibration.qdq import QuantPlan, quantizable_nodes


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
    """Quantized nodes, most sensitive first (nodes already kept float are left out)."""
    nodes = [(n.name, n.op_type, [v.name for v in n.inputs
                                  if v is not None and v.const_value is None],
              n.outputs[0].name)
             for n in quantizable_nodes(fp32.graph, plan)]
    names = sorted({t for _, _, inputs, y in nodes for t in (*inputs, y)})
    available = {v.name for n in quantized.graph for v in n.outputs} | {
        v.name for v in quantized.graph.inputs}
    names = [n for n in names if n in available]
    reference = _tensors(fp32, images, names)
    observed = _tensors(quantized, images, names)
    sqnr = {n: metrics.sqnr_db(reference[n], observed[n]) for n in names}
    ranking = [LayerSensitivity(node, op, _input_sqnr(sqnr, inputs) - _finite(sqnr.get(y)))
               for node, op, inputs, y in nodes if y in sqnr]
    return sorted(ranking, key=lambda s: s.degradation_db, reverse=True)


def _input_sqnr(sqnr: dict[str, float], inputs: list[str]) -> float:
    """The worst SQNR among a node's activation inputs: the error it inherits."""
    return min((_finite(sqnr.get(name)) for name in inputs), default=_finite(None))


def _finite(value: float | None, cap: float = 100.0) -> float:
    """SQNR of an exact tensor is +inf; cap it so differences stay meaningful."""
    if value is None:
        return cap
    return min(value, cap)
