"""Fuse a decomposed layer norm into LayerNormalization (onnxscript's rules, reused).

    (x − E[x]) / sqrt(Var[x] + ε) · γ (+ β)  →  LayerNormalization(x, γ, β, axis=−1, ε)

with E and Var ReduceMeans over the last axis. Exporters at opset ≥ 17 usually emit
LayerNormalization already; this catches graphs that arrive decomposed.

LayerNormalization's output has x's shape, and γ, β must broadcast *to* x (unidirectionally).
The ``Mul(·, γ)`` and ``Add(·, β)`` it replaces broadcast both ways, so onnxscript's rules are
wrapped to refuse a γ, β or ε that could widen the result (e.g. β of shape [3, N, C] added to
x of shape [1, N, C], or ε of shape [1, 1, 1, 1] on x of rank 3); the fused node would then
compute a smaller tensor.
"""

from __future__ import annotations

import onnx_ir as ir
from onnxscript.rewriter import MatchResult, RewriteRuleClassBase, RewriteRuleSet
from onnxscript.rewriter.rules.fusion._layer_norm import LayerNormBiasFusion, LayerNormFusion

from mvcompile.passes._layout import broadcasts_unchanged
from mvcompile.passes._reasons import NOTHING_TO_DO


def _check_broadcast(result: MatchResult, x: ir.Value, name: str, value: ir.Value) -> MatchResult:
    """Fail unless ``value`` broadcasts to ``x``'s shape, both known, without widening it."""
    if result and (value.shape is None or x.shape is None
                   or not broadcasts_unchanged(value.shape.dims, x.shape.dims)):
        return result.fail(f"{name} '{value.name}' (shape {value.shape}) does not broadcast to "
                           f"the normalized input's shape {x.shape} without widening it.")
    return result


class ExplicitKeepdims(RewriteRuleClassBase):
    """``ReduceMean(x, axes)`` without a keepdims attribute → the same with ``keepdims=1``,
    its default: onnxscript's layer-norm pattern asks for the attribute spelled out, and
    writers that leave defaults out (onnx.parser text, some exporters) would never match.
    Opset ≥ 18 (axes an input); earlier opsets have no LayerNormalization below 17 anyway."""

    def pattern(self, op, x, axes):
        return op.ReduceMean(x, axes, _outputs=["mean"])

    def check(self, context, x, axes, mean) -> MatchResult:
        result = MatchResult()
        if "keepdims" in mean.producer().attributes:
            return result.fail(f"{NOTHING_TO_DO}keepdims is already explicit.")
        return result

    def rewrite(self, op, x, axes, mean):
        node = mean.producer()
        noop = node.attributes.get_int("noop_with_empty_axes", 0)
        return op.ReduceMean(x, axes, keepdims=1, noop_with_empty_axes=noop)


class LayerNormScale(LayerNormFusion):
    """onnxscript's decomposed-layer-norm rule, with γ checked to broadcast to x."""

    def check(self, context, x, scale, epsilon, **rest) -> MatchResult:  # type: ignore[override]
        result = super().check(context, x, epsilon, **rest)
        result = _check_broadcast(result, x, "epsilon", epsilon)  # any rank: [1,1,1,1] widens
        return _check_broadcast(result, x, "scale", scale)


class LayerNormBias(LayerNormBiasFusion):
    """onnxscript's LayerNormalization + Add(β) rule, with β checked to broadcast to x, on a
    LayerNormalization with one output (its replacement has one)."""

    def check(self, context, x, scale, bias, normalized) -> MatchResult:  # type: ignore[override]
        result = MatchResult()
        if len(normalized.producer().outputs) > 1:
            return result.fail("LayerNormalization also declares its Mean/InvStdDev outputs.")
        return _check_broadcast(result, x, "bias", bias)


rules = RewriteRuleSet([
    # ReduceMean(x, axes) -> ReduceMean(x, axes, keepdims=1): the pattern below spells it out
    ExplicitKeepdims.rule(name="ExplicitKeepdims"),
    # ReduceMean/Sub/Mul/ReduceMean/Add/Sqrt/Div/Mul -> LayerNormalization
    LayerNormScale.rule(name="LayerNormFusion"),
    # LayerNormalization + Add(β) -> LayerNormalization(β)
    LayerNormBias.rule(name="LayerNormBiasFusion"),
])
