"""Static figures of any ONNX model: parameters, MACs, op histogram, input/output shapes.

MACs come from shapes inferred by ONNX shape inference with every symbolic input dimension set
to 1 (batch 1):

- Conv-like ops: MACs = |Y| · (C_in/groups) · k_h · k_w, i.e. output elements times the
  weight's elements per output channel;
- MatMul-like ops: MACs = |Y| · K, K the contracted dimension;
- Gemm: MACs = M · N · K;
- com.microsoft.Attention and QAttention: the Q/K/V projections plus Q·Kᵀ and P·V (see
  ``_attention_macs``);
- ConvTranspose: |X| · (C_out/groups) · k_h · k_w;
- Einsum: output elements times the sizes of the summed letters.

The integer ops of QOperator INT8 models (QLinearConv, ConvInteger, QLinearMatMul,
MatMulInteger, com.microsoft QGemm, DynamicQuantizeMatMul, MatMulIntegerToFloat, MatMulNBits,
QAttention) count as their float counterparts, so a quantized model has the MACs of the float
model it came from. A node whose MACs cannot be counted, because its shapes are unknown or
because it does matrix work that has no rule here (recurrent ops, ai.onnx Attention, ...), is
reported by name instead of counting 0.

Parameters are the elements of the initializers of rank ≥ 1 that are floating point, or that a
quantized op reads as a quantized tensor: the int8/int32 input of DequantizeLinear (QDQ
models), and the weights and biases of QLinearConv, QLinearMatMul, QGemm, ConvInteger,
MatMulInteger, ... (QOperator models; a MatMulNBits weight counts its K · N unpacked
elements). Not parameters, in either format: the scales and zero points of every quantized op
(so a per-channel scale vector is not one), including the weight scale that quantize_dynamic
multiplies with a DynamicQuantizeLinear's scale, BatchNorm running statistics (buffers), integer
shape/axes initializers and scalar constants. A model quantized in either format therefore has
the parameter count of its float model.
"""

from __future__ import annotations

import collections
import logging
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper, shape_inference

log = logging.getLogger(__name__)

# op type -> index of its weight input, for conv-like ops.
_CONV_WEIGHT_INPUT = {"Conv": 1, "ConvInteger": 1, "QLinearConv": 3, "FusedConv": 1,
                      "NhwcFusedConv": 1}
# op type -> (index of A, index of B) for matmul-like ops.
_MATMUL_INPUTS = {"MatMul": (0, 1), "MatMulInteger": (0, 1), "QLinearMatMul": (0, 3),
                  "FusedMatMul": (0, 1), "DynamicQuantizeMatMul": (0, 1),
                  "MatMulIntegerToFloat": (0, 1), "MatMulNBits": (0, 1)}
# Gemm-like ops: MACs = M · N · K, with transA.
_GEMM_OPS = {"Gemm", "FusedGemm", "QGemm"}
# Ops that do matrix work with no MAC rule here: reported as unknown rather than counted 0.
_UNCOUNTED_OPS = {"RNN", "GRU", "LSTM", "DynamicQuantizeLSTM", "Attention",
                  "MultiHeadAttention", "GroupQueryAttention", "DeformConv",
                  "QLinearConvTranspose", "ConvTransposeWithDynamicPads"}
# Quantized ops: op type -> (indices of the inputs that are quantized or float tensors, whose
# initializers are parameters; indices of the scale and zero-point inputs, which are not).
_QUANTIZED_INPUTS: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "QuantizeLinear": ((0,), (1, 2)),
    "DequantizeLinear": ((0,), (1, 2)),
    "QLinearConv": ((0, 3, 8), (1, 2, 4, 5, 6, 7)),
    "QLinearMatMul": ((0, 3), (1, 2, 4, 5, 6, 7)),
    "QGemm": ((0, 3, 6), (1, 2, 4, 5, 7, 8)),
    "ConvInteger": ((0, 1), (2, 3)),
    "MatMulInteger": ((0, 1), (2, 3)),
    "DynamicQuantizeMatMul": ((0, 1, 4), (2, 3)),
    "MatMulIntegerToFloat": ((0, 1, 6), (2, 3, 4, 5)),
    "MatMulNBits": ((0, 1, 5), (2, 3, 4)),  # 4 is g_idx, an index table
    "QAttention": ((0, 1, 2), (3, 4, 6, 7)),
    "QLinearAdd": ((0, 3), (1, 2, 4, 5, 6, 7)),
    "QLinearMul": ((0, 3), (1, 2, 4, 5, 6, 7)),
}
_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
                onnx.TensorProto.BFLOAT16}


