"""Give a model optimized at a fixed batch its symbolic batch back.

Dynamic-batch torch exports compute every Reshape target from ``Shape(x)`` at run time, which
keeps the layout rewrites (they need static shapes) from matching. :mod:`mvcompile.optimize`
therefore optimizes such a model at batch 1 and at batch 2 with the same pipeline, and
:func:`generalize` compares the two results: they must be the same graph but for constants
that scale with the batch, and each of those is rewritten so that it holds for any batch:

* an int64 Reshape target or Expand shape whose batch-2 value is twice its batch-1 value in
  exactly one position: that position becomes -1 (Reshape; a second -1 is first resolved to
  the static size it stands for), 0 (Reshape, the data's dimension passes through) or 1
  (Expand, the data's dimension passes through);
* a tensor that is twice as long along one axis at batch 2 and holds the same values along it
  (a Softmax over one element that onnxsim folded to ones, say), used only by broadcasting
  ops: its first slice along that axis, which the op broadcasts.

Anything else raises :class:`NotGeneralizable`, and so does an input model with a Slice of
constant bounds that keeps part of a symbolic batch axis (``x[:16]`` of a [seq] or [T, B, C]
input): at batch 1 and 2 it is a no-op, which the rewrites remove, at batch 40 it is not. The
caller must still check the result numerically at several batches: the rules above are
necessary conditions, not proof.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
from onnx import numpy_helper

from mvcompile.analysis import constant_tensors

log = logging.getLogger(__name__)

# Ops that broadcast every input against the others (numpy rules): a constant input may be
# shrunk to size 1 along an axis where another input has the full size.
BROADCASTING_OPS = frozenset({"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Mean", "Sum",
                              "Where", "Equal", "Less", "Greater", "And", "Or", "PRelu"})


class NotGeneralizable(Exception):
    """The two fixed-batch results differ in a way that :func:`generalize` cannot undo."""


def generalize(one: onnx.ModelProto, two: onnx.ModelProto, original: onnx.ModelProto
               ) -> onnx.ModelProto:
    """A copy of ``one`` (optimized at batch 1) that takes any batch, from its differences to
    ``two`` (the same pipeline at batch 2); ``original``, the symbolic-batch input, gives the
    graph inputs' and outputs' dimension names. Raises :class:`NotGeneralizable`."""
    _refuse_batch_slices(original)
    _check_same_structure(one, two)
    result = onnx.ModelProto()
    result.CopyFrom(one)
    uses = _uses(result.graph)
    shapes = (_static_shapes(one), _static_shapes(two))
    others = {init.name: init for init in two.graph.initializer}
    changed = 0
    for init in result.graph.initializer:
        a, b = numpy_helper.to_array(init), numpy_helper.to_array(others[init.name])
        if a.shape == b.shape and np.array_equal(a, b):
            continue
        new = _generalize_constant(init.name, a, b, uses.get(init.name, []), shapes)
        init.CopyFrom(numpy_helper.from_array(new, init.name))
        changed += 1
    _restore_dims(result, one, two, original)
    log.info("Generalised %d batch-dependent constants to any batch", changed)
    return result


FULL = 2**62  # a Slice bound at least this large (or as negative) reaches the axis' end


def _refuse_batch_slices(original: onnx.ModelProto) -> None:
    """Raise if a Slice of ``original``'s main graph has constant bounds that keep part of an
    axis whose size is a symbolic batch dimension (the first dimension of a graph input,
    followed by name through ONNX shape inference): a fixed batch at or below the bound makes
    it a no-op, which the rewrites remove."""
    graph = onnx.shape_inference.infer_shapes(original).graph
    initializers = {init.name for init in graph.initializer}
    batch = {value.type.tensor_type.shape.dim[0].dim_param for value in graph.input
             if value.name not in initializers and value.type.tensor_type.shape.dim}
    batch.discard("")
    if not batch:
        return
    dims = {value.name: [d.dim_param for d in value.type.tensor_type.shape.dim]
            for value in (*graph.input, *graph.value_info)}
    constants = _constants(graph)
    for node in graph.node:
        if node.op_type != "Slice" or len(node.input) < 3 or node.input[0] not in dims:
            continue
        bounds = [constants.get(name) for name in node.input[1:5]]
        starts, ends = bounds[0], bounds[1]
        if starts is None or ends is None:
            continue
        axes = bounds[2] if len(bounds) > 2 and bounds[2] is not None else range(len(starts))
        steps = bounds[3] if len(bounds) > 3 and bounds[3] is not None else [1] * len(starts)
        shape = dims[node.input[0]]
        for axis, start, end, step in zip(axes, starts, ends, steps, strict=True):
            axis = int(axis) % len(shape) if shape else int(axis)
            whole = step > 0 and (start == 0 or start <= -FULL) and end >= FULL
            if shape and shape[axis] in batch and not whole:
                raise NotGeneralizable(
                    f"Slice {node.name or node.output[0]!r} keeps [{start}:{end}] of the "
                    f"symbolic axis {shape[axis]!r}, which a fixed batch makes a no-op")


def _constants(graph: onnx.GraphProto) -> dict[str, list[int]]:
    """The integer values of ``graph``'s initializers and Constant nodes, by name."""
    values = {t.name: numpy_helper.to_array(t) for t in constant_tensors(graph, list(graph.node))}
    return {name: [int(v) for v in np.ravel(a)] for name, a in values.items()
            if a.dtype.kind in "iu"}


