"""Fuse x·σ(x) (Swish/SiLU written as Sigmoid → Mul) into one op.

    Mul(x, Sigmoid(x)) → Swish(x) = x·σ(x)                 (ONNX opset 24, for mobile targets)
    Mul(x, Sigmoid(x)) → com.microsoft.QuickGelu(x, α=1) = x·σ(1·x)   (for ONNX Runtime)

Which op is measured, not assumed (``python benchmarks/ort_quirks.py``, table 1: six
Conv → activation layers on ONNX Runtime 1.31): QuickGelu and Sigmoid·Mul run the same (ORT
rewrites Sigmoid·Mul into QuickGelu itself) and opset-24 Swish is about 1.5× slower, so the
ORT pipeline emits QuickGelu and the mobile pipeline the standard Swish, which Core ML's
``silu`` maps to.
After :mod:`fuse_conv_bn`, each conv-BN-swish chain is Conv → Swish.
"""

from __future__ import annotations

import onnx_ir as ir
from onnxscript.rewriter import MatchResult, RewriteRuleClassBase, RewriteRuleSet

SWISH_OPSET = 24
FLOAT_TYPES = {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE}


class FuseSwish(RewriteRuleClassBase):
    """``Mul(x, Sigmoid(x))`` → ``Swish(x)`` (target "mobile") or ``QuickGelu(x)`` ("ort")."""

    def __init__(self, target: str = "mobile") -> None:
        super().__init__(name=f"fuse_swish_{target}")
        self.target = target

    def pattern(self, op, x):
        return op.Mul(x, op.Sigmoid(x))

    def check(self, context, x) -> MatchResult:
        result = MatchResult()
        if x.dtype is not None and x.dtype not in FLOAT_TYPES:
            return result.fail(f"input type {x.dtype} is not floating point.")
        if self.target == "mobile":
            opset = context.model.opset_imports.get("", 0)
            if opset < SWISH_OPSET:
                return result.fail(f"model imports ONNX opset {opset}; Swish needs opset "
                                   f"{SWISH_OPSET} (upgrade the model or use the ORT pipeline).")
        return result

    def rewrite(self, op, x):
        if self.target == "ort":
            return op.QuickGelu(x, alpha=1.0, _domain="com.microsoft")
        return op.Swish(x)


def rules(target: str = "mobile") -> RewriteRuleSet:
    """The rule set for ``target`` in {"mobile", "ort"}, both operand orders of Mul."""
    # Mul(x, Sigmoid(x)) -> Swish(x) | QuickGelu(x)
    return RewriteRuleSet([FuseSwish.rule(target)], commute=True)
