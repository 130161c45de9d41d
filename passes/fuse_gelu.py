"""Fuse the erf form of GELU into one op.

    0.5 · x · (1 + erf(x / √2))  →  Gelu(x)

onnxscript's erf-GELU patterns (both association orders), matched with x/√2 written as a
Div by √2 or a Mul by 1/√2 and, unlike onnxscript's, to within float16 rounding of those
constants (a float16 export stores √2 as 1.4140625, 1.1e-4 off), rewritten to the standard
ONNX Gelu (opset ≥ 20) when the model imports it, else to com.microsoft.Gelu, which ONNX
Runtime runs at any opset. ``rules(standard_only=True)`` (the mobile target) leaves the erf form
alone below opset 20 instead.
"""

from __future__ import annotations

import math

from onnxscript.rewriter import MatchResult, RewriteRuleClassBase, RewriteRuleSet
from onnxscript.rewriter.pattern import Constant

GELU_OPSET = 20
# float16 keeps 11 significant bits: a constant stored in it is within 2⁻¹¹ ≈ 4.9e-4 of its
# value, relatively
HALF_REL_TOL = 1e-3


def _scaled(op, x, divide: bool):
    """x/√2, as Div(x, √2) or Mul(x, 1/√2)."""
    if divide:
        return op.Div(x, Constant(math.sqrt(2), rel_tol=HALF_REL_TOL))
    return op.Mul(x, Constant(math.sqrt(0.5), rel_tol=HALF_REL_TOL))


def _erf_plus_one(op, x, divide: bool):
    return op.Add(op.Erf(_scaled(op, x, divide)), Constant(1.0))


class _ErfGelu(RewriteRuleClassBase):
    def __init__(self, standard_only: bool = False, divide: bool = True) -> None:
        super().__init__()
        self.standard_only = standard_only
        self.divide = divide

    def check(self, context, x) -> MatchResult:
        self.standard = context.model.opset_imports.get("", 0) >= GELU_OPSET
        if self.standard_only and not self.standard:
            return MatchResult().fail(f"standard Gelu needs opset {GELU_OPSET} (the model "
                                      "imports an older one) and this target allows no "
                                      "com.microsoft ops")
        return MatchResult()

    def rewrite(self, op, x):
        if self.standard:
            return op.Gelu(x)
        return op.Gelu(x, _domain="com.microsoft")


class ErfGeluOuterHalf(_ErfGelu):
    """0.5·(x·(erf(x/√2)+1))"""

    def pattern(self, op, x):
        return op.Mul(Constant(0.5), op.Mul(x, _erf_plus_one(op, x, self.divide)))


class ErfGeluInnerHalf(_ErfGelu):
    """x·(0.5·(erf(x/√2)+1))"""

    def pattern(self, op, x):
        return op.Mul(x, op.Mul(Constant(0.5), _erf_plus_one(op, x, self.divide)))


def rules(standard_only: bool = False) -> RewriteRuleSet:
    return RewriteRuleSet([
        # 0.5·(x·(erf(x/√2)+1)) -> Gelu(x)
        *(ErfGeluOuterHalf.rule(standard_only=standard_only, divide=divide)
          for divide in (True, False)),
        # x·(0.5·(erf(x/√2)+1)) -> Gelu(x)
        *(ErfGeluInnerHalf.rule(standard_only=standard_only, divide=divide)
          for divide in (True, False)),
    ], commute=True)
