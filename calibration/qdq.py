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

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from mvcompile import onnx_io
from mvcompile.analysis import inferred_shapes
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


def can_stay_float(node: ir.Node) -> bool:
    """Whether ``node`` may be kept in float among quantized ones: a Conv, Gemm or MatMul
    with a constant weight. Its float weight keeps ONNX Runtime from fusing it into an
    integer kernel, given the per-axis DQ it reads (:func:`_per_axis_dequantize`). Integer
    elementwise kernels (QLinearAdd, QLinearMul, ...) would take that DQ all the same, and
    ONNX Runtime then refuses the model (their scales must be scalars)."""
    return (node.op_type in ("Conv", "Gemm", "MatMul") and len(node.inputs) > 1
            and node.inputs[1] is not None and node.inputs[1].const_value is not None)


def quantizable_nodes(graph: ir.Graph, plan: QuantPlan) -> list[ir.Node]:
    """Nodes the plan quantizes, in graph order: float32 ones (an Add, Mul or Concat of int64
    shape arithmetic is not quantized; QuantizeLinear takes float input) that do not write a
    Softmax's input (:func:`_feeds_softmax`)."""
    return [n for n in graph if n.op_type in plan.op_types and n.op_type in QUANTIZERS
            and n.domain in ("", "ai.onnx") and n.name not in plan.keep_float
            and _float_node(n) and not _feeds_softmax(n)]


def _feeds_softmax(node: ir.Node) -> bool:
    """Whether a Softmax reads ``node``'s output. Softmax stays float, and its input must not
    be dequantized from an integer kernel: with a Q after it (the P·V MatMul's), ONNX Runtime
    fuses DQ → Softmax → Q into QLinearSoftmax, which gives 0 instead of 1 over a single
    element (one token per patch group: XXS at 64² without passes fell to 6 dB SQNR)."""
    return any(use.node.op_type == "Softmax" for out in node.outputs for use in out.uses())


def _float_node(node: ir.Node) -> bool:
    """Whether ``node`` computes in float32, by the type of its output (or of its first input
    where the output's is not known); True where neither is known."""
    known = [v.dtype for v in (node.outputs[0], node.inputs[0] if node.inputs else None)
             if v is not None and v.dtype is not None]
    return not known or known[0] == ir.DataType.FLOAT


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
    """Rewrite ``model`` in place; returns counts of what was inserted. Nodes whose bias
    int32 cannot hold should be in ``plan.keep_float`` (:func:`overflowing_biases`)."""
    graph = model.graph
    counts = {"activations": 0, "weights": 0, "biases": 0, "nodes": 0}
    act_params = _activation_params(ranges, plan)
    weight_cache: dict[tuple[str, int], tuple[ir.Value, np.ndarray]] = {}
    activations = plan_tensors(graph, plan)  # before weights turn into DQ outputs
    integer = {n.name for n in quantizable_nodes(graph, plan) if QUANTIZERS[n.op_type].output}
    shapes = functools.cache(lambda: _non_batch_shapes(model))
    for node in quantizable_nodes(graph, plan):
        _quantize_node(graph, node, plan, act_params, weight_cache, counts)
    for value in activations:
        if value.name not in act_params:
            raise KeyError(f"no calibrated range for {value.name}")
        if _quantize_activation(graph, value, act_params[value.name],
                                _FloatReaders(plan.keep_float, integer, shapes)):
            counts["activations"] += 1
    return counts


@dataclass(frozen=True)
class _FloatReaders:
    """What :func:`_quantize_activation` needs to keep float nodes float: their names, the
    nodes whose integer kernels need a Q as their output's only reader, and every value's
    static shape (inferred once, when a value's own shape is unknown)."""

    float_nodes: set[str]
    integer_nodes: set[str]
    shapes: Callable[[], dict[str, list[int]]]

    def per_axis(self, value: ir.Value) -> tuple[int, int] | None:
        """(axis, size) for a per-axis DQ of ``value``: its last axis past the first (the
        batch) that is static and longer than 1 (ORT takes a scale of one element for a
        scalar); None if there is none."""
        dims = list(value.shape) if value.shape is not None else []
        if not all(isinstance(d, int) for d in dims[1:]):
            dims = []
        dims = dims or self.shapes().get(value.name, [])
        return next(((axis, size) for axis, size in reversed(list(enumerate(dims)))
                     if axis > 0 and isinstance(size, int) and size > 1), None)


