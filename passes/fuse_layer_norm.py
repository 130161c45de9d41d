"""Fuse a decomposed layer norm into LayerNormalization (onnxscript's rules, reused).

    (x − E[x]) / sqrt(Var[x] + ε) · γ (+ β)  →  LayerNormalization(x, γ, β, axis=−1, ε)

with E and Var ReduceMeans over the last axis. Exporters at opset ≥ 17 usually emit
LayerNormalization already; this catches graphs that arrive decomposed.
"""

from __future__ import annotations

from onnxscript.rewriter import RewriteRuleSet
from onnxscript.rewriter.rules.fusion._layer_norm import layer_normalization_rules

# ReduceMean/Sub/Mul/ReduceMean/Add/Sqrt/Div/Mul -> LayerNormalization; LN + Add(β) -> LN(β)
rules = RewriteRuleSet(list(layer_normalization_rules))
