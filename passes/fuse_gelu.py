"""Fuse the erf form of GELU into one op.

    0.5 · x · (1 + erf(x / √2))  →  Gelu(x)

onnxscript's erf-GELU patterns (both association orders) matched, rewritten to the standard
ONNX Gelu (opset ≥ 20) when the model imports it, else to com.microsoft.Gelu, which ONNX
Runtime runs at any opset.
"""

from __future__ import annotations

import math

from onnxscript.rewriter import MatchResult, RewriteRuleClassBase, RewriteRuleSet

GELU_OPSET = 20


class _ErfGelu(RewriteRuleClassBase):
    def check(self, context, x) -> MatchResult:
        self.standard = context.model.opset_imports.get("", 0) >= GELU_OPSET
        return MatchResult()

    def rewrite(self, op, x):
        if self.standard:
            return op.Gelu(x)
        return op.Gelu(x, _domain="com.microsoft")


class ErfGeluOuterHalf(_ErfGelu):
    def pattern(self, op, x):
        return 0.5 * (x * (op.Erf(x / math.sqrt(2)) + 1.0))


class ErfGeluInnerHalf(_ErfGelu):
    def pattern(self, op, x):
        return x * (0.5 * (op.Erf(x / math.sqrt(2)) + 1.0))


rules = RewriteRuleSet([
    # 0.5·(x·(erf(x/√2)+1)) -> Gelu(x)
    ErfGeluOuterHalf.rule(),
    # x·(0.5·(erf(x/√2)+1)) -> Gelu(x)
    ErfGeluInnerHalf.rule(),
], commute=True)
