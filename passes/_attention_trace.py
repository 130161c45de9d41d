"""Trace an attention's Q, Kᵀ, V and score branches back through the spellings exporters use.

Each branch is ``scale · layout(linear(x))``: a projection (:func:`trace_linear`: Gemm with
either ``transB``, MatMul [+ Add], or a fused QKV MatMul → Split [+ Add]) followed by a
Reshape/Transpose chain whose effect :func:`split_dims` decides by simulating it on an index
tensor, with constant scalar Mul/Div factors folded into ``scale``. The scores are traced as
s · MatMul(q, kᵀ) + B (:func:`trace_scores`). ``fold_head_split`` uses these in its ``check``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from mvcompile.passes._layout import (
    SIM_BATCH,
    apply_reshape,
    batch_is_symbolic,
    broadcasts_unchanged,
    const_array,
    run_chain,
    sim_shape,
    sim_shape_fitting,
)

HEAD_PERM = [0, 2, 1, 3]  # [G, N, h, d_h] <-> [G, h, N, d_h]
KEY_PERM = [0, 2, 3, 1]  # [G, N, h, d_h] -> [G, h, d_h, N]
LAYOUT_OPS = ("Reshape", "Transpose")


@dataclass(frozen=True)
class Linear:
    """y = x·Wᵀ + b along the last axis of x, with W [d_out, d_in] and b [d_out] constant."""

    x: ir.Value
    weight: np.ndarray
    bias: np.ndarray


@dataclass
class Branch:
    """One of Q, Kᵀ, V traced back from the attention: ``scale · layout(linear(x))``."""

    linear: Linear
    source: ir.Value  # the projection's output, input of ``layout[0]``
    layout: list[ir.Node]  # Reshape/Transpose nodes, first to last
    scale: float = 1.0
    values: list[ir.Value] = field(default_factory=list)  # intermediates it consumes alone


def _row(bias: np.ndarray | None, width: int) -> np.ndarray | None:
    """A bias that broadcasts along the last axis only, as [width]; None otherwise."""
    if bias is None:
        return None
    if bias.size == 1:
        return np.full(width, bias.reshape(()), np.float32)
    if bias.size == width and bias.shape[-1] == width:
        return bias.reshape(width)
    return None


def _gemm_linear(gemm: ir.Node) -> tuple[np.ndarray, np.ndarray] | None:
    """(α·W [d_out, d_in], β·b [d_out]) of ``Gemm(x, B, C)`` with constant B, C; W = B or Bᵀ
    by ``transB``."""
    if gemm.attributes.get_int("transA", 0):
        return None
    weight = const_array(gemm.inputs[1])
    if weight is None or weight.ndim != 2:
        return None
    if not gemm.attributes.get_int("transB", 0):
        weight = weight.T
    c = gemm.inputs[2] if len(gemm.inputs) > 2 else None
    bias = np.zeros(weight.shape[0], np.float32) if c is None else _row(const_array(c),
                                                                          weight.shape[0])
    if bias is None:
        return None
    alpha, beta = gemm.attributes.get_float("alpha", 1.0), gemm.attributes.get_float("beta", 1.0)
    return alpha * weight, beta * bias


def projection(node: ir.Node | None) -> tuple[np.ndarray, np.ndarray] | None:
    """(W [d_out, d_in], b) of a ``Gemm`` or ``MatMul(x, W)`` with constant 2-D weights."""
    if node is None or node.domain != "":
        return None
    if node.op_type == "Gemm":
        return _gemm_linear(node)
    if node.op_type == "MatMul":
        weight = const_array(node.inputs[1])
        if weight is not None and weight.ndim == 2:
            return weight.T, np.zeros(weight.shape[1], np.float32)
    return None


def _split_rows(node: ir.Node, index: int, width: int) -> slice | None:
    """The output rows that output ``index`` of a last-axis ``Split`` takes from ``width``."""
    rank = len(node.inputs[0].shape) if node.inputs[0].shape is not None else 0
    axis = node.attributes.get_int("axis", 0)
    if rank == 0 or axis not in (-1, rank - 1):
        return None
    sizes = const_array(node.inputs[1]) if len(node.inputs) > 1 else None
    count = len(node.outputs)
    if sizes is None:
        if node.attributes.get_int("num_outputs", count) != count or width % count:
            return None
        sizes = np.full(count, width // count)
    if sizes.sum() != width or len(sizes) != count:
        return None
    start = int(sizes[:index].sum())
    return slice(start, start + int(sizes[index]))


def trace_linear(value: ir.Value, used: list[ir.Value]) -> Linear | None:
    """The constant affine map from some x to ``value`` along the last axis, through
    ``Add(b)``, last-axis ``Split`` and a ``Gemm``/``MatMul`` projection; None if there is
    none. Appends the values passed on the way (``value`` included) to ``used``."""
    node = value.producer()
    if node is None or node.domain != "":
        return None
    used.append(value)
    if node.op_type == "Add":
        for i in (0, 1):
            inner = (trace_linear(node.inputs[i], used)
                     if node.inputs[1 - i].const_value is not None else None)
            bias = _row(const_array(node.inputs[1 - i]), inner.weight.shape[0]) if inner else None
            if bias is not None:
                return Linear(inner.x, inner.weight, inner.bias + bias)
        return None
    if node.op_type == "Split":
        inner = trace_linear(node.inputs[0], used)
        rows = _split_rows(node, node.outputs.index(value), inner.weight.shape[0]) if inner \
            else None
        return None if rows is None else Linear(inner.x, inner.weight[rows], inner.bias[rows])
    weights = projection(node)
    return None if weights is None else Linear(node.inputs[0], *weights)


def _scalar_factor(node: ir.Node) -> tuple[ir.Value, float] | None:
    """(y, c) for ``Mul(y, c)``, ``Mul(c, y)`` or ``Div(y, 1/c)`` with a constant scalar c."""
    if node.domain != "" or node.op_type not in ("Mul", "Div"):
        return None
    for i in (0, 1) if node.op_type == "Mul" else (0,):
        c = const_array(node.inputs[1 - i])
        if c is not None and c.size == 1 and node.inputs[i].const_value is None:
            c = float(c.reshape(()))
            if node.op_type == "Div":
                return (node.inputs[0], 1.0 / c) if c else None
            return node.inputs[i], c
    return None


def trace_branch(value: ir.Value) -> Branch | None:
    """``value`` as scalar · Reshape/Transpose chain · linear projection (in any order of the
    scalars and layout nodes, which commute); None if it is not one."""
    layout: list[ir.Node] = []
    scale, used = 1.0, []
    node = value.producer()
    while node is not None and node.domain == "":
        scaled = _scalar_factor(node)
        if node.op_type in LAYOUT_OPS:
            inner = node.inputs[0]
            layout.append(node)
        elif scaled is not None:
            inner, factor = scaled
            scale *= factor
        else:
            break
        used.append(value)
        value, node = inner, inner.producer()
    linear = trace_linear(value, used)
    if linear is None:
        return None
    return Branch(linear, value, layout[::-1], scale, used)


def split_dims(branch: Branch, perm: Sequence[int]) -> tuple[int, int, int] | None:
    """(h, N, d_h) if the branch's layout chain is ``Reshape([G, N, h, d_h]) → Transpose(perm)``
    as a permutation of its source's elements, else None. A symbolic batch is simulated at
    two sizes: a chain may hard-code one."""
    found = _split_dims_at(branch, perm, SIM_BATCH)
    if found is not None and batch_is_symbolic(branch.source):
        return found if _split_dims_at(branch, perm, SIM_BATCH + 1) == found else None
    return found


def _split_dims_at(branch: Branch, perm: Sequence[int], batch: int
                   ) -> tuple[int, int, int] | None:
    reshapes = [n for n in branch.layout if n.op_type == "Reshape"]
    first = const_array(reshapes[0].inputs[1]) if reshapes else None
    shape = sim_shape_fitting(branch.source, None if first is None else first.tolist(), batch)
    if shape is None:
        return None
    index = np.arange(int(np.prod(shape))).reshape(shape)
    out = run_chain(branch.layout, index)
    if out is None or out.ndim != 4:
        return None
    inverse = np.argsort(perm)
    g, n, h, dh = (out.shape[i] for i in inverse)
    expected = apply_reshape(index, [g, n, h, dh])
    if expected is None or not np.array_equal(out, expected.transpose(perm)):
        return None
    return h, n, dh


def merge_dims(ctx: ir.Value, nodes: list[ir.Node], width: int) -> list[int] | None:
    """The merge Reshape's shape with its last entry ``width`` if ``nodes`` (Transpose,
    Reshape) turn ctx [G, h, N, d_h] into [..., N, h·d_h] rows, else None (a symbolic batch
    is simulated at two sizes)."""
    merge = const_array(nodes[1].inputs[1])
    if merge is None or 0 in merge.tolist():
        return None
    batches = (SIM_BATCH, SIM_BATCH + 1) if batch_is_symbolic(ctx) else (SIM_BATCH,)
    for batch in batches:
        shape = sim_shape(ctx, batch)
        if shape is None or len(shape) != 4:
            return None
        index = np.arange(int(np.prod(shape))).reshape(shape)
        out = run_chain(nodes, index)
        g, h, n, dh = shape
        if out is None or out.shape[-1] != h * dh or not np.array_equal(
                out.ravel(), index.transpose(HEAD_PERM).ravel()):
            return None
    return [*merge.tolist()[:-1], width]


def broadcasts_to(array: np.ndarray, shape: tuple[int, ...] | None) -> bool:
    """Whether ``array`` broadcasts to ``shape`` (rank 4) without enlarging it."""
    return shape is not None and len(shape) == 4 and broadcasts_unchanged(array.shape, shape)


def only_here(values: Sequence[ir.Value]) -> ir.Value | None:
    """The first value with a consumer outside the attention (or a graph output), if any."""
    for value in values:
        if len(value.uses()) != 1 or value.is_graph_output():
            return value
    return None


def rows_of(x: ir.Value) -> ir.Value:
    """x before Reshapes that keep its last axis (the same rows of tokens)."""
    node = x.producer()
    while (node is not None and node.op_type == "Reshape" and node.domain == ""
           and x.shape is not None and node.inputs[0].shape is not None
           and isinstance(x.shape[-1], int) and node.inputs[0].shape[-1] == x.shape[-1]):
        x = node.inputs[0]
        node = x.producer()
    return x


@dataclass
class Scores:
    """scores = scale · MatMul(q, kt) + bias, with constant scale and bias (bias None if 0)."""

    q: ir.Value
    kt: ir.Value
    scale: float
    bias: np.ndarray | None
    values: list[ir.Value]  # intermediates from MatMul(q, kt) to scores


def _const_addend(node: ir.Node) -> tuple[ir.Value, np.ndarray] | None:
    """(y, B) for ``Add(y, B)`` or ``Add(B, y)`` with a constant B."""
    if node.domain != "" or node.op_type != "Add":
        return None
    for i in (0, 1):
        addend = const_array(node.inputs[1 - i])
        if addend is not None and node.inputs[i].const_value is None:
            return node.inputs[i], addend
    return None


def trace_scores(scores: ir.Value) -> Scores | None:
    """scores as s · MatMul(q, kt) + B through constant scalar Mul/Div and constant Adds
    (a relative position bias), walking back: s·(c·y) = (s·c)·y, s·(y + A) = s·y + s·A."""
    scale, bias, used = 1.0, None, [scores]
    node = scores.producer()
    while node is not None:
        if (scaled := _scalar_factor(node)) is not None:
            scores, factor = scaled
            scale *= factor
        elif (shifted := _const_addend(node)) is not None:
            scores, addend = shifted
            bias = scale * addend if bias is None else bias + scale * addend
        else:
            break
        used.append(scores)
        node = scores.producer()
    if node is None or node.op_type != "MatMul" or node.domain != "":
        return None
    return Scores(node.inputs[0], node.inputs[1], scale, bias, used)
