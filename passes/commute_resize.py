"""Move a spatial Resize across a 1×1 convolution, so that the convolution meets the
unfold/fold chain it belongs to.

Transformers' MobileViT interpolates a feature map whose side is not a multiple of the patch
size (the last block at 224²: 7×7 → 8×8 before unfold, 8×8 → 7×7 after fold), which puts a
Resize between the block's 1×1 convolutions and its unfold/fold chains:

    unfold(Resize(Conv1x1(x)))      Conv1x1(Resize(fold(t)))

A linear or nearest Resize computes each output pixel as a weighted sum of input pixels of the
same channel, R(X)[c, q] = Σ_p a_qp X[c, p], with weights that sum to one, Σ_p a_qp = 1. A 1×1
convolution is the same affine map at every pixel, C(X)[o, p] = Σ_c W_oc X[c, p] + b_o. So

    R(C(X))[o, q] = Σ_p a_qp (Σ_c W_oc X[c, p] + b_o) = Σ_c W_oc R(X)[c, q] + b_o = C(R(X))[o, q]

and the two commute exactly (up to float rounding). After the swap the 1×1 convolution sits
next to the unfold/fold chain, which :mod:`unfold_fold` then absorbs into its weights; the
Resize moves to the side with the convolution's other channel count. The swap is only made
where that chain follows (Reshape, SpaceToDepth or DepthToSpace on the other side of the
Resize), since elsewhere it would only move work around. (The rewrite engine itself refuses a
match whose inner value has other consumers.)
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import (
    MatchResult,
    RewriterContext,
    RewriteRuleClassBase,
    RewriteRuleSet,
)

from mvcompile.passes._layout import const_array, int64_init
from mvcompile.passes.unfold_fold import check_pointwise_conv

CHAIN_OPS = {"Reshape", "SpaceToDepth", "DepthToSpace"}
AFFINE_MODES = {"nearest", "linear"}  # weights a_qp ≥ 0 with Σ_p a_qp = 1


def check_spatial_resize(resize: ir.Node, result: MatchResult) -> MatchResult:
    """Fail unless ``resize`` interpolates only the spatial axes of an NCHW tensor with
    constant scales or sizes, in a mode whose weights sum to one."""
    attrs = resize.attributes
    mode = attrs["mode"].as_string() if "mode" in attrs else "nearest"
    if mode not in AFFINE_MODES:
        return result.fail(f"Resize mode '{mode}' is not one of {sorted(AFFINE_MODES)}.")
    transform = attrs.get("coordinate_transformation_mode")
    if transform is not None and transform.as_string() == "tf_crop_and_resize":
        return result.fail("tf_crop_and_resize fills with a constant, which does not commute.")
    policy = attrs.get("keep_aspect_ratio_policy")
    if policy is not None and policy.as_string() != "stretch":
        return result.fail("keep_aspect_ratio_policy is not 'stretch'.")
    if "axes" in attrs:
        return result.fail("Resize with an 'axes' attribute is not handled.")
    factors = _scales_or_sizes(resize)
    if factors is None:
        return result.fail("Resize scales/sizes are not one constant 4-vector.")
    kind, values = factors
    in_shape = resize.inputs[0].shape
    if kind == "scales" and not np.array_equal(values[:2], [1.0, 1.0]):
        return result.fail("Resize scales the batch or channel axis.")
    if kind == "sizes" and (in_shape is None or list(values[:2]) != list(in_shape.dims[:2])):
        return result.fail("Resize sizes change (or cannot be checked on) batch and channels.")
    return result


def _scales_or_sizes(resize: ir.Node) -> tuple[str, np.ndarray] | None:
    """("scales", s) or ("sizes", s) from the Resize's constant inputs 2 or 3."""
    inputs = list(resize.inputs) + [None] * (4 - len(resize.inputs))
    for kind, value in (("sizes", inputs[3]), ("scales", inputs[2])):
        if value is None:
            continue
        array = const_array(value)
        if array is not None and array.size == 0:
            continue
        return (kind, array) if array is not None and array.shape == (4,) else None
    return None


