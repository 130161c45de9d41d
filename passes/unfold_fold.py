"""Rewrite MobileViT's unfold/fold Reshape/Transpose chains into transpose-free forms.

Unfold maps an image X ∈ R^{B×C×H×W} to tokens T ∈ R^{B×P×N×C}, P = p² positions inside a
patch, N = (H/p)(W/p) patches: T[b, (i',j'), (i,j), c] = X[b, c, i·p+i', j·p+j'].
The reference spelling is 3 Reshapes and 2 Transposes; fold is its inverse.

SpaceToDepth with block p computes exactly the patch-position split, channel-minor:
S2D_p(X)[b, (i'·p+j')·C + c, i, j] = X[b, c, i·p+i', j·p+j'], so Reshape(S2D_p(X)) = Tᵀ as
[B·P, C, N]. The remaining N↔C swap is absorbed by the neighbouring 1×1 conv (weights
W ∈ R^{d×C}), computed as a matmul that contracts the right axes:

    unfold ∘ Conv1x1:  T' = (S2D_p(X) as [B·P, C, N])ᵀ · Wᵀ + b                 ∈ R^{B·P×N×d}
    Conv1x1 ∘ fold:    Y  = D2S_p( W · (T as [B·P, N, d])ᵀ + b  as [B, P·C, H/p, W/p])

DepthToSpace (DCR) is the inverse of SpaceToDepth. For ONNX Runtime, whose DepthToSpace is
slow, the conv-absorbing fold gathers the token rows into raster order instead and lets the
matmul write the image directly (:meth:`FoldBeforeConv1x1.rewrite`). The transposed
matmul is one node: FusedMatMul(transA/transB) for ONNX Runtime, Einsum for mobile targets.
Where no 1×1 conv is adjacent, the mobile form transposes with a second SpaceToDepth over the
whole (square) patch grid, S2D_{H/p} on [B·P, C, H/p, W/p] = [B·P, N·C, 1, 1]; the ORT form
uses one Transpose, which measured faster there.

Chains are matched by what they compute, not how they are spelled: the check runs the chain
on an index tensor and compares with the reference unfold (see :mod:`._layout`).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import MatchResult, RewriteRuleClassBase, RewriteRuleSet

from mvcompile.passes._layout import (
    batch_is_symbolic,
    chain_nodes,
    const_array,
    find_fold_patch,
    find_unfold_patch,
    float_init,
    int64_init,
    ints_attr,
    run_chain,
    sim_shape,
    static_shape,
    transposed_matmul,
)

CHAIN_LENGTH = 5  # Reshape, Transpose, Reshape, Transpose, Reshape
# How the unfold/fold rules refuse an image whose shape is not static; `mvcompile optimize`
# looks for it to suggest --batch.
NOT_STATIC = "is not a static 4-D [B,C,H,W]"


def check_pointwise_conv(conv: ir.Node, result: MatchResult) -> MatchResult:
    """Fail unless ``conv`` is a 1×1, stride-1, unpadded, ungrouped Conv with constant,
    unshared weights (and bias)."""
    weight = const_array(conv.inputs[1])
    if weight is None or weight.ndim != 4 or weight.shape[2:] != (1, 1):
        return result.fail("Conv weight is not a constant 1x1 kernel.")
    if conv.attributes.get_int("group", 1) != 1:
        return result.fail("Conv is grouped.")
    if any(s != 1 for s in ints_attr(conv, "strides") or [1]):
        return result.fail("Conv has a stride.")
    if any(p != 0 for p in ints_attr(conv, "pads") or [0]):
        return result.fail("Conv is padded.")
    auto_pad = conv.attributes.get("auto_pad")
    if auto_pad is not None and auto_pad.as_string() not in ("NOTSET", "VALID"):
        return result.fail("Conv uses auto_pad.")
    if len(conv.inputs) > 2 and conv.inputs[2] is not None and const_array(conv.inputs[2]) is None:
        return result.fail("Conv bias is not constant.")
    if len(conv.inputs[1].uses()) > 1:
        return result.fail(f"Conv weight '{conv.inputs[1].name}' is shared with other nodes.")
    return result


def _conv_bias(conv: ir.Node) -> np.ndarray | None:
    return const_array(conv.inputs[2]) if len(conv.inputs) > 2 else None


def _fold_in_shape(tokens: ir.Value, image_shape: tuple[int, ...]) -> tuple[int, ...] | None:
    """Concrete shape of a fold's token input, its leading dim derived from the image size."""
    dims = static_shape(tokens)
    if dims is None or any(d is None for d in dims[1:]):
        return None
    rest = int(np.prod(dims[1:], dtype=np.int64))
    total = int(np.prod(image_shape))
    if dims[0] is None:
        return (total // rest, *dims[1:]) if total % rest == 0 else None
    return tuple(dims)  # type: ignore[arg-type]


def _other_batches(image: ir.Value, shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    """With a symbolic batch, ``shape`` at one more batch: a chain may hard-code the
    simulated batch size and be an unfold (or fold) at that size only; [] for a static
    batch."""
    if not batch_is_symbolic(image):
        return []
    return [(shape[0] + 1, *shape[1:])]


class _ChainRule(RewriteRuleClassBase):
    """Common state: the target and the patch geometry found by ``check``."""

    def __init__(self, name: str, target: str) -> None:
        super().__init__(name=f"{name}_{target}")
        self.target = target
        self.p = 0
        self.image: tuple[int, ...] = ()  # [B, C, H, W] of the image side
        self.resolved_s3: list[int] | None = None  # an unfold's last shape with its 0s resolved

    @property
    def may_transpose(self) -> bool:
        """ORT targets may use one Transpose where no 1x1 conv can absorb the N↔C swap."""
        return self.target != "mobile"

    def _geometry(self) -> tuple[int, int, int, int]:
        """(P, N, H/p, W/p) of the matched chain."""
        _, _, h, w = self.image
        return self.p * self.p, (h // self.p) * (w // self.p), h // self.p, w // self.p

    def tokens_shape(self, op, s3: ir.Value, base: str) -> ir.Value:
        """The unfold's last Reshape shape for the rewritten chain, whose input differs from
        the original's: ``s3`` itself unless it copied input dims with 0."""
        if self.resolved_s3 is None:
            return s3
        return int64_init(op, self.resolved_s3, f"{base}_tokens_shape")


def _check_float32_weight(conv: ir.Node, result: MatchResult) -> MatchResult:
    """The conv-absorbing rewrites write new float32 weights: refuse other weight types
    (a float16 graph would mix types in one MatMul)."""
    if result and const_array(conv.inputs[1]).dtype != np.float32:
        return result.fail("Conv weight is not float32.")
    return result


class UnfoldAfterConv1x1(_ChainRule):
    """Conv1x1 → unfold chain → S2D → Reshape → transposed MatMul (+ bias) → Reshape."""

    def __init__(self, target: str = "mobile") -> None:
        super().__init__("unfold_after_conv1x1", target)

    def pattern(self, op, x, w, s1, s2, s3):
        y = op.Conv(x, w, _allow_other_inputs=True, _outputs=["conv_out"])
        t = op.Transpose(op.Reshape(y, s1))
        t = op.Transpose(op.Reshape(t, s2))
        return op.Reshape(t, s3, _outputs=["tokens"])

    def check(self, context, x, w, s1, s2, s3, conv_out, tokens) -> MatchResult:
        conv = conv_out.producer()
        result = _check_float32_weight(conv, check_pointwise_conv(conv, MatchResult()))
        if not result:
            return result
        return _check_unfold(self, conv_out, tokens, result)

    def rewrite(self, op, x, w, s1, s2, s3, conv_out, tokens):
        conv = conv_out.producer()
        weight = const_array(w)[:, :, 0, 0]  # [d, C]
        _, n, _, _ = self._geometry()
        base = f"{w.name}__unfold"
        y = op.SpaceToDepth(x, blocksize=self.p)  # [B, P·C, H/p, W/p]
        y = op.Reshape(y, int64_init(op, [-1, weight.shape[1], n], f"{base}_shape"))  # [B·P,C,N]
        y = transposed_matmul(op, y, float_init(op, weight.T, f"{base}_weight"),
                              equation="bcn,cd->bnd", trans_a=True, target=self.target)
        bias = _conv_bias(conv)
        if bias is not None:
            y = op.Add(y, float_init(op, bias, f"{base}_bias"))  # [B·P, N, d]
        return op.Reshape(y, self.tokens_shape(op, s3, base))


def _check_square_grid(rule: _ChainRule, result: MatchResult) -> MatchResult:
    """The mobile form of a chain without an adjacent 1x1 conv transposes the patch grid with
    a second SpaceToDepth/DepthToSpace, which needs a square grid."""
    if result and not rule.may_transpose:
        _, _, nh, nw = rule._geometry()
        if nh != nw:
            return result.fail(f"patch grid {nh}x{nw} is not square: no transpose-free "
                               "form without an adjacent 1x1 conv.")
    return result


class UnfoldToSpaceToDepth(_ChainRule):
    """Unfold chain alone → S2D → Reshape → S2D over the patch grid (mobile) or Transpose
    (ORT) → Reshape."""

    def __init__(self, target: str = "mobile") -> None:
        super().__init__("unfold_to_space_to_depth", target)

    def pattern(self, op, x, s1, s2, s3):
        t = op.Transpose(op.Reshape(x, s1))
        t = op.Transpose(op.Reshape(t, s2))
        return op.Reshape(t, s3, _outputs=["tokens"])

    def check(self, context, x, s1, s2, s3, tokens) -> MatchResult:
        return _check_square_grid(self, _check_unfold(self, x, tokens, MatchResult()))

    def rewrite(self, op, x, s1, s2, s3, tokens):
        c = self.image[1]
        _, n, nh, nw = self._geometry()
        base = f"{tokens.name}__unfold"
        y = op.SpaceToDepth(x, blocksize=self.p)  # [B, P·C, H/p, W/p]
        if self.may_transpose:
            y = op.Reshape(y, int64_init(op, [-1, c, n], f"{base}_shape"))  # [B·P, C, N]
            y = op.Transpose(y, perm=[0, 2, 1])  # [B·P, N, C]
        else:
            y = op.Reshape(y, int64_init(op, [-1, c, nh, nw], f"{base}_shape"))
            y = op.SpaceToDepth(y, blocksize=nh)  # [B·P, N·C, 1, 1]
        return op.Reshape(y, self.tokens_shape(op, s3, base))


def _check_unfold(rule: _ChainRule, image: ir.Value, tokens: ir.Value,
                  result: MatchResult) -> MatchResult:
    """Fail unless the chain from ``image`` [B,C,H,W] to ``tokens`` computes the reference
    unfold T[b,(i',j'),(i,j),c] = X[b,c,i·p+i',j·p+j'] for some patch p (run on an index
    tensor); record p, the image shape and the last Reshape's shape without 0s."""
    shape = sim_shape(image)
    if shape is None or len(shape) != 4:
        return result.fail(f"shape of '{image.name}' {NOT_STATIC}.")
    nodes = chain_nodes(tokens, CHAIN_LENGTH)
    p = find_unfold_patch(nodes, shape)
    if p is None:
        return result.fail("Reshape/Transpose chain is not a MobileViT unfold.")
    if any(find_unfold_patch(nodes, other) != p for other in _other_batches(image, shape)):
        return result.fail("the chain is a MobileViT unfold at one batch size only.")
    rule.p, rule.image = p, shape
    rule.resolved_s3 = None
    s3 = const_array(nodes[-1].inputs[1]).tolist()
    if 0 not in s3:  # (with allowzero=1 a 0 would empty the tokens: no unfold matches)
        return result
    rule.resolved_s3 = static_output_shape(nodes, shape, static_shape(image)[0] is not None)
    if rule.resolved_s3 is None:
        return result.fail("the last Reshape copies (0) a batch-dependent dim, and the "
                           "chain's output has another one.")
    return result


def static_output_shape(nodes: list[ir.Node], image_shape: tuple[int, ...],
                        batch_static: bool) -> list[int] | None:
    """The chain's output shape as a Reshape target that needs no 0: with a symbolic batch,
    the dims that change between two simulated batch sizes become -1 (None if more than one
    does)."""
    dims = run_chain(nodes, np.zeros(image_shape, np.int8)).shape
    if batch_static:
        return list(dims)
    other = run_chain(nodes, np.zeros((image_shape[0] + 1, *image_shape[1:]), np.int8))
    if other is None:  # the chain's shapes fit only the simulated batch
        return None
    resolved = [a if a == b else -1 for a, b in zip(dims, other.shape, strict=True)]
    return resolved if resolved.count(-1) <= 1 else None


class FoldBeforeConv1x1(_ChainRule):
    """fold chain → Conv1x1  →  Reshape → transposed MatMul (+ bias) → Reshape → D2S
    (ORT: Reshape → Gather → transposed MatMul (+ bias) → Reshape)."""

    def __init__(self, target: str = "mobile", gather_fold: bool = False) -> None:
        super().__init__("fold_before_conv1x1", target)
        self.gather_fold = gather_fold and target == "ort"

    def pattern(self, op, t, w, s1, s2, s3):
        f = op.Transpose(op.Reshape(t, s1))
        f = op.Transpose(op.Reshape(f, s2))
        image = op.Reshape(f, s3, _outputs=["image"])
        return op.Conv(image, w, _allow_other_inputs=True, _outputs=["conv_out"])

    def check(self, context, t, w, s1, s2, s3, image, conv_out) -> MatchResult:
        conv = conv_out.producer()
        result = _check_float32_weight(conv, check_pointwise_conv(conv, MatchResult()))
        if not result:
            return result
        return _check_fold(self, t, image, result)

    def rewrite(self, op, t, w, s1, s2, s3, image, conv_out):
        """With ``gather_fold`` (ORT, whose DepthToSpace is slow), one row Gather puts the
        tokens in raster order first, so that the transposed MatMul writes the image directly:

            R[b, y·W + x] = T[b, (y mod p, x mod p), (y div p, x div p)]
            Y = W · R[b]ᵀ + b   as [B, C_out, H, W]
        """
        weight = const_array(w)[:, :, 0, 0]  # [C_out, d]
        c_out, d = weight.shape
        p_area, n, nh, nw = self._geometry()
        _, _, h, w_image = self.image
        base = f"{w.name}__fold"
        if self.gather_fold:
            y = op.Reshape(t, int64_init(op, [-1, p_area * n, d], f"{base}_tokens_shape"))
            y = op.Gather(y, int64_init(op, raster_rows(self.p, h, w_image),
                                        f"{base}_raster_rows"), axis=1)  # [B, H·W, d]
        else:
            y = op.Reshape(t, int64_init(op, [-1, n, d], f"{base}_tokens_shape"))  # [B·P, N, d]
        y = transposed_matmul(op, float_init(op, weight, f"{base}_weight"), y,
                              equation="cd,bnd->bcn", trans_b=True, target=self.target)
        bias = _conv_bias(conv_out.producer())
        if bias is not None:
            y = op.Add(y, float_init(op, bias[:, None], f"{base}_bias"))  # [B(·P), C_out, ·]
        if self.gather_fold:
            return op.Reshape(y, int64_init(op, [-1, c_out, h, w_image], f"{base}_shape"))
        y = op.Reshape(y, int64_init(op, [-1, p_area * c_out, nh, nw], f"{base}_shape"))
        return op.DepthToSpace(y, blocksize=self.p, mode="DCR")  # [B, C_out, H, W]


def raster_rows(p: int, h: int, w: int) -> list[int]:
    """For each image position y·W + x in raster order, its row in the unfolded tokens
    [(i', j'), (i, j)] = [P, N]: (y mod p · p + x mod p) · N + (y div p) · W/p + x div p."""
    ys, xs = np.divmod(np.arange(h * w), w)
    n = (h // p) * (w // p)
    rows = ((ys % p) * p + xs % p) * n + (ys // p) * (w // p) + xs // p
    return rows.tolist()


class FoldToDepthToSpace(_ChainRule):
    """fold chain alone → D2S over the patch grid (mobile) or Transpose (ORT) → D2S."""

    def __init__(self, target: str = "mobile") -> None:
        super().__init__("fold_to_depth_to_space", target)

    def pattern(self, op, t, s1, s2, s3):
        f = op.Transpose(op.Reshape(t, s1))
        f = op.Transpose(op.Reshape(f, s2))
        return op.Reshape(f, s3, _outputs=["image"])

    def check(self, context, t, s1, s2, s3, image) -> MatchResult:
        return _check_square_grid(self, _check_fold(self, t, image, MatchResult()))

    def rewrite(self, op, t, s1, s2, s3, image):
        c = self.image[1]
        p_area, n, nh, nw = self._geometry()
        base = f"{image.name}__fold"
        if self.may_transpose:
            y = op.Reshape(t, int64_init(op, [-1, n, c], f"{base}_tokens_shape"))
            y = op.Transpose(y, perm=[0, 2, 1])  # [B·P, C, N]
        else:
            y = op.Reshape(t, int64_init(op, [-1, n * c, 1, 1], f"{base}_tokens_shape"))
            y = op.DepthToSpace(y, blocksize=nh, mode="DCR")  # [B·P, C, H/p, W/p]
        y = op.Reshape(y, int64_init(op, [-1, p_area * c, nh, nw], f"{base}_shape"))
        return op.DepthToSpace(y, blocksize=self.p, mode="DCR")


def _check_fold(rule: _ChainRule, tokens: ir.Value, image: ir.Value,
                result: MatchResult) -> MatchResult:
    """Fail unless the chain from ``tokens`` to ``image`` [B,C,H,W] inverts the reference
    unfold for some patch p, X[b,c,i·p+i',j·p+j'] = T[b,(i',j'),(i,j),c]; record p and the
    image shape."""
    out_shape = sim_shape(image)
    if out_shape is None or len(out_shape) != 4:
        return result.fail(f"shape of '{image.name}' {NOT_STATIC}.")
    in_shape = _fold_in_shape(tokens, out_shape)
    if in_shape is None:
        return result.fail(f"shape of '{tokens.name}' is not static.")
    nodes = chain_nodes(image, CHAIN_LENGTH)
    p = find_fold_patch(nodes, in_shape, out_shape)
    if p is None:
        return result.fail("Reshape/Transpose chain is not a MobileViT fold.")
    for other in _other_batches(image, out_shape):
        other_in = _fold_in_shape(tokens, other)
        if other_in is None or find_fold_patch(nodes, other_in, other) != p:
            return result.fail("the chain is a MobileViT fold at one batch size only.")
    rule.p, rule.image = p, out_shape
    return result


def rules(target: str = "mobile", gather_fold: bool = False) -> RewriteRuleSet:
    """Conv-absorbing rules first; the pipeline applies rules one at a time in this order.
    ``gather_fold`` (ORT only) folds with a row Gather instead of DepthToSpace."""
    return RewriteRuleSet([
        # Conv1x1 -> unfold  ->  SpaceToDepth -> Reshape -> MatMulᵀ (+b) -> Reshape
        UnfoldAfterConv1x1.rule(target),
        # fold -> Conv1x1  ->  Reshape -> MatMulᵀ (+b) -> Reshape -> DepthToSpace
        FoldBeforeConv1x1.rule(target, gather_fold),
        # unfold  ->  SpaceToDepth -> Reshape -> SpaceToDepth | Transpose -> Reshape
        UnfoldToSpaceToDepth.rule(target),
        # fold  ->  Reshape -> DepthToSpace | Transpose -> Reshape -> DepthToSpace
        FoldToDepthToSpace.rule(target),
    ])
