"""Fuse the erf form of GELU into one op.

    0.5 · x · (1 + erf(x / √2))  →  Gelu(x)

onnxscript's erf-GELU patterns (both association orders) matched, rewritten to the standard
ONNX Gelu (opset ≥ 20) when the model imports it, else to com.microsoft.Gelu, which ONNX
Runtime runs at any opset. ``rules(standard_only=True)`` (the mobile target) leaves the erf form
alone below opset 20 instead.
"""

from __future__ import annotations

from onnxscript.rewriter import MatchResult, RewriteRuleClassBase, RewriteRuleSet
from onnxscript.rewriter.ort_fusions.erfgelu import erf_gelu_pattern_1, erf_gelu_pattern_2

GELU_OPSET = 20


class _ErfGelu(RewriteRuleClassBase):
    def __init__(self, standard_only: bool = False) -> None:
        super().__init__()
        self.standard_only = standard_only

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
        return erf_gelu_pattern_1(op, x)


class ErfGeluInnerHalf(_ErfGelu):
    """x·(0.5·(erf(x/√2)+1))"""

    def pattern(self, op, x):
        return erf_gelu_pattern_2(op, x)


def rules(standard_only: bool = False) -> RewriteRuleSet:
    return RewriteRuleSet([
        # 0.5·(x·(erf(x/√2)+1)) -> Gelu(x)
        ErfGeluOuterHalf.rule(standard_only=standard_only),
        # x·(0.5·(erf(x/√2)+1)) -> Gelu(x)
        ErfGeluInnerHalf.rule(standard_only=standard_only),
    ], commute=True)
