"""Two-operand Einsum → one batched MIL ``matmul`` (plus the transposes/reshapes it needs).

For ``A[ta], B[tb] -> Y[out]`` the output indices split into a batch prefix P and a tail
``g1 + g2`` where g1 indexes only the left operand L and g2 only the right one R; indices in
both operands but not in ``out`` are contracted (K):

    Y[P, g1, g2] = Σ_K L[P, g1, K] · R[P, K, g2]        (one matmul, batch dims broadcast)

Every valid (P, g1, g2, which operand is left) is costed by the transposes and reshapes it
needs, and MIL's ``transpose_x``/``transpose_y`` absorb an operand stored as [P, K, g1] or
[P, g2, K]. MobileViT's forms cost nothing: ``ghnd,ghmd->ghnm`` is ``matmul(q, k,
transpose_y=True)`` and ``bcn,cd->bnd`` is ``matmul(x, w, transpose_x=True)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from coremltools.converters.mil import Builder as mb

from mvcompile.backends.mil_ops import Value, arg, register, reshape, shape, text, transpose

if TYPE_CHECKING:
    import onnx

    from mvcompile.backends.mil_lower import LowerContext


@dataclass(frozen=True)
class _Side:
    """How one operand enters the matmul: its term, free group, and transpose flag."""

    term: str
    free: str
    flag: bool  # left: stored [P, K, free]; right: stored [P, free, K]

    def order(self, batch: str, contract: str, left: bool) -> str:
        present = "".join(c for c in batch if c in self.term)
        inner = (self.free + contract) if left != self.flag else (contract + self.free)
        return present + inner


@dataclass(frozen=True)
class _Plan:
    batch: str
    contract: str
    left: _Side
    right: _Side
    swapped: bool  # the right operand is ONNX input 0

    def cost(self) -> int:
        total = 0
        for side, is_left in ((self.left, True), (self.right, False)):
            total += 2 * (side.order(self.batch, self.contract, is_left) != side.term)
            total += len(side.free) != 1 or len(self.contract) != 1 or _needs_expand(
                self.batch, side.term)
        return total + (len(self.left.free) != 1 or len(self.right.free) != 1)


def _needs_expand(batch: str, term: str) -> bool:
    """Whether missing batch indices are not all leading (rank broadcasting cannot add them)."""
    present = [c in term for c in batch]
    return any(p and not q for p, q in zip(present, present[1:], strict=False))


def _plans(ta: str, tb: str, out: str) -> list[_Plan]:
    contract = "".join(c for c in ta if c in tb and c not in out)
    plans = []
    for k in range(len(out) + 1):
        batch, tail = out[:k], out[k:]
        for j in range(len(tail) + 1):
            g1, g2 = tail[:j], tail[j:]
            for (tl, tr), swapped in (((ta, tb), False), ((tb, ta), True)):
                if all(c in tl and c not in tr for c in g1) and all(
                        c in tr and c not in tl for c in g2):
                    plans += [_Plan(batch, contract, _Side(tl, g1, fl), _Side(tr, g2, fr),
                                    swapped) for fl in (False, True) for fr in (False, True)]
    return plans


def _sum_out(x: Value, term: str, keep: str) -> tuple[Value, str]:
    """Sum away indices of one operand that appear nowhere else."""
    axes = [i for i, c in enumerate(term) if c not in keep]
    if not axes:
        return x, term
    if isinstance(x, np.ndarray):
        x = x.sum(axis=tuple(axes))
    else:
        x = mb.reduce_sum(x=x, axes=axes, keep_dims=False)
    return x, "".join(c for c in term if c in keep)


def _arrange(x: Value, side: _Side, plan: _Plan, left: bool, sizes: dict[str, int]) -> Value:
    order = side.order(plan.batch, plan.contract, left)
    x = transpose(x, [side.term.index(c) for c in order])
    groups = (side.free, plan.contract) if left != side.flag else (plan.contract, side.free)
    batch = [sizes[c] if c in side.term else 1 for c in plan.batch]
    if not _needs_expand(plan.batch, side.term):
        batch = [sizes[c] for c in plan.batch if c in side.term]
    target = batch + [math.prod(sizes[c] for c in g) for g in groups]
    return reshape(x, target)


@register("Einsum")
def _einsum(ctx: LowerContext, node: onnx.NodeProto, attrs: dict[str, Any]) -> list[Value]:
    equation = text(attrs, "equation", "").replace(" ", "")
    if len(node.input) != 2 or "->" not in equation or "." in equation:
        raise NotImplementedError(f"Einsum {equation!r}: only two operands with an explicit "
                                  "output and no ellipsis")
    (ta, tb), out = equation.split("->")[0].split(","), equation.split("->")[1]
    if any(len(set(t)) != len(t) for t in (ta, tb, out)):
        raise NotImplementedError(f"Einsum {equation!r}: repeated index (diagonal)")
    a, ta = _sum_out(arg(ctx, node, 0), ta, tb + out)
    b, tb = _sum_out(arg(ctx, node, 1), tb, ta + out)
    sizes: dict[str, int] = {}
    for term, value in ((ta, a), (tb, b)):
        for c, d in zip(term, shape(value), strict=True):
            sizes[c] = max(sizes.get(c, 1), d)
    plan = min(_plans(ta, tb, out), key=_Plan.cost)
    left, right = (b, a) if plan.swapped else (a, b)
    y = mb.matmul(x=_arrange(left, plan.left, plan, True, sizes),
                  y=_arrange(right, plan.right, plan, False, sizes),
                  transpose_x=plan.left.flag, transpose_y=plan.right.flag)
    target = [sizes[c] for c in plan.batch + plan.left.free + plan.right.free]
    return [reshape(y, target)]
