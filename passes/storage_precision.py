"""Keep the storage precision of weights that a model stores in float16/bfloat16.

A common way to halve an ONNX file: weights stored as float16 (or bfloat16) initializers,
each followed by ``Cast(to=FLOAT)``, so that the model computes in float32. Constant folding
(onnxsim's, onnxscript's) folds every such Cast into a float32 initializer, which doubles the
file. After the optimization, :func:`restore_storage` stores back as ``t`` + ``Cast`` each
float32 initializer ``w`` that ``t`` (a storage type the input used) holds exactly:

    Cast(w.astype(t), FLOAT) == w, bit for bit

so the result computes exactly what it did before the restore. A weight folded with other
constants (a BatchNorm folded into a conv, say) is in general not exactly representable and
stays float32; :func:`restore_storage` reports how many bytes stay so.
"""

from __future__ import annotations

import hashlib
import logging

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common

log = logging.getLogger(__name__)

# The reduced float types this restores, in the order tried.
STORAGE_TYPES = (ir.DataType.FLOAT16, ir.DataType.BFLOAT16)
# Smaller float32 initializers (scalars, epsilons, small vectors) stay as they are: a Cast
# node costs more than the bytes it saves.
MIN_ELEMENTS = 16


def storage_types(model: ir.Model) -> list[ir.DataType]:
    """The types of :data:`STORAGE_TYPES` that ``model`` stores constants in and casts to
    float32: those of the initializers and Constant outputs that feed a ``Cast(to=FLOAT)``."""
    found = set()
    for node in model.graph:
        if node.op_type != "Cast" or node.domain not in ("", "ai.onnx") or not node.inputs:
            continue
        to = node.attributes.get_int("to", None)
        source = node.inputs[0]
        if to != ir.DataType.FLOAT or source is None:
            continue
        tensor = _constant_tensor(source, overridable=True)
        if tensor is not None and tensor.dtype in STORAGE_TYPES:
            found.add(tensor.dtype)
    return [dtype for dtype in STORAGE_TYPES if dtype in found]


def fold_storage_casts(model: ir.Model) -> int:
    """Fold (in place, exactly) each ``Cast(to=FLOAT)`` of a float16/bfloat16 initializer or
    Constant of ``model``'s main graph into a float32 initializer named as the Cast's output,
    so that onnxsim, whose constant folding cannot run ONNX Runtime's Cast on bfloat16, sees
    float32 weights only; :func:`restore_storage` stores them back afterwards. The sources
    that nothing else reads are removed. Returns the number of Casts folded."""
    graph, folded = model.graph, 0
    for node in list(graph):
        if (node.op_type != "Cast" or node.domain not in ("", "ai.onnx")
                or len(node.inputs) != 1 or node.inputs[0] is None
                or node.attributes.get_int("to", None) != ir.DataType.FLOAT):
            continue
        source, output = node.inputs[0], node.outputs[0]
        tensor = _constant_tensor(source, overridable=False)
        if tensor is None or tensor.dtype not in STORAGE_TYPES or output.is_graph_output():
            continue
        name = output.name
        array = tensor.numpy().astype(np.float32)
        value = ir.Value(name=None, type=ir.TensorType(ir.DataType.FLOAT),
                         shape=ir.Shape(array.shape), const_value=ir.Tensor(array, name=name))
        ir.convenience.replace_all_uses_with(output, value)
        graph.remove(node, safe=True)
        value.name = name
        graph.register_initializer(value)
        folded += 1
        if source.uses() or source.is_graph_output():
            continue
        if source.is_initializer():
            graph.initializers.pop(source.name)
        else:
            graph.remove(source.producer(), safe=True)
    if folded:
        log.info("storage precision: %d Casts of float16/bfloat16 weights folded to float32 "
                 "before onnxsim", folded)
    return folded


def _constant_tensor(value: ir.Value, overridable: bool) -> ir.TensorProtocol | None:
    """The tensor that ``value`` holds when it is an initializer (``overridable``: also one
    that is a graph input too) or a Constant node's ``value`` output; None otherwise."""
    if value.is_initializer():
        return value.const_value if overridable or not value.is_graph_input() else None
    producer = value.producer()
    if producer is None or producer.op_type != "Constant" or producer.domain not in ("",
                                                                                   "ai.onnx"):
        return None
    attribute = producer.attributes.get("value")
    if attribute is None or attribute.type != ir.AttributeType.TENSOR:
        return None
    return attribute.value


def exact_in(array: np.ndarray, dtype: ir.DataType) -> bool:
    """Whether float32 ``array`` survives the round trip through ``dtype`` bit for bit."""
    back = array.astype(dtype.numpy()).astype(np.float32)
    return np.array_equal(back.view(np.uint32), array.view(np.uint32))