@dataclass
class ModelSummary:
    """What ``mvcompile info`` prints."""

    parameters: int
    macs: int
    macs_unknown_nodes: list[str]
    op_histogram: dict[str, int]
    inputs: list[tuple[str, list[int | str]]]
    outputs: list[tuple[str, list[int | str]]]
    opsets: dict[str, int]
    ir_version: int
    node_count: int = field(default=0)


def summarize(model: onnx.ModelProto) -> ModelSummary:
    macs, unknown = count_macs(model)
    return ModelSummary(
        parameters=count_parameters(model),
        macs=macs,
        macs_unknown_nodes=unknown,
        op_histogram=op_histogram(model),
        inputs=[(v.name, value_dims(v)) for v in graph_inputs(model)],
        outputs=[(v.name, value_dims(v)) for v in model.graph.output],
        opsets={(o.domain or "ai.onnx"): o.version for o in model.opset_import},
        ir_version=model.ir_version,
        node_count=len(model.graph.node),
    )


def op_key(domain: str, op_type: str) -> str:
    """An op's name in histograms: ``op_type`` for ONNX's own ops, ``domain.op_type`` for
    others (``com.microsoft.Attention`` is not opset-23 ``Attention``)."""
    return f"{domain}.{op_type}" if domain not in ("", "ai.onnx") else op_type


def op_histogram(model: onnx.ModelProto) -> dict[str, int]:
    """{op type: count}, most frequent first; non-default domains are prefixed (:func:`op_key`)."""
    counts = collections.Counter(op_key(n.domain, n.op_type) for n in model.graph.node)
    return dict(counts.most_common())


def count_parameters(model: onnx.ModelProto) -> int:
    """Elements of weight initializers: float ones, and the integer tensors that quantized ops
    read as weights or biases (DequantizeLinear's input in QDQ models; QLinearConv's, QGemm's,
    MatMulInteger's, ... in QOperator models); not BN statistics, shapes, or the scales and
    zero points of any quantized op. See the module docstring."""
    nodes = list(all_nodes(model.graph))
    excluded = {name for n in nodes if n.op_type == "BatchNormalization"
                for name in n.input[3:5]}
    quantized: set[str] = set()
    unpacked: dict[str, int] = {}  # MatMulNBits weight -> its K · N unpacked elements
    for node in nodes:
        tensors, qparams = _quantized_inputs(node)
        quantized |= {node.input[i] for i in tensors if i < len(node.input)}
        excluded |= {node.input[i] for i in qparams if i < len(node.input)}
        if node.op_type == "MatMulNBits" and len(node.input) > 1:
            k, n = int(_attr(node, "K", 0)), int(_attr(node, "N", 0))
            if k and n:
                unpacked[node.input[1]] = k * n
    # quantize_dynamic's rescale: Mul(DynamicQuantizeLinear's scale, the weight's scale).
    dynamic_scales = {n.output[1] for n in nodes
                      if n.op_type == "DynamicQuantizeLinear" and len(n.output) > 1}
    excluded |= {name for n in nodes
                 if n.op_type == "Mul" and dynamic_scales & set(n.input) for name in n.input}
    excluded.discard("")
    return sum(
        unpacked.get(init.name, int(np.prod(init.dims)))
        for init in constant_tensors(model.graph, nodes)
        if (init.data_type in _FLOAT_TYPES or init.name in quantized)
        and len(init.dims) >= 1 and init.name not in excluded
    )


def all_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    """The nodes of ``graph`` and, depth first, of the subgraphs of its If, Loop and Scan
    nodes (TorchScript exports have them)."""
    for node in graph.node:
        yield node
        for sub in _subgraphs(node):
            yield from all_nodes(sub)


def _subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    return [g for a in node.attribute for g in
            ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs))]


def constant_tensors(graph: onnx.GraphProto, nodes: list[onnx.NodeProto]
                    ) -> Iterator[onnx.TensorProto]:
    """The initializers of ``graph`` and its subgraphs, and the tensors of the Constant nodes
    among ``nodes`` (some exporters store weights so), named as the Constant's output."""
    yield from graph.initializer
    for node in nodes:
        for sub in _subgraphs(node):
            yield from sub.initializer
    for node in nodes:
        value = next((a.t for a in node.attribute if a.name == "value"
                      and a.type == onnx.AttributeProto.TENSOR), None)
        if node.op_type == "Constant" and value is not None and node.output:
            tensor = onnx.TensorProto()
            tensor.CopyFrom(value)
            tensor.name = node.output[0]
            yield tensor