def _non_batch_shapes(model: ir.Model) -> dict[str, list[int]]:
    """Every value's inferred shape when the graph inputs are static past the first axis (so
    that only the batch, axis 0, is inferred at a stand-in size); {} otherwise."""
    if any(value.shape is None or not all(isinstance(d, int) for d in list(value.shape)[1:])
           for value in model.graph.inputs):
        return {}
    return inferred_shapes(onnx_io.to_proto(model))


def _activation_params(ranges: dict[str, Range], plan: QuantPlan
                       ) -> dict[str, tuple[np.float32, np.integer]]:
    return {name: qparams.quant_params(*r, plan.activation_dtype, plan.symmetric_activations)
            for name, r in ranges.items()}


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
        if not qparams.bias_fits_int32(node.inputs[index].const_value.numpy(), input_scale,
                                       weight_scales):  # it would saturate, sign flipped
            raise ValueError(f"biases beyond int32 at s_x·s_w: keep {node.name!r} in float "
                             "(overflowing_biases)")
        node.replace_input_with(index, _quantized_bias(graph, node, index, input_scale,
                                                       weight_scales))
        counts["biases"] += 1
    counts["nodes"] += 1


def overflowing_biases(graph: ir.Graph, ranges: dict[str, Range], plan: QuantPlan
                       ) -> list[str]:
    """Nodes the plan would quantize whose bias int32 cannot hold at s_x·s_w (a tiny input
    range with large biases): the caller keeps them in float (:func:`_bias_overflows`)."""
    act_params = _activation_params(ranges, plan)
    names = []
    for node in quantizable_nodes(graph, plan):
        roles = _roles(node)
        if _bias_overflows(node, roles, _input_scale(node, roles, act_params), plan.weight_qmax):
            names.append(node.name)
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
    weight_index, weight_role = next(
        ((i, r) for i, r in roles.items() if isinstance(r, Weight)), (None, None))
    bias = next((i for i, r in roles.items() if r == BIAS), None)
    if weight_index is None or bias is None or input_scale is None:
        return False
    array = node.inputs[weight_index].const_value.numpy().astype(np.float32)
    scales = _weight_scales(array, _weight_axis(node, weight_role), qmax)
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


# Ops across which ONNX Runtime's QDQ propagation moves a per-tensor DequantizeLinear (and
# Identity, which it removes): a DQ before them reaches the node after them.
_DQ_PASSES = frozenset({"MaxPool", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Slice",
                        "Identity"})


def _quantize_activation(graph: ir.Graph, value: ir.Value,
                         params: tuple[np.float32, np.integer], readers: _FloatReaders) -> bool:
    """value → Q → one DQ per consumer (ORT fuses best when each DQ has a single consumer);
    False, and nothing inserted, when no quantized node reads ``value`` and either it is a
    graph output or no quantized node writes it for a float reader.

    Graph outputs stay float: Q/DQ on the logits would clip any logit beyond the calibrated
    range to its edge and round the rest to steps of the scale, for no speed (ONNX Runtime
    runs DQ → Gemm with a float output as one QGemm).

    Readers whose DQ would reach only nodes kept in float (directly or across
    :data:`_DQ_PASSES`) must not get a per-tensor DQ: ONNX Runtime would fuse DQ → Conv/Gemm
    (float weights) → Q into an integer kernel after all (its WeightBiasQuantization), or a
    DQ → Add → Q into QLinearAdd. They read ``value`` itself, unless a quantized node writes
    it: its integer kernel needs every reader to be a Q, so they read a per-axis DQ instead
    (the same scale repeated), which ORT neither fuses nor moves.
    """
    uses = list(value.uses())
    to_float = [u for u in uses if _reaches_only_float(u.node, readers.float_nodes)]
    to_int = [u for u in uses if u not in to_float]
    producer = value.producer()
    written_by_integer = producer is not None and producer.name in readers.integer_nodes
    if not to_int and (value.is_graph_output() or not (written_by_integer and to_float)):
        return False
    q_node = _insert_quantize(graph, value, params)
    for i, use in enumerate(to_int):
        dq = ir.Node("", "DequantizeLinear", [q_node.outputs[0], *q_node.inputs[1:]],
                     name=f"{value.name}_dq{i}",
                     outputs=[ir.Value(name=f"{value.name}_dequantized{i}")])
        graph.insert_after(q_node, dq)
        use.node.replace_input_with(use.idx, dq.outputs[0])
    if written_by_integer:
        for use in to_float:
            dq = _per_axis_dequantize(graph, q_node, value, params, readers.per_axis(value),
                                      use.node.name)
            use.node.replace_input_with(use.idx, dq)
    return True