def _consumer_ops(value: ir.Value) -> set[str]:
    """The op types that read ``value``."""
    return {use.node.op_type for use in value.uses()}


def _check_swap(conv: ir.Value, resized: ir.Value) -> MatchResult:
    """Fail unless the producers of ``conv`` and ``resized`` are a 1×1 conv and a spatial
    Resize that commute."""
    result = check_pointwise_conv(conv.producer(), MatchResult())
    return check_spatial_resize(resized.producer(), result) if result else result


def _resize_to(op: RewriterContext, resize: ir.Node, x: ir.Value, channels: int,
               name: str) -> ir.Value:
    """A copy of ``resize`` applied to ``x``, with its sizes (if any) set to ``channels``."""
    kind, values = _scales_or_sizes(resize)
    attrs = {k: a.value for k, a in resize.attributes.items()}
    if kind == "scales":
        return op.Resize(x, resize.inputs[1], resize.inputs[2], **attrs)
    sizes = [int(values[0]), channels, int(values[2]), int(values[3])]
    return op.Resize(x, resize.inputs[1] if len(resize.inputs) > 1 else None, None,
                     int64_init(op, sizes, name), **attrs)


def _conv(op: RewriterContext, conv: ir.Node, x: ir.Value) -> ir.Value:
    """``conv`` (same weights, bias and attributes) applied to ``x`` instead."""
    attrs = {k: a.value for k, a in conv.attributes.items()}
    return op.Conv(x, *conv.inputs[1:], **attrs)


class ResizeBeforeUnfold(RewriteRuleClassBase):
    """``Resize(Conv1x1(x))`` feeding an unfold → ``Conv1x1(Resize(x))``."""

    def pattern(self, op, x):
        conv = op.Conv(x, _allow_other_inputs=True, _outputs=["conv"])
        return op.Resize(conv, _allow_other_inputs=True, _outputs=["resized"])

    def check(self, context, x, conv, resized) -> MatchResult:
        result = _check_swap(conv, resized)
        if result and not _consumer_ops(resized) <= CHAIN_OPS:
            result.fail("the Resize output does not feed an unfold chain.")
        if result and (x.shape is None or not isinstance(x.shape.dims[1], int)):
            result.fail("the Conv input's channel count is not static.")
        return result

    def rewrite(self, op, x, conv, resized):
        moved = _resize_to(op, resized.producer(), x, x.shape.dims[1], f"{resized.name}_sizes")
        return _conv(op, conv.producer(), moved)


class ResizeAfterFold(RewriteRuleClassBase):
    """``Conv1x1(Resize(t))`` after a fold → ``Resize(Conv1x1(t))``."""

    def pattern(self, op, t):
        resized = op.Resize(t, _allow_other_inputs=True, _outputs=["resized"])
        return op.Conv(resized, _allow_other_inputs=True, _outputs=["conv"])

    def check(self, context, t, resized, conv) -> MatchResult:
        result = _check_swap(conv, resized)
        if result and (t.producer() is None or t.producer().op_type not in CHAIN_OPS):
            result.fail("the Resize input does not come from a fold chain.")
        return result

    def rewrite(self, op, t, resized, conv):
        out_channels = const_array(conv.producer().inputs[1]).shape[0]
        convolved = _conv(op, conv.producer(), t)
        return _resize_to(op, resized.producer(), convolved, out_channels,
                          f"{resized.name}_sizes")


def rules() -> RewriteRuleSet:
    # Resize(Conv1x1(x)) -> unfold   =>   Conv1x1(Resize(x)) -> unfold
    # fold -> Conv1x1(Resize(t))     =>   fold -> Resize(Conv1x1(t))
    return RewriteRuleSet([ResizeBeforeUnfold.rule(), ResizeAfterFold.rule()])
