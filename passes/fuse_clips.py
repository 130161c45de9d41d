"""Fuse chained Clip/Relu into one Clip, correctly for every pair of constant ranges.

With clamp(v, a, b) = min(max(v, a), b), which is ONNX Clip's definition even when a > b (every
value becomes b), and an absent bound read as ∓∞:

    Clip(Clip(x, a₁, b₁), a₂, b₂) → Clip(x, clamp(a₁, a₂, b₂), clamp(b₁, a₂, b₂))
    Relu(Clip(x, a, b))           → Clip(x, max(a, 0), max(b, 0))
    Clip(Relu(x), a, b)           → Clip(x, clamp(0, a, b), b)

All three follow from clamp(·, a₂, b₂) being non-decreasing, so that applying it after a clamp
to [a₁, b₁] is a clamp to the images of a₁ and b₁ (Relu is a clamp to [0, ∞)).

onnxscript 0.7's own rules, which its optimizer applies by default, take max(a₁, a₂) and
min(b₁, b₂), and max(a, 0) and b: right where the ranges overlap, wrong where they do not.
``Clip(Clip(x, -1, -0.5), 0, 1)`` is 0 for every x, and its ``Clip(x, 0, -0.5)`` is -0.5;
``Relu(Clip(x, -2, -1))`` is 0, and its ``Clip(x, 0, -1)`` is -1. They also fuse a NaN bound
(which ONNX Runtime reads as absent) into NaN, compute integer bounds through float64, name
their new bounds ``{x}_min``/``{x}_max`` (two chains on one x collide) and fail on an input
whose type is unknown. The rules here keep onnxscript's patterns and rule names; their checks
also refuse NaN bounds and inputs of unknown type, their bounds keep the input's type, and the
new bounds are named after the chain. :func:`onnxscript_default_rules` is onnxscript's default rule
list with these in place of its three, which :class:`mvcompile.pipeline.OnnxscriptOptimize`
runs its optimizer with.
"""

from __future__ import annotations

import abc

import numpy as np
import onnx_ir as ir
from onnxscript import rewriter
from onnxscript.rewriter import MatchResult, RewriteRule, RewriteRuleClassBase, RewriteRuleSet

Bound = np.ndarray | None  # a Clip bound's value; None: absent (-∞ for min, +∞ for max)


def _bounds(node: ir.Node) -> tuple[Bound, Bound]:
    """(min, max) of the Clip ``node``, each None where absent; call after :func:`_refusal`."""
    def value(i: int) -> Bound:
        if len(node.inputs) <= i or node.inputs[i] is None:
            return None
        return ir.convenience.get_const_tensor(node.inputs[i]).numpy()

    return value(1), value(2)


def _refusal(nodes: list[ir.Node]) -> str | None:
    """Why the Clip ``nodes``' bounds cannot be fused, else None: a bound that is a graph input
    or not a constant, a NaN bound, or bounds whose type is unknown."""
    for node in nodes:
        for bound in node.inputs[1:3]:
            if bound is None:
                continue
            if bound.is_graph_input():
                return f"{bound.name} is a graph input."
            tensor = ir.convenience.get_const_tensor(bound)
            if tensor is None:
                return f"{bound.name} is not a constant."
            if np.isnan(tensor.numpy()).any():
                return f"{bound.name} is NaN, which Clip reads as no bound."
    return None


def _lower(low1: Bound, low2: Bound, high2: Bound) -> Bound:
    """clamp(a₁, a₂, b₂), None standing for an absent bound (a₁ = -∞ and the result -∞)."""
    value = low1 if low2 is None else low2 if low1 is None else np.maximum(low1, low2)
    return value if value is None or high2 is None else np.minimum(value, high2)


def _upper(high1: Bound, low2: Bound, high2: Bound) -> Bound:
    """clamp(b₁, a₂, b₂), None standing for an absent bound (b₁ = +∞ and the result +∞)."""
    if high1 is None:
        return high2
    value = high1 if low2 is None else np.maximum(high1, low2)
    return value if high2 is None else np.minimum(value, high2)


