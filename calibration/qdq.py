"""QuantizeLinear/DequantizeLinear (QDQ) insertion: the calibrated FP32 graph → an INT8 graph.

For an activation tensor x with range [lo, hi] → (s, z) (:func:`.qparams.quant_params`):

    x  →  Q(x) = clip(round(x/s) + z)  →  DQ(q) = (q − z)·s  →  every consumer

For a weight W (per channel c along the op's weight axis) and a bias b:

    W_q = clip(round(W/s_c), −127, 127) (int8),  b_q = round(b / (s_x·s_c)) (int32)

stored as initializers feeding DequantizeLinear. ONNX Runtime fuses DQ → Conv/MatMul/Gemm → Q
into integer kernels; the Core ML backend reads the same graph.

The work is split into :func:`plan_tensors` (which activations need ranges, used by the
observation phase) and :func:`insert_qdq` (the rewrite).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace

import numpy as np
import onnx_ir as ir

from mvcompile.calibration import qparams
from mvcompile.calibration.registry import ACTIVATION, BIAS, QUANTIZERS, Weight

log = logging.getLogger(__name__)

Range = tuple[float, float]


@dataclass
class QuantPlan:
    """What to quantize: op types, nodes kept in float, and the activation format."""

    op_types: frozenset[str]
    keep_float: set[str] = field(default_factory=set)
    activation_dtype: str = "uint8"  # or "int8" (symmetric)
    weight_qmax: int = 127  # 63: 7-bit weights, see qparams.REDUCED_QMAX

    @property
    def symmetric_activations(self) -> bool:
        return self.activation_dtype == "int8"


def quantizable_nodes(graph: ir.Graph, plan: QuantPlan) -> list[ir.Node]:
    """Nodes the plan quantizes, in graph order."""
    return [n for n in graph if n.op_type in plan.op_types and n.op_type in QUANTIZERS
            and n.domain in ("", "ai.onnx") and n.name not in plan.keep_float]


# ORT fuses DQ → Add/Mul → Q into QLinearAdd/QLinearMul only when every operand is
# dequantized, so a constant operand (a bias, a scale) is stored as uint8 with its own range.
_ELEMENTWISE = {"Add", "Mul"}
CONSTANT = "constant"


def _roles(node: ir.Node) -> dict[int, object]:
    """Input roles of ``node``; a MatMul input that is not a constant is an activation."""
    roles = dict(QUANTIZERS[node.op_type].inputs)
    for index, role in list(roles.items()):
        if index >= len(node.inputs) or node.inputs[index] is None:
            del roles[index]
        elif isinstance(role, Weight) and node.inputs[index].const_value is None:
            roles[index] = ACTIVATION
        elif node.op_type == "Concat" and index == 1:
            roles.update({i: ACTIVATION for i in range(1, len(node.inputs))})
    if node.op_type in _ELEMENTWISE:
        roles.update({i: CONSTANT for i, role in roles.items()
                      if role == ACTIVATION and node.inputs[i].const_value is not None})
    return roles


def plan_tensors(graph: ir.Graph, plan: QuantPlan) -> list[ir.Value]:
    """Every activation tensor that needs a calibrated range, in first-seen order."""
    seen: dict[str, ir.Value] = {}
    for node in quantizable_nodes(graph, plan):
        for index, role in _roles(node).items():
            value = node.inputs[index]
            if role == ACTIVATION and value.const_value is None:
                seen.setdefault(value.name, value)
        if QUANTIZERS[node.op_type].output:
            seen.setdefault(node.outputs[0].name, node.outputs[0])
    return list(seen.values())


def insert_qdq(model: ir.Model, ranges: dict[str, Range], plan: QuantPlan) -> dict[str, int]:
    """Rewrite ``model`` in place; returns counts of what was inserted."""
    graph = model.graph
    counts = {"activations": 0, "weights": 0, "biases": 0, "nodes": 0}
    act_params = {name: qparams.quant_params(*r, plan.activation_dtype,
                                             plan.symmetric_activations)
                  for name, r in ranges.items()}
    plan = replace(plan, keep_float=plan.keep_float | _overflowing_biases(graph, plan, act_params))
    weight_cache: dict[tuple[str, int], tuple[ir.Value, np.ndarray]] = {}
    activations = plan_tensors(graph, plan)  # before weights turn into DQ outputs
    for node in quantizable_nodes(graph, plan):
        _quantize_node(graph, node, plan, act_params, weight_cache, counts)
    for value in activations:
        if value.name not in act_params:
            raise KeyError(f"no calibrated range for {value.name}")
        if _quantize_activation(graph, value, *act_params[value.name], plan.keep_float):
            counts["activations"] += 1
    return counts


def _quantize_node(graph: ir.Graph, node: ir.Node, plan: QuantPlan, act_params: dict,
                   weight_cache: dict, counts: dict[str, int]) -> None:
    """Weights → DQ(int8), constant operands → DQ(uint8), the bias → DQ(int32)."""
    roles = _roles(node)
    input_scale = _input_scale(node, roles, act_params)
    weight_scales = None
    for index, role in roles.items():
        if isinstance(role, Weight):
            axis = _weight_axis(node, role)
            dq, weight_scales = _quantized_weight(graph, node, index, axis, weight_cache,
                                                  plan.weight_qmax)
            node.replace_input_with(index, dq)
            counts["weights"] += 1
    for index, role in roles.items():
        if role == CONSTANT:
            node.replace_input_with(index, _quantized_constant(graph, node, index, plan))
    index = next((i for i, r in roles.items() if r == BIAS), None)
    if index is not None and input_scale is not None and _per_channel_bias(
            node, index, weight_scales):
        node.replace_input_with(index, _quantized_bias(graph, node, index, input_scale,
                                                       weight_scales))
        counts["biases"] += 1
    counts["nodes"] += 1


def _overflowing_biases(graph: ir.Graph, plan: QuantPlan, act_params: dict) -> set[str]:
    """Nodes whose bias int32 cannot hold at s_x·s_w (a tiny input range with large
    biases): they stay in float, logged."""
    names = set()
    for node in quantizable_nodes(graph, plan):
        roles = _roles(node)
        if _bias_overflows(node, roles, _input_scale(node, roles, act_params), plan.weight_qmax):
            log.warning("%s stays float: its bias exceeds int32 at scale s_x·s_w", node.name)
            names.add(node.name)
    return names


def _input_scale(node: ir.Node, roles: dict, act_params: dict) -> float | None:
    value = node.inputs[0]
    if roles.get(0) == ACTIVATION and value.name in act_params:
        return float(act_params[value.name][0])
    return None


def _weight_axis(node: ir.Node, role: Weight) -> int | None:
    """The output-channel axis of the weight (Gemm with transB=0 stores [in, out]), or None
    for per-tensor."""
    if role.axis is None:
        return None
    if node.op_type == "Gemm":
        trans_b = node.attributes.get("transB")
        return 0 if trans_b is not None and trans_b.value else 1
    rank = len(node.inputs[1].const_value.shape)
    return role.axis % rank


def _quantized_weight(graph: ir.Graph, node: ir.Node, index: int, axis: int | None,
                      cache: dict, qmax: int) -> tuple[ir.Value, np.ndarray]:
    """DQ(int8 W, per-channel scales) for input ``index``; shared weights quantize once."""
    value = node.inputs[index]
    key = (value.name, axis)
    if key not in cache:
        # a weight read along two axes (Gemm transB=0 and 1) gets one DQ per axis
        other_axis = any(name == value.name for name, _ in cache)
        name = f"{value.name}_quantized" + (f"_axis{axis}" if other_axis else "")
        weight = value.const_value.numpy().astype(np.float32)
        scales = _weight_scales(weight, axis, qmax)
        if axis is None:  # per tensor: one scale, broadcast as a 0-d tensor
            q = qparams.quantize_weight(weight.reshape(1, -1), scales.reshape(1), 0, qmax)
            q = q.reshape(weight.shape)
        else:
            q = qparams.quantize_weight(weight, scales, axis, qmax)
        zero = np.zeros_like(scales, dtype=np.int8)
        dq = _dequantize(graph, node, name, q, scales, zero, axis or 0)
        cache[key] = (dq, scales)
    return cache[key]


def _weight_scales(weight: np.ndarray, axis: int | None, qmax: int) -> np.ndarray:
    """Per-channel scales along ``axis``, or for ``axis`` None one per-tensor scale (0-d)."""
    if axis is None:
        return qparams.weight_scales(weight.reshape(1, -1), 0, qmax).reshape(())
    return qparams.weight_scales(weight, axis, qmax)


def _quantized_constant(graph: ir.Graph, node: ir.Node, index: int, plan: QuantPlan
                        ) -> ir.Value:
    """DQ of a constant activation-like operand, quantized per tensor over its own range."""
    value = node.inputs[index]
    array = value.const_value.numpy().astype(np.float32)
    scale, zero = qparams.quant_params(float(array.min()), float(array.max()),
                                       plan.activation_dtype, plan.symmetric_activations)
    info = np.iinfo(zero.dtype)
    q = np.clip(np.round(array / scale) + int(zero), info.min, info.max).astype(zero.dtype)
    return _dequantize(graph, node, f"{value.name}_quantized_{node.name}", q,
                       np.asarray(scale), np.asarray(zero), 0)


def _per_channel_bias(node: ir.Node, index: int, weight_scales: np.ndarray | None) -> bool:
    """Whether input ``index`` is a constant bias that int32 at s_x·s_w fits: one entry per
    output channel ([N], or Gemm's [1, N]), or any shape under a per-tensor weight scale.
    Another Gemm C ([M, 1], [M, N]) stays float."""
    value = node.inputs[index] if index < len(node.inputs) else None
    if weight_scales is None or value is None or value.const_value is None:
        return False
    shape = tuple(value.const_value.shape)
    return weight_scales.ndim == 0 or shape in ((weight_scales.size,), (1, weight_scales.size))


def _bias_overflows(node: ir.Node, roles: dict, input_scale: float | None, qmax: int) -> bool:
    """Whether ``node`` has a per-channel bias that int32 cannot hold at s_x·s_w. Such a node
    is left in float altogether: given a float bias between a DQ input and a Q output, ONNX
    Runtime's WeightBiasQuantization casts b / (s_x·s_w) to int32 itself, which overflows,
    and the fused QLinearConv/QGemm loses the bias."""
    weight = next(((i, r) for i, r in roles.items() if isinstance(r, Weight)), None)
    bias = next((i for i, r in roles.items() if r == BIAS), None)
    if weight is None or bias is None or input_scale is None:
        return False
    array = node.inputs[weight[0]].const_value.numpy().astype(np.float32)
    scales = _weight_scales(array, _weight_axis(node, weight[1]), qmax)
    return (_per_channel_bias(node, bias, scales)
            and not qparams.bias_fits_int32(node.inputs[bias].const_value.numpy(), input_scale,
                                            scales))


def _quantized_bias(graph: ir.Graph, node: ir.Node, index: int, input_scale: float,
                    weight_scales: np.ndarray) -> ir.Value:
    value = node.inputs[index]
    bias = value.const_value.numpy().astype(np.float32)
    q, scales = qparams.quantize_bias(bias, input_scale, weight_scales)
    # per channel along the bias's last axis: [N] for Conv and Gemm, or Gemm's [1, N]
    return _dequantize(graph, node, f"{value.name}_quantized_{node.name}", q, scales,
                       np.zeros(scales.shape, np.int32), q.ndim - 1 if q.ndim else 0)


def _dequantize(graph: ir.Graph, before: ir.Node, name: str, q: np.ndarray, scale: np.ndarray,
                zero_point: np.ndarray, axis: int) -> ir.Value:
    """Register (q, scale, zp) as initializers and insert DQ before ``before``."""
    inputs = [_initializer(graph, name, q), _initializer(graph, f"{name}_scale", scale),
              _initializer(graph, f"{name}_zero_point", zero_point)]
    attrs = {"axis": ir.AttrInt64("axis", axis)} if scale.ndim else {}
    node = ir.Node("", "DequantizeLinear", inputs, attributes=attrs, name=f"{name}_dq",
                   outputs=[ir.Value(name=f"{name}_dequantized")])
    graph.insert_before(before, node)
    return node.outputs[0]


def _quantize_activation(graph: ir.Graph, value: ir.Value, scale: np.float32,
                         zero_point: np.integer, float_readers: set[str]) -> bool:
    """value → Q → one DQ per consumer (ORT fuses best when each DQ has a single consumer);
    False, and nothing inserted, when every consumer is in ``float_readers``.

    Nodes kept in float (``float_readers``) read ``value`` itself. A DQ input would put them
    between a DQ and a Q (that of their quantized consumer), which ONNX Runtime's
    WeightBiasQuantization fuses into an integer kernel, weights quantized after all.
    """
    uses = [u for u in value.uses() if u.node.name not in float_readers]
    if not uses and not value.is_graph_output():
        return False
    s = _initializer(graph, f"{value.name}_scale", np.asarray(scale, np.float32))
    z = _initializer(graph, f"{value.name}_zero_point", np.asarray(zero_point))
    q_node = ir.Node("", "QuantizeLinear", [value, s, z], name=f"{value.name}_q",
                     outputs=[ir.Value(name=f"{value.name}_quantized")])
    producer = value.producer()
    if producer is None:
        graph.insert_before(graph.node(0), q_node)
    else:
        graph.insert_after(producer, q_node)
    consumers = [(u.node, u.idx) for u in uses]
    if value.is_graph_output():
        consumers.append((None, None))
    for i, (consumer, index) in enumerate(consumers):
        dq = ir.Node("", "DequantizeLinear", [q_node.outputs[0], s, z],
                     name=f"{value.name}_dq{i}",
                     outputs=[ir.Value(name=f"{value.name}_dequantized{i}")])
        graph.insert_after(q_node, dq)
        if consumer is None:
            _reroute_graph_output(graph, value, dq.outputs[0])
        else:
            consumer.replace_input_with(index, dq.outputs[0])
    return True


def _reroute_graph_output(graph: ir.Graph, value: ir.Value, replacement: ir.Value) -> None:
    """Make the dequantized tensor the graph output, keeping the output's name."""
    position = list(graph.outputs).index(value)
    name = value.name
    value.name = f"{name}_float"
    replacement.name = name
    replacement.shape, replacement.type = value.shape, value.type
    graph.outputs[position] = replacement


def _initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    """A new initializer; ``name`` gets a numeric suffix if the graph already uses it."""
    base, suffix = name, 1
    while name in graph.initializers:
        name, suffix = f"{base}_{suffix}", suffix + 1
    value = ir.Value(name=name, shape=ir.Shape(array.shape),
                     type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                     const_value=ir.tensor(array, name=name))
    graph.register_initializer(value)
    return value