def _check_same_structure(one: onnx.ModelProto, two: onnx.ModelProto) -> None:
    """Raise unless the two graphs have the same nodes (attributes included), inputs, outputs
    and initializer names and types, and the same opsets and functions."""
    g1, g2 = one.graph, two.graph
    if len(g1.node) != len(g2.node):
        raise NotGeneralizable(f"{len(g1.node)} nodes at batch 1, {len(g2.node)} at batch 2")
    for n1, n2 in zip(g1.node, g2.node, strict=True):
        if (n1.op_type, n1.domain, list(n1.input), list(n1.output), list(n1.attribute)) != (
                n2.op_type, n2.domain, list(n2.input), list(n2.output), list(n2.attribute)):
            raise NotGeneralizable(f"node {n1.name or n1.op_type!r} differs between batch 1 "
                                   "and batch 2")
    if ([(v.name, v.type.tensor_type.elem_type) for v in (*g1.input, *g1.output)]
            != [(v.name, v.type.tensor_type.elem_type) for v in (*g2.input, *g2.output)]):
        raise NotGeneralizable("graph inputs or outputs differ between batch 1 and batch 2")
    if ([(i.name, i.data_type) for i in g1.initializer]
            != [(i.name, i.data_type) for i in g2.initializer]):
        raise NotGeneralizable("initializers differ between batch 1 and batch 2")
    if (list(one.opset_import) != list(two.opset_import)
            or list(one.functions) != list(two.functions) or g1.sparse_initializer):
        raise NotGeneralizable("opsets or functions differ between batch 1 and batch 2")


def _uses(graph: onnx.GraphProto) -> dict[str, list[tuple[onnx.NodeProto, int]]]:
    """For each value name: the nodes that read it, with the input position."""
    uses: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in graph.node:
        for index, name in enumerate(node.input):
            uses.setdefault(name, []).append((node, index))
    for output in graph.output:
        uses.setdefault(output.name, []).append((onnx.NodeProto(op_type="<graph output>"), 0))
    return uses


def _static_shapes(model: onnx.ModelProto) -> dict[str, list[int | None]]:
    """The dimensions that ``model``'s value_info, inputs and outputs record (None: unknown)."""
    graph = model.graph
    return {value.name: [dim.dim_value if dim.HasField("dim_value") else None
                         for dim in value.type.tensor_type.shape.dim]
            for value in (*graph.value_info, *graph.input, *graph.output)
            if value.type.tensor_type.HasField("shape")}


def _generalize_constant(name: str, a: np.ndarray, b: np.ndarray,
                         uses: list[tuple[onnx.NodeProto, int]],
                         shapes: tuple[dict, dict]) -> np.ndarray:
    """The batch-independent replacement of the constant ``name`` (``a`` at batch 1, ``b`` at
    batch 2) read by ``uses``; raise :class:`NotGeneralizable` if there is none."""
    if not uses:
        raise NotGeneralizable(f"constant {name} differs between batches but is not used")
    if a.dtype == np.int64 and a.ndim == 1 and a.shape == b.shape:
        return _generalize_shape(name, a, b, uses, shapes)
    return _shrink_broadcast(name, a, b, uses)


def _batch_position(name: str, a: np.ndarray, b: np.ndarray) -> int:
    """The one position where the shape ``b`` is twice ``a`` (all others equal)."""
    differ = np.flatnonzero(a != b)
    if len(differ) != 1 or a[differ[0]] <= 0 or b[differ[0]] != 2 * a[differ[0]]:
        raise NotGeneralizable(f"shape constant {name} is {a.tolist()} at batch 1 and "
                               f"{b.tolist()} at batch 2: not linear in the batch")
    return int(differ[0])


def _generalize_shape(name: str, a: np.ndarray, b: np.ndarray,
                      uses: list[tuple[onnx.NodeProto, int]], shapes: tuple[dict, dict]
                      ) -> np.ndarray:
    """A Reshape target or Expand shape that scales with the batch at one position, rewritten
    to hold for any batch (module docstring)."""
    axis = _batch_position(name, a, b)
    ops = {(node.op_type, index) for node, index in uses}
    if ops == {("Reshape", 1)}:
        return _generalize_reshape_target(name, a, b, axis, [n for n, _ in uses], shapes)
    if ops == {("Expand", 1)} and all(_passes_through(node, axis, a, b, shapes)
                                      for node, _ in uses):
        new = a.copy()
        new[axis] = 1
        return new
    raise NotGeneralizable(f"shape constant {name} scales with the batch and is read by "
                           f"{sorted(op for op, _ in ops)}, which cannot take it symbolically")


