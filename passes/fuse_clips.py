"""Fuse chained Clip/Relu into one Clip, correctly for every pair of ranges.

With clamp(v, a, b) = min(max(v, a), b), which is ONNX Clip's definition even when a > b (every
value becomes b), and an absent bound read as ∓∞:

    Clip(Clip(x, a₁, b₁), a₂, b₂) → Clip(x, clamp(a₁, a₂, b₂), clamp(b₁, a₂, b₂))
    Relu(Clip(x, a, b))           → Clip(x, max(a, 0), max(b, 0))

Both follow from clamp(·, a₂, b₂) being non-decreasing, so that applying it after a clamp to
[a₁, b₁] is a clamp to the images of a₁ and b₁.

onnxscript 0.7's own rules, which its optimizer applies by default, take max(a₁, a₂) and
min(b₁, b₂), and max(a, 0) and b: right where the ranges overlap, wrong where they do not.
``Clip(Clip(x, -1, -0.5), 0, 1)`` is 0 for every x, and its ``Clip(x, 0, -0.5)`` is -0.5;
``Relu(Clip(x, -2, -1))`` is 0, and its ``Clip(x, 0, -1)`` is -1. The classes here keep
onnxscript's patterns and checks (constant bounds only) and replace the arithmetic;
:func:`onnxscript_default_rules` is onnxscript's default rule list with these in place of its
two, which :class:`mvcompile.pipeline.OnnxscriptOptimize` runs its optimizer with.
(``Clip(Relu(x), a, b)`` → ``Clip(x, max(a, 0), b)``, onnxscript's third rule, is right for
every range: where b < 0 both sides are b.)
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript import rewriter
from onnxscript.rewriter import RewriteRuleSet
from onnxscript.rewriter.rules.common import _fuse_relus_clips


def _lower(low1: np.ndarray | None, low2: np.ndarray | None, high2: np.ndarray | None
           ) -> np.ndarray | None:
    """clamp(a₁, a₂, b₂), None standing for an absent bound (a₁ = -∞ and the result -∞)."""
    value = low1 if low2 is None else low2 if low1 is None else np.maximum(low1, low2)
    return value if value is None or high2 is None else np.minimum(value, high2)


def _upper(high1: np.ndarray | None, low2: np.ndarray | None, high2: np.ndarray | None
           ) -> np.ndarray | None:
    """clamp(b₁, a₂, b₂), None standing for an absent bound (b₁ = +∞ and the result +∞)."""
    if high1 is None:
        return high2
    value = high1 if low2 is None else np.maximum(high1, low2)
    return value if high2 is None else np.minimum(value, high2)


def _tensor(value: np.ndarray | None, dtype: np.dtype) -> ir.Tensor | None:
    return None if value is None else ir.tensor(np.array(value, dtype=dtype))


class FuseSuccessiveClip(_fuse_relus_clips.FuseSuccessiveClip):
    """``Clip(Clip(x, a₁, b₁), a₂, b₂)`` → ``Clip(x, clamp(a₁, a₂, b₂), clamp(b₁, a₂, b₂))``."""

    def compute_clip_min_max(self, first_clip_node: ir.Node, second_clip_node: ir.Node):
        low1, high1, dtype = self.extract_min_max(first_clip_node)
        low2, high2, _ = self.extract_min_max(second_clip_node)
        return (_tensor(_lower(low1, low2, high2), dtype),
                _tensor(_upper(high1, low2, high2), dtype))


class FuseSuccessiveReluClip(_fuse_relus_clips.FuseSuccessiveReluClip):
    """``Relu(Clip(x, a, b))`` → ``Clip(x, max(a, 0), max(b, 0))``."""

    def compute_clip_min_max(self, first_clip_node: ir.Node, _):
        low, high, dtype = self.extract_min_max(first_clip_node)
        zero = np.zeros((), dtype)
        return (_tensor(zero if low is None else np.maximum(low, zero), dtype),
                _tensor(None if high is None else np.maximum(high, zero), dtype))


# onnxscript's rule names; ours keep them (a rule is named after its class)
_REPLACEMENTS = {cls.__name__: cls for cls in (FuseSuccessiveClip, FuseSuccessiveReluClip)}

rules = RewriteRuleSet([cls().rule() for cls in _REPLACEMENTS.values()])


def onnxscript_default_rules() -> tuple:
    """onnxscript's default rewrite rules (what ``onnxscript.optimizer.optimize_ir`` applies)
    with its two Clip-fusing rules replaced by the classes here, in the same places."""
    return tuple(_REPLACEMENTS[rule.name]().rule() if rule.name in _REPLACEMENTS else rule
                 for rule in rewriter._DEFAULT_REWRITE_RULES)
