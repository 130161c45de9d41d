"""The ONNX model a Core ML lowering should match, given its int8 mode.

- float graphs and ``w8a8``: the model itself (QDQ run in float by ONNX Runtime without graph
  optimizations computes exactly Q/DQ's formulas);
- ``weight-only``: the model with every activation QuantizeLinear → DequantizeLinear pair
  removed, x → Q → DQ → y becoming x → y, because weight-only Core ML keeps activations float.
"""

from __future__ import annotations

import onnx
from onnx import helper


def reference_model(proto: onnx.ModelProto, int8_mode: str) -> tuple[onnx.ModelProto, bool]:
    """(reference model, whether its activations are quantized)."""
    quantized = any(n.op_type == "QuantizeLinear" for n in proto.graph.node)
    if not quantized:
        return proto, False
    if int8_mode == "w8a8":
        return proto, True
    return strip_activation_qdq(proto), False


def strip_activation_qdq(proto: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``proto`` where each DQ(Q(x)) reads x directly."""
    model = onnx.ModelProto()
    model.CopyFrom(proto)
    graph = model.graph
    producers = {out: node for node in graph.node for out in node.output}
    rename: dict[str, str] = {}
    for node in graph.node:
        source = producers.get(node.input[0]) if node.op_type == "DequantizeLinear" else None
        if source is not None and source.op_type == "QuantizeLinear":
            rename[node.output[0]] = source.input[0]
    outputs = {o.name for o in graph.output}
    kept = []
    for node in graph.node:
        if node.output and node.output[0] in rename:
            if node.output[0] in outputs:  # keep the graph output's name
                kept.append(helper.make_node("Identity", [rename[node.output[0]]],
                                             [node.output[0]], name=f"{node.name}_float"))
            continue
        node.input[:] = [rename.get(name, name) for name in node.input]
        kept.append(node)
    used = {name for node in kept for name in node.input} | outputs
    kept = [n for n in kept if n.op_type != "QuantizeLinear" or n.output[0] in used]
    del graph.node[:]
    graph.node.extend(kept)
    return model