def _generalize_reshape_target(name: str, a: np.ndarray, b: np.ndarray, axis: int,
                               reshapes: list[onnx.NodeProto], shapes: tuple[dict, dict]
                               ) -> np.ndarray:
    """The Reshape target ``a`` with its batch position ``axis`` made symbolic: 0 where every
    Reshape's data keeps that dimension, else -1 (another -1 first replaced by the static
    size that every Reshape's output has there)."""
    new = a.copy()
    if all(_attribute(node, "allowzero") == 0 and _passes_through(node, axis, a, b, shapes)
           for node in reshapes):
        new[axis] = 0
        return new
    others = [i for i, value in enumerate(a) if value == -1]
    if others:
        (other,) = others  # a valid Reshape target holds at most one -1
        sizes = {shapes[k].get(node.output[0], [None] * len(a))[other]
                 for node in reshapes for k in (0, 1)}
        if len(sizes) != 1 or None in sizes:
            raise NotGeneralizable(f"Reshape target {name} {a.tolist()} has a -1 that the "
                                   "output shapes do not resolve")
        new[other] = sizes.pop()
    new[axis] = -1
    return new


def _passes_through(node: onnx.NodeProto, axis: int, a: np.ndarray, b: np.ndarray,
                    shapes: tuple[dict, dict]) -> bool:
    """Whether ``node``'s data input (its first) has the size ``a[axis]`` at batch 1 and
    ``b[axis]`` at batch 2 in the same position (Reshape: the same index; Expand:
    right-aligned, as it broadcasts)."""
    for batch_shapes, target in zip(shapes, (a, b), strict=True):
        data = batch_shapes.get(node.input[0])
        if data is None:
            return False
        position = axis - (len(target) - len(data)) if node.op_type == "Expand" else axis
        if not 0 <= position < len(data) or data[position] != target[axis]:
            return False
    return True


def _attribute(node: onnx.NodeProto, name: str, default: int = 0) -> int:
    """An int attribute of ``node``."""
    return next((attr.i for attr in node.attribute if attr.name == name), default)


def _shrink_broadcast(name: str, a: np.ndarray, b: np.ndarray,
                      uses: list[tuple[onnx.NodeProto, int]]) -> np.ndarray:
    """``a``'s first slice along the one axis where ``b`` is twice as long, if ``a`` and ``b``
    repeat that slice along it and only broadcasting ops (MatMul: its batch axes) read it."""
    differ = [i for i, (m, n) in enumerate(zip(a.shape, b.shape, strict=False)) if m != n]
    if a.ndim != b.ndim or len(differ) != 1 or b.shape[differ[0]] != 2 * a.shape[differ[0]]:
        raise NotGeneralizable(f"constant {name} has shape {list(a.shape)} at batch 1 and "
                               f"{list(b.shape)} at batch 2")
    axis = differ[0]
    piece = a.take([0], axis=axis)
    if not (np.array_equal(np.broadcast_to(piece, a.shape), a)
            and np.array_equal(np.broadcast_to(piece, b.shape), b)):
        raise NotGeneralizable(f"constant {name} varies along its batch-dependent axis")
    for node, _ in uses:
        if not (node.op_type in BROADCASTING_OPS and node.domain in ("", "ai.onnx")
                or node.op_type == "MatMul" and axis < a.ndim - 2):
            raise NotGeneralizable(f"constant {name} scales with the batch and is read by "
                                   f"{node.op_type}, which does not broadcast it")
    return piece


def _restore_dims(result: onnx.ModelProto, one: onnx.ModelProto, two: onnx.ModelProto,
                  original: onnx.ModelProto) -> None:
    """Make ``result``'s dimensions that differ between ``one`` and ``two`` symbolic: in
    graph inputs and outputs as ``original`` names them, elsewhere (value_info) unknown."""
    named = {value.name: value.type.tensor_type.shape.dim
             for value in (*original.graph.input, *original.graph.output)}
    seconds = {value.name: value for value in (*two.graph.input, *two.graph.output,
                                               *two.graph.value_info)}
    graph = result.graph
    for value in (*graph.input, *graph.output, *graph.value_info):
        other = seconds.get(value.name)
        if other is None or not value.type.tensor_type.HasField("shape"):
            continue
        dims, other_dims = value.type.tensor_type.shape.dim, other.type.tensor_type.shape.dim
        if len(dims) != len(other_dims):
            value.type.tensor_type.ClearField("shape")
            continue
        names = named.get(value.name)
        for position, (dim, second) in enumerate(zip(dims, other_dims, strict=True)):
            if dim == second:
                continue
            if names is not None and len(names) == len(dims) and names[position].dim_param:
                dim.dim_param = names[position].dim_param  # clears its dim_value
            else:
                dim.Clear()
