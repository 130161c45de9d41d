"""Fold inference BatchNormalization into the Conv that feeds it.

Conv∘BN → Conv with, per output channel o and σ_o = sqrt(var_o + ε):

    W'[o] = W[o] · γ_o/σ_o,        b'_o = (b_o − μ_o) · γ_o/σ_o + β_o.

The arithmetic is onnxscript's ``FuseBatchNormIntoConv`` (which also refuses non-constant or
shared conv weights); this module adds the refusals a compiler for user graphs needs:

- training mode;
- statistics that another node also reads. Folding them would compute the same outputs (the
  rule only reads γ, β, μ, σ² and writes new conv initializers), but a graph that ties
  statistics across nodes keeps them tied, by policy: after folding, the tie is gone and an
  edit of the shared tensor would no longer reach this Conv;
- statistics that are not one value per output channel (BatchNormalization-7 ``spatial=0``);
- statistics of another type than the conv weight (BatchNormalization-15);
- a new bias whose name the graph already uses.
"""

from __future__ import annotations

import onnx_ir as ir
from onnxscript.rewriter import MatchResult, RewriteRuleSet
from onnxscript.rewriter.rules.common._fuse_batchnorm import FuseBatchNormIntoConv


class FoldBatchNormIntoConv(FuseBatchNormIntoConv):
    """``BatchNormalization(Conv(x))`` → ``Conv(x)`` with scaled weights and a new bias."""

    def __init__(self) -> None:
        super().__init__(name="fold_bn_into_conv")

    def check(self, context, x, inbound_out, batchnorm_out) -> MatchResult:  # type: ignore[override]
        result = super().check(context, x, inbound_out, batchnorm_out)
        if not result:
            return result
        bn = batchnorm_out.producer()
        if len(bn.outputs) > 1 or bn.attributes.get("training_mode") is not None and (
                bn.attributes["training_mode"].as_int()):
            return result.fail("BatchNormalization is in training mode (batch statistics).")
        for stat in bn.inputs[1:]:
            others = [user for user, _ in stat.uses() if user is not bn]
            if others:
                return result.fail(
                    f"BatchNorm parameter '{stat.name}' is shared with node "
                    f"'{others[0].name}' ({others[0].op_type}); tied statistics are kept.")
        return _check_folded_tensors(inbound_out.producer(), bn, result)


def _check_folded_tensors(conv: ir.Node, bn: ir.Node, result: MatchResult) -> MatchResult:
    """The statistics are one value per output channel (not BatchNormalization-7's
    ``spatial=0`` [C, H, W] ones), of the conv weight's type (BatchNormalization-15 allows
    others, and folding would write the weights in the wider one), and a new bias would not
    take the name of a value the graph already has (onnx_ir would rename that one, leaving
    its readers dangling)."""
    weight = conv.inputs[1].const_value
    channels = weight.shape[0]
    for stat in bn.inputs[1:]:
        if tuple(stat.const_value.shape) != (channels,):
            return result.fail(f"BatchNorm parameter '{stat.name}' has shape "
                               f"{list(stat.const_value.shape)}, not [{channels}] (one per "
                               "output channel).")
        if stat.const_value.dtype != weight.dtype:
            return result.fail(f"BatchNorm parameter '{stat.name}' is {stat.const_value.dtype}"
                               f" and the conv weight {weight.dtype}.")
    if len(conv.inputs) < 3 or conv.inputs[2] is None:
        bias_name = f"{conv.inputs[1].name}_bias"  # what onnxscript's rewrite calls it
        graph = conv.graph
        taken = ({v.name for v in graph.inputs} | set(graph.initializers)
                 | {out.name for node in graph for out in node.outputs})
        if bias_name in taken:
            return result.fail(f"the folded bias would be named '{bias_name}', which the "
                               "graph already uses.")
    return result


# Conv -> BatchNormalization  ->  Conv (W', b')
fold_bn_into_conv_rule = FoldBatchNormIntoConv.rule()

rules = RewriteRuleSet([fold_bn_into_conv_rule])
