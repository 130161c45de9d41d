"""Shared helpers for the layout passes: constants, attributes, and index simulation.

A chain of Reshape/Transpose nodes is a fixed permutation of its input's elements. We find out
*which* permutation by running the chain in numpy on an index tensor ``arange(|x|)`` and
comparing the result with the permutation a candidate rewrite computes. This decides matches by
what a chain does, not by how an exporter happened to spell it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import RewriterContext

SIM_BATCH = 2  # a symbolic batch dimension is simulated with this size


def const_array(value: ir.Value | None) -> np.ndarray | None:
    """The constant behind ``value`` (initializer or folded Constant), else None."""
    if value is None or value.const_value is None:
        return None
    return value.const_value.numpy()


def ints_attr(node: ir.Node, name: str) -> list[int] | None:
    """An ints attribute as a list (comparable with ``==`` to a list), None if absent."""
    ints = node.attributes.get_ints(name)
    return None if ints is None else list(ints)


def broadcasts_unchanged(dims: Sequence[object], target: Sequence[object]) -> bool:
    """Whether a tensor of shape ``dims`` broadcasts to ``target`` leaving ``target`` as it
    is: rank ≤ rank(target) and, aligned from the right, each dim is 1 or equal to target's
    (a symbolic dim equals only itself)."""
    return len(dims) <= len(target) and all(
        d == 1 or d == t for d, t in zip(reversed(dims), reversed(target), strict=False))


def static_shape(value: ir.Value) -> list[int | None] | None:
    """Dimensions of ``value`` with symbolic ones as None; None if the rank is unknown."""
    if value.shape is None:
        return None
    return [d if isinstance(d, int) else None for d in value.shape]


def batch_is_symbolic(value: ir.Value) -> bool:
    """Whether ``value``'s first dimension is symbolic: simulations then run at two batch
    sizes (SIM_BATCH and one more), since a chain may hard-code one."""
    dims = static_shape(value)
    return dims is not None and bool(dims) and dims[0] is None


def sim_shape(value: ir.Value, batch: int = SIM_BATCH) -> tuple[int, ...] | None:
    """A concrete shape to simulate ``value`` with: static dims, symbolic batch = ``batch``.

    None if any dimension other than the first is symbolic.
    """
    dims = static_shape(value)
    if dims is None or any(d is None for d in dims[1:]):
        return None
    return tuple(batch if d is None else d for d in dims)


def apply_reshape(x: np.ndarray, shape: Sequence[int], allowzero: int = 0) -> np.ndarray | None:
    """numpy Reshape with ONNX semantics (0 copies the input dim unless allowzero); None if
    the element counts do not agree."""
    dims = [x.shape[i] if (d == 0 and not allowzero) else int(d) for i, d in enumerate(shape)]
    try:
        return x.reshape(dims)
    except ValueError:
        return None


def run_chain(nodes: Sequence[ir.Node], x: np.ndarray) -> np.ndarray | None:
    """Apply a chain of Reshape/Transpose/Gather nodes to ``x``; None if a shape or index is
    not constant."""
    for node in nodes:
        if node.op_type == "Gather":
            indices = const_array(node.inputs[1])
            if indices is None:
                return None
            x = np.take(x, indices, axis=node.attributes.get_int("axis", 0))
            continue
        if node.op_type == "Reshape":
            shape = const_array(node.inputs[1])
            if shape is None:
                return None
            x = apply_reshape(x, shape.tolist(), node.attributes.get_int("allowzero", 0))
            if x is None:
                return None
        elif node.op_type == "Transpose":
            perm = ints_attr(node, "perm")
            x = np.transpose(x, perm)
        else:
            raise ValueError(f"not a layout node: {node.op_type}")
    return x


def unfold_ref(x: np.ndarray, p: int) -> np.ndarray:
    """Reference unfold: [B,C,H,W] -> [B,P,N,C]; token n=(i,j) of group (pi,pj) is pixel
    (i·p+pi, j·p+pj), as in transformers' and ml-cvnets' MobileViT."""
    b, c, h, w = x.shape
    t = x.reshape(b, c, h // p, p, w // p, p).transpose(0, 3, 5, 2, 4, 1)
    return t.reshape(b, p * p, (h // p) * (w // p), c)


def find_unfold_patch(nodes: Sequence[ir.Node], in_shape: tuple[int, ...]) -> int | None:
    """The patch size p for which ``nodes`` equal unfold_ref (up to a final reshape), or None."""
    if len(in_shape) != 4:
        return None
    index = np.arange(int(np.prod(in_shape))).reshape(in_shape)
    out = run_chain(nodes, index)
    if out is None:
        return None
    for p in _patch_candidates(in_shape):
        if np.array_equal(out.ravel(), unfold_ref(index, p).ravel()):
            return p
    return None


def find_fold_patch(nodes: Sequence[ir.Node], in_shape: tuple[int, ...],
                    out_shape: tuple[int, ...]) -> int | None:
    """The p for which ``nodes`` map unfold_ref(img, p) back to img ([B,C,H,W]), or None."""
    if len(out_shape) != 4 or int(np.prod(in_shape)) != int(np.prod(out_shape)):
        return None
    image = np.arange(int(np.prod(out_shape))).reshape(out_shape)
    for p in _patch_candidates(out_shape):
        tokens = unfold_ref(image, p).reshape(in_shape)
        out = run_chain(nodes, tokens)
        if out is not None and out.shape == image.shape and np.array_equal(out, image):
            return p
    return None


def _patch_candidates(shape: Sequence[int]) -> list[int]:
    h, w = shape[2], shape[3]
    return [p for p in range(1, min(h, w) + 1) if h % p == 0 and w % p == 0]


def chain_nodes(last: ir.Value, length: int) -> list[ir.Node] | None:
    """The ``length`` producer nodes ending in ``last``, first to last, following input 0."""
    nodes: list[ir.Node] = []
    value: ir.Value | None = last
    for _ in range(length):
        node = value.producer() if value is not None else None
        if node is None:
            return None
        nodes.append(node)
        value = node.inputs[0]
    return nodes[::-1]


def transposed_matmul(op: RewriterContext, a: ir.Value, b: ir.Value, *, equation: str,
                      trans_a: bool = False, trans_b: bool = False, target: str = "mobile"
                      ) -> ir.Value:
    """op(A)·op(B) with op = transpose of the last two axes where asked, as one node.

    ``target="ort"``: com.microsoft FusedMatMul(transA, transB), which ONNX Runtime runs as one
    GEMM. ``target="mobile"``: the standard ONNX Einsum ``equation`` (Core ML: matmul with
    transpose_x/transpose_y). Neither writes a Transpose node. ``target="ort-transpose"``:
    Transpose + MatMul, kept to measure the one-Transpose-per-direction form against them.
    """
    if target == "ort":
        return op.FusedMatMul(a, b, transA=int(trans_a), transB=int(trans_b), alpha=1.0,
                              _domain="com.microsoft")
    if target == "ort-transpose":  # the measured alternative: one explicit Transpose
        ranks = [len(term) for term in equation.split("->")[0].split(",")]
        if trans_a:
            a = op.Transpose(a, perm=_swap_last_two(ranks[0]))
        if trans_b:
            b = op.Transpose(b, perm=_swap_last_two(ranks[1]))
        return op.MatMul(a, b)
    return op.Einsum(a, b, equation=equation)


def _swap_last_two(rank: int) -> list[int]:
    return [*range(rank - 2), rank - 1, rank - 2]


def int64_init(op: RewriterContext, values: Sequence[int], name: str) -> ir.Value:
    """A new int64 initializer (shapes, axes) named ``name``."""
    return op.initializer(ir.tensor(np.asarray(values, dtype=np.int64), name=name), name=name)


def float_init(op: RewriterContext, array: np.ndarray, name: str) -> ir.Value:
    """A new float32 initializer named ``name``."""
    array = np.ascontiguousarray(array, dtype=np.float32)
    return op.initializer(ir.tensor(array, name=name), name=name)


def sim_shape_fitting(value: ir.Value, shape: Sequence[int] | None, batch: int = SIM_BATCH
                      ) -> tuple[int, ...] | None:
    """:func:`sim_shape` for a ``value`` that ``Reshape(value, shape)`` follows: a symbolic
    first dimension (e.g. G·N flattened rows) is simulated as ``batch`` times the fewest rows
    that fill whole ``shape`` groups (the product of its positive entries)."""
    dims = static_shape(value)
    if dims is None or not dims or any(d is None for d in dims[1:]):
        return None
    if dims[0] is not None:
        return tuple(dims)
    row = int(np.prod(dims[1:], dtype=np.int64))
    group = int(np.prod([d for d in (shape or []) if d > 0], dtype=np.int64))
    return (batch * (group // math.gcd(group, row)), *dims[1:])