def restore_storage(model: ir.Model, dtypes: list[ir.DataType],
                    min_elements: int = MIN_ELEMENTS) -> dict:
    """Store each float32 initializer of ``model`` (in place) with at least ``min_elements``
    elements as the first of ``dtypes`` that holds it exactly, followed by a Cast to float32
    that takes over its name. Initializers that are also graph inputs (overridable) or graph
    outputs stay. Returns ``{"types", "restored", "restored_bytes", "float32",
    "float32_bytes"}``: counts and float32 bytes of the initializers restored and of those that
    stay float32 because no type of ``dtypes`` holds them exactly."""
    graph = model.graph
    report = {"types": [dtype.name.lower() for dtype in dtypes], "restored": 0, "restored_bytes": 0,
              "float32": 0, "float32_bytes": 0}
    casts, taken = [], _names(graph)
    existing = _Existing(graph)
    for value in list(graph.initializers.values()):
        tensor = value.const_value
        if (tensor is None or value.dtype != ir.DataType.FLOAT or tensor.size < min_elements
                or value.is_graph_input() or value.is_graph_output()):
            continue
        array = tensor.numpy()
        dtype = next((d for d in dtypes if exact_in(array, d)), None)
        if dtype is None:
            report["float32"] += 1
            report["float32_bytes"] += array.nbytes
            continue
        casts.append(_store_as(graph, value, array, dtype, taken, existing))
        report["restored"] += 1
        report["restored_bytes"] += array.nbytes
    if casts:
        graph.extend(casts)
        common.TopologicalSortPass()(model)
    log.info("storage precision %s: %d initializers restored (%d float32 bytes), %d stay "
             "float32 (%d bytes)", report["types"], report["restored"],
             report["restored_bytes"], report["float32"], report["float32_bytes"])
    return report


class _Existing:
    """The float16/bfloat16 initializers of a graph (graph inputs aside) by content, so that
    a weight stored back reuses an identical one (one that the graph also reads directly,
    say) instead of adding a copy."""

    def __init__(self, graph: ir.Graph) -> None:
        self.values: dict[tuple, list[ir.Value]] = {}
        for value in graph.initializers.values():
            if (value.dtype in STORAGE_TYPES and value.const_value is not None
                    and not value.is_graph_input()):
                self.add(value, value.const_value.numpy())

    @staticmethod
    def _key(dtype: ir.DataType, array: np.ndarray) -> tuple:
        return dtype, array.shape, hashlib.sha256(np.ascontiguousarray(array).tobytes()).digest()

    def add(self, value: ir.Value, array: np.ndarray) -> None:
        self.values.setdefault(self._key(value.dtype, array), []).append(value)

    def find(self, dtype: ir.DataType, array: np.ndarray) -> ir.Value | None:
        """An initializer of ``dtype`` that holds ``array`` (of that dtype) bit for bit."""
        for value in self.values.get(self._key(dtype, array), []):
            held = value.const_value.numpy()
            if held.shape == array.shape and held.tobytes() == array.tobytes():
                return value
        return None


def _store_as(graph: ir.Graph, value: ir.Value, array: np.ndarray, dtype: ir.DataType,
              taken: set[str], existing: _Existing) -> ir.Node:
    """Replace initializer ``value`` by a ``dtype`` initializer (an identical one of
    ``existing`` where there is one, else a new one, added to ``existing``) and return the
    Cast node (not yet in the graph) whose output, named as ``value`` was, replaces it.
    ``taken``: the names in use, to which the new ones are added."""
    name = value.name
    reduced = array.astype(dtype.numpy())
    stored = existing.find(dtype, reduced)
    new = stored is None
    if new:
        stored_name = _unique_name(f"{name}_{dtype.name.lower()}", taken)
        stored = ir.Value(name=stored_name, type=ir.TensorType(dtype), shape=value.shape,
                          const_value=ir.Tensor(reduced, name=stored_name))
        existing.add(stored, reduced)
    cast = ir.Node("", "Cast", [stored], [ir.AttrInt64("to", ir.DataType.FLOAT)],
                   name=_unique_name(f"{name}_cast", taken))
    output = cast.outputs[0]
    output.type, output.shape = ir.TensorType(ir.DataType.FLOAT), value.shape
    ir.convenience.replace_all_uses_with(value, output)
    graph.initializers.pop(name)
    if new:
        graph.register_initializer(stored)
    output.name = name
    return cast


def _names(graph: ir.Graph) -> set[str]:
    """The names of the values and nodes of ``graph``."""
    names = {value.name for value in (*graph.inputs, *graph.initializers.values())}
    for node in graph:
        names.add(node.name)
        names.update(output.name for output in node.outputs)
    return names - {None}


def _unique_name(base: str, taken: set[str]) -> str:
    """``base``, or ``base`` with the first numeric suffix not in ``taken``; added to it."""
    name, index = base, 1
    while name in taken:
        name, index = f"{base}_{index}", index + 1
    taken.add(name)
    return name