def _quantized_inputs(node: onnx.NodeProto) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(input indices of ``node`` that are tensors, input indices that are scales or zero
    points); both empty for ops that are not quantized."""
    if node.op_type == "QLinearConcat":  # Y_scale, Y_zero_point, then (X, scale, zero point)*
        indices = range(2, len(node.input))
        return (tuple(i for i in indices if (i - 2) % 3 == 0),
                (0, 1, *(i for i in indices if (i - 2) % 3)))
    return _QUANTIZED_INPUTS.get(node.op_type, ((), ()))


def count_macs(model: onnx.ModelProto) -> tuple[int, list[str]]:
    """(MACs at the inputs' static batch, 1 where it is symbolic; names of the conv/matmul
    nodes whose MACs could not be counted: shapes not inferred, or no rule for the op)."""
    shapes = inferred_shapes(model)
    total, unknown = 0, []
    for node in model.graph.node:
        macs = None if _has_matrix_work(node) else _node_macs(node, shapes)
        if macs is None:
            unknown.append(node.name or node.op_type)
        else:
            total += macs
    return total, unknown


def _has_matrix_work(node: onnx.NodeProto) -> bool:
    """Whether a subgraph of ``node`` (If, Loop, Scan) holds a conv or matmul: its MACs
    depend on the branch taken or the trip count, so they are reported as not counted."""
    return any(_node_macs(n, {}) is None for sub in _subgraphs(node) for n in all_nodes(sub))


def _node_macs(node: onnx.NodeProto, shapes: dict[str, list[int]]) -> int | None:
    """MACs of one node; 0 for ops that are not conv/matmul; None if shapes are unknown or
    the op does matrix work that has no rule here."""
    out = shapes.get(node.output[0]) if node.output else None
    if node.op_type in _CONV_WEIGHT_INPUT:
        weight = shapes.get(node.input[_CONV_WEIGHT_INPUT[node.op_type]])
        if out is None or weight is None:
            return None
        return int(np.prod(out)) * int(np.prod(weight[1:]))
    if node.op_type == "ConvTranspose":
        x, weight = shapes.get(node.input[0]), shapes.get(node.input[1])
        if x is None or weight is None:
            return None
        return int(np.prod(x)) * int(np.prod(weight[1:]))
    if node.op_type in _MATMUL_INPUTS or node.op_type in _GEMM_OPS:
        a = shapes.get(node.input[_MATMUL_INPUTS.get(node.op_type, (0, 1))[0]])
        if out is None or a is None:
            return None
        return int(np.prod(out)) * (a[-2] if _attr(node, "transA", 0) else a[-1])
    if (node.op_type == "Attention" and node.domain == "com.microsoft"
            or node.op_type == "QAttention"):
        return _attention_macs(node, shapes)
    if node.op_type == "Einsum":
        return _einsum_macs(node, shapes, out)
    if node.op_type in _UNCOUNTED_OPS:
        return None
    return 0


def _attr(node: onnx.NodeProto, name: str, default: object) -> object:
    found = next((a for a in node.attribute if a.name == name), None)
    return default if found is None else onnx.helper.get_attribute_value(found)


def _attention_macs(node: onnx.NodeProto, shapes: dict[str, list[int]]) -> int | None:
    """com.microsoft.Attention on x [B, S, D_in] with packed weights [D_in, D_q + D_k + D_v]:
    B·S·D_in·(D_q + D_k + D_v) for the projections, B·S·S·D_q for Q·Kᵀ (summed over heads)
    and B·S·S·D_v for P·V."""
    x, weight = shapes.get(node.input[0]), shapes.get(node.input[1])
    if x is None or weight is None or len(x) != 3:
        return None
    batch, seq, d_in = x
    sizes = list(_attr(node, "qkv_hidden_sizes", []) or [weight[1] // 3] * 3)
    return batch * seq * (d_in * weight[1] + seq * (sizes[0] + sizes[2]))


def _einsum_macs(node: onnx.NodeProto, shapes: dict[str, list[int]],
                 out: list[int] | None) -> int | None:
    """Einsum: |Y| · Π (sizes of the letters summed over); 0 for single-operand einsums."""
    operands = [shapes.get(name) for name in node.input]
    if len(operands) < 2:
        return 0
    if out is None or any(shape is None for shape in operands):
        return None
    equation = _attr(node, "equation", b"")  # onnx gives string attributes as bytes
    text = equation.decode() if isinstance(equation, bytes) else str(equation)
    terms, _, result = text.replace(" ", "").partition("->")
    sizes: dict[str, int] = {}
    for term, shape in zip(terms.split(","), operands, strict=True):
        head, _, tail = term.partition("...")
        sizes.update(zip(head, shape, strict=False))
        sizes.update(zip(tail[::-1], shape[::-1], strict=False))
    summed = set(sizes) - set(result)
    return int(np.prod(out)) * int(np.prod([sizes[letter] for letter in summed]))


def inferred_shapes(model: onnx.ModelProto) -> dict[str, list[int]]:
    """{value name: static shape} after inference with symbolic input dims set to 1."""
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    init_names = {i.name for i in fixed.graph.initializer}
    for value in fixed.graph.input:
        if value.name in init_names:
            continue
        for dim in value.type.tensor_type.shape.dim:
            if not dim.HasField("dim_value"):
                dim.Clear()
                dim.dim_value = 1
    del fixed.graph.value_info[:]
    shapes: dict[str, list[int]] = {}
    for infer in (_onnx_inference, _symbolic_inference, _runtime_shapes):
        inferred = infer(fixed)
        if inferred is None:
            continue
        for value in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
            dims = value_dims(value)
            if dims and all(isinstance(d, int) for d in dims):
                shapes.setdefault(value.name, dims)
        if all(o in shapes for n in fixed.graph.node for o in n.output[:1]):
            break  # every node's output is known; no need for the slower fallback
    for init in fixed.graph.initializer:
        shapes[init.name] = list(init.dims)
    for node in fixed.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            shapes[node.output[0]] = list(numpy_helper.to_array(node.attribute[0].t).shape)
    return shapes


def _onnx_inference(model: onnx.ModelProto) -> onnx.ModelProto | None:
    """ONNX shape inference with data propagation (handles constant Reshape targets)."""
    try:
        return shape_inference.infer_shapes(model, data_prop=True)
    except Exception as err:  # best effort: unknown nodes are reported, not fatal
        log.info("ONNX shape inference failed: %s", err)
        return None


def _symbolic_inference(model: onnx.ModelProto) -> onnx.ModelProto | None:
    """onnxruntime's symbolic shape inference: follows Shape→Gather→Concat→Reshape chains
    that torch exports use, which ONNX inference leaves unknown."""
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    # It may save a temporary model (plus external data) into the current folder; keep that
    # out of the user's folder.
    with tempfile.TemporaryDirectory() as scratch:
        previous = os.getcwd()
        os.chdir(scratch)
        try:
            return SymbolicShapeInference.infer_shapes(model, auto_merge=True)
        except Exception as err:  # best effort, as above
            log.info("Symbolic shape inference failed: %s", err)
            return None
        finally:
            os.chdir(previous)


def _runtime_shapes(model: onnx.ModelProto) -> onnx.ModelProto | None:
    """Last resort: run the model once in ONNX Runtime with every node output exposed, and
    record the real shapes (exact for batch 1; costs one inference)."""
    import onnxruntime as ort

    from mvcompile.latency import random_feed

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    known = {o.name for o in probe.graph.output}
    names = [o for n in probe.graph.node for o in n.output if o and o not in known]
    probe.graph.output.extend(onnx.ValueInfoProto(name=name) for name in names)
    try:
        session = ort.InferenceSession(probe.SerializeToString(),
                                       providers=["CPUExecutionProvider"])
        values = session.run(None, random_feed(session))
    except Exception as err:  # best effort, as above
        log.info("Runtime shape probe failed: %s", err)
        return None
    result = onnx.ModelProto()
    result.CopyFrom(model)
    for out, value in zip(session.get_outputs(), values, strict=True):
        if hasattr(value, "shape"):
            result.graph.value_info.append(onnx.helper.make_tensor_value_info(
                out.name, onnx.TensorProto.FLOAT, list(value.shape)))
    return result


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """The graph inputs of ``model`` that are not initializers."""
    init_names = {i.name for i in model.graph.initializer}
    return [v for v in model.graph.input if v.name not in init_names]


def value_dims(value: onnx.ValueInfoProto) -> list[int | str]:
    """``value``'s dims: sizes, dim_params, and "?" where unnamed and unknown."""
    if not value.type.HasField("tensor_type") or not value.type.tensor_type.HasField("shape"):
        return []
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
            for d in value.type.tensor_type.shape.dim]


def format_shape(dims: list[int | str]) -> str:
    return "[" + ", ".join(str(d) for d in dims) + "]"


__all__ = ["ModelSummary", "summarize", "count_macs", "count_parameters", "op_histogram",
           "format_shape", "graph_inputs", "inferred_shapes", "value_dims"]