def _insert_quantize(graph: ir.Graph, value: ir.Value, params: tuple[np.float32, np.integer]
                     ) -> ir.Node:
    """Q(value) with per-tensor (scale, zero point) ``params``, right after its producer."""
    scale, zero_point = params
    s = _initializer(graph, f"{value.name}_scale", np.asarray(scale, np.float32))
    z = _initializer(graph, f"{value.name}_zero_point", np.asarray(zero_point))
    q_node = ir.Node("", "QuantizeLinear", [value, s, z], name=f"{value.name}_q",
                     outputs=[ir.Value(name=f"{value.name}_quantized")])
    producer = value.producer()
    if producer is None:
        graph.insert_before(graph.node(0), q_node)
    else:
        graph.insert_after(producer, q_node)
    return q_node


def _reaches_only_float(node: ir.Node, float_nodes: set[str], depth: int = 0) -> bool:
    """Whether a DQ that ``node`` reads ends, in ONNX Runtime, only at nodes kept in float:
    ``node`` is one, or passes DQs on (:data:`_DQ_PASSES`) to readers that all are."""
    if node.name in float_nodes:
        return True
    if node.op_type not in _DQ_PASSES or depth > 16 or len(node.outputs) != 1:
        return False
    out = node.outputs[0]
    readers = [u.node for u in out.uses()]
    return (bool(readers) and not out.is_graph_output()
            and all(_reaches_only_float(r, float_nodes, depth + 1) for r in readers))


def _per_axis_dequantize(graph: ir.Graph, q_node: ir.Node, value: ir.Value,
                         params: tuple[np.float32, np.integer],
                         axis_size: tuple[int, int] | None, reader: str) -> ir.Value:
    """DQ(Q(value)) with the scale and zero point repeated along ``axis_size`` = (axis, its
    size > 1): the same numbers as the per-tensor DQ, in a form that ONNX Runtime's QDQ
    fusions and propagation (per-tensor only) leave alone. Per tensor, logged, if None."""
    scale, zero_point = params
    if axis_size is None:
        log.warning("%s reads %s through a per-tensor DQ (no static axis longer than 1): ONNX "
                    "Runtime may run it as an integer kernel", reader, value.name)
    shape = () if axis_size is None else (axis_size[1],)
    s = _initializer(graph, f"{value.name}_scale_for_{reader}", np.full(shape, scale, np.float32))
    z = _initializer(graph, f"{value.name}_zero_point_for_{reader}",
                     np.full(shape, zero_point, np.asarray(zero_point).dtype))
    attributes = {} if axis_size is None else {"axis": ir.AttrInt64("axis", axis_size[0])}
    dq = ir.Node("", "DequantizeLinear", [q_node.outputs[0], s, z], attributes=attributes,
                 name=f"{value.name}_dq_for_{reader}",
                 outputs=[ir.Value(name=f"{value.name}_dequantized_for_{reader}")])
    graph.insert_after(q_node, dq)
    return dq.outputs[0]


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