class _FuseToClip(RewriteRuleClassBase, abc.ABC):
    """A chain that ends in ``Clip(x, low, high)`` with constant bounds. Subclasses give the
    pattern (naming the Clip outputs ``out_first_clip`` and, for two, ``out_second_clip``)
    and :meth:`fused_bounds`."""

    @abc.abstractmethod
    def fused_bounds(self, clips: list[ir.Node], zero: np.ndarray) -> tuple[Bound, Bound]:
        """(min, max) of the one Clip that the matched ``clips`` (first, second) make;
        ``zero``: 0 in the input's type."""

    def check(self, context, x, **outputs) -> MatchResult:
        del context
        result = MatchResult()
        if x.dtype is None:
            return result.fail(f"the type of {x.name} is unknown.")
        why = _refusal(_clips(outputs))
        return result if why is None else result.fail(why)

    def rewrite(self, op, x, **outputs):
        zero = np.zeros((), x.dtype.numpy())
        low, high = self.fused_bounds(_clips(outputs), zero)
        # named after the first Clip's output, which no other chain has
        prefix = outputs["out_first_clip"].name
        bounds = [None if b is None else op.initializer(
                  ir.tensor(np.asarray(b, zero.dtype)), name=f"{prefix}_fused_{end}")
                  for b, end in ((low, "min"), (high, "max"))]
        while bounds and bounds[-1] is None:  # trailing absent bounds are left out
            bounds.pop()
        return op.Clip(x, *bounds)


def _clips(outputs: dict[str, ir.Value]) -> list[ir.Node]:
    """The matched Clip nodes, first then second."""
    return [outputs[key].producer() for key in ("out_first_clip", "out_second_clip")
            if key in outputs]


class FuseSuccessiveClip(_FuseToClip):
    """``Clip(Clip(x, a₁, b₁), a₂, b₂)`` → ``Clip(x, clamp(a₁, a₂, b₂), clamp(b₁, a₂, b₂))``."""

    def pattern(self, op, x):
        first = op.Clip(x, _allow_other_inputs=True, _outputs=["out_first_clip"])
        return op.Clip(first, _allow_other_inputs=True, _outputs=["out_second_clip"])

    def fused_bounds(self, clips, zero):
        (low1, high1), (low2, high2) = map(_bounds, clips)
        return _lower(low1, low2, high2), _upper(high1, low2, high2)


class FuseSuccessiveReluClip(_FuseToClip):
    """``Relu(Clip(x, a, b))`` → ``Clip(x, max(a, 0), max(b, 0))``."""

    def pattern(self, op, x):
        return op.Relu(op.Clip(x, _allow_other_inputs=True, _outputs=["out_first_clip"]))

    def fused_bounds(self, clips, zero):
        low, high = _bounds(clips[0])
        return _lower(low, zero, None), _upper(high, zero, None)


class FuseSuccessiveClipRelu(_FuseToClip):
    """``Clip(Relu(x), a, b)`` → ``Clip(x, clamp(0, a, b), b)``."""

    def pattern(self, op, x):
        return op.Clip(op.Relu(x), _allow_other_inputs=True, _outputs=["out_first_clip"])

    def fused_bounds(self, clips, zero):
        low, high = _bounds(clips[0])
        return _lower(zero, low, high), high


# onnxscript's rule names; ours keep them (a rule is named after its class)
_REPLACEMENTS = {cls.__name__: cls for cls in (FuseSuccessiveClip, FuseSuccessiveReluClip,
                                                FuseSuccessiveClipRelu)}

rules = RewriteRuleSet([cls().rule() for cls in _REPLACEMENTS.values()])


def onnxscript_default_rules() -> tuple[RewriteRule, ...]:
    """onnxscript's default rewrite rules (what ``onnxscript.optimizer.optimize_ir`` applies)
    with its Clip-fusing rules replaced by the classes here, in the same places."""
    return tuple(_REPLACEMENTS[rule.name]().rule() if rule.name in _REPLACEMENTS else rule
                 for rule in rewriter._DEFAULT_REWRITE_RULES)
