"""Rewrite im2col-style unfold and col2im fold (MobileViTV2) into rank-4 SpaceToDepth and
DepthToSpace.

MobileViTV2 cuts a feature map X ∈ R^{B×C×H×W} into p×p patches with torch's ``unfold`` and
keeps the result channel-major, T ∈ R^{B×C×P×N} (P = p², N = (H/p)(W/p)):

    T[b, c, ki·p + kj, i·(W/p) + j] = X[b, c, i·p + ki, j·p + kj]

Exporters spell it as Gather(rows) → Gather(columns) → a rank-6 Transpose → Reshape, and the
inverse ``fold`` as Col2Im with stride = kernel. Rank 6 is beyond Core ML's limit of 5.
SpaceToDepth orders its output channels position-major, (ki, kj, c); applied to every channel
on its own, as X viewed [B·C, 1, H, W], there is only c = 0, so

    T = Reshape(SpaceToDepth_p(Reshape(X, [B·C, 1, H, W])), [B, C, P, N])
    X = Reshape(DepthToSpace_p(Reshape(T, [B·C, P, H/p, W/p])), [B, C, H, W])

(DepthToSpace with one output channel is the same in DCR and CRD order.) Every tensor stays
rank 4, and there is no Transpose. Where p does not divide H or W, torch's unfold skips the
last H mod p rows and W mod p columns and fold leaves them zero: the rewrite then slices the
image to H' = p·⌊H/p⌋, W' = p·⌊W/p⌋ before SpaceToDepth and pads it back with zeros after
DepthToSpace. Unfold chains are matched by what they compute: the chain is
run on an index tensor and compared with the formula above.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import MatchResult, RewriteRuleClassBase, RewriteRuleSet

from mvcompile.passes._layout import (
    batch_is_symbolic,
    chain_nodes,
    const_array,
    int64_init,
    ints_attr,
    run_chain,
    sim_shape,
    unfold_ref,
)

UNFOLD_CHAIN = 4  # Gather, Gather, Transpose, Reshape


def im2col_ref(x: np.ndarray, p: int) -> np.ndarray:
    """Reference unfold: [B,C,H,W] -> [B,C,P,N] as in the module docstring (rows and columns
    beyond the last whole patch are skipped)."""
    h, w = x.shape[2] - x.shape[2] % p, x.shape[3] - x.shape[3] % p
    return unfold_ref(x[:, :, :h, :w], p).transpose(0, 3, 1, 2)  # [B,P,N,C] -> [B,C,P,N]


def find_im2col_patch(nodes: list[ir.Node], shape: tuple[int, ...]) -> int | None:
    """The p for which ``nodes`` compute im2col_ref (as [B,C,P,N]), or None."""
    index = np.arange(int(np.prod(shape))).reshape(shape)
    out = run_chain(nodes, index)
    if out is None or out.ndim != 4:
        return None
    for p in range(2, min(shape[2], shape[3]) + 1):
        ref = im2col_ref(index, p)
        if out.shape == ref.shape and np.array_equal(out, ref):
            return p
    return None


class Im2ColUnfold(RewriteRuleClassBase):
    """Gather → Gather → Transpose → Reshape computing im2col → SpaceToDepth per channel."""

    def pattern(self, op, x, rows, cols, shape):
        picked = op.Gather(op.Gather(x, rows, _allow_other_inputs=True), cols)
        return op.Reshape(op.Transpose(picked), shape, _outputs=["tokens"])

    def check(self, context, x, tokens, **_) -> MatchResult:
        result = MatchResult()
        self.shape = sim_shape(x)
        if self.shape is None or len(self.shape) != 4:
            return result.fail("input is not [B, C, H, W] with static C, H, W.")
        nodes = chain_nodes(tokens, UNFOLD_CHAIN)
        self.patch = find_im2col_patch(nodes, self.shape) if nodes else None
        if self.patch is None:
            return result.fail("the chain does not compute an im2col unfold [B, C, P, N].")
        if batch_is_symbolic(x) and find_im2col_patch(
                nodes, (self.shape[0] + 1, *self.shape[1:])) != self.patch:
            return result.fail("the chain computes an im2col unfold at one batch size only.")
        return result

    def rewrite(self, op, x, tokens, **_):
        _, c, h, w = self.shape
        p = self.patch
        name = tokens.name
        if h % p or w % p:  # torch's unfold skips the rows and columns past the last patch
            h, w = h - h % p, w - w % p
            x = op.Slice(x, int64_init(op, [0, 0], f"{name}_crop_starts"),
                         int64_init(op, [h, w], f"{name}_crop_ends"),
                         int64_init(op, [2, 3], f"{name}_crop_axes"))
        per_channel = op.Reshape(x, int64_init(op, [-1, 1, h, w], f"{name}_per_channel"))
        s2d = op.SpaceToDepth(per_channel, blocksize=p)  # [B·C, P, H/p, W/p]
        return op.Reshape(s2d, int64_init(op, [-1, c, p * p, (h // p) * (w // p)],
                                          f"{name}_tokens_shape"))


class Col2ImFold(RewriteRuleClassBase):
    """Col2Im with stride = kernel (non-overlapping) → DepthToSpace per channel."""

    def pattern(self, op, cols, image_shape, block_shape):
        return op.Col2Im(cols, image_shape, block_shape, _outputs=["image"])

    def check(self, context, cols, image_shape, block_shape, image) -> MatchResult:
        result = MatchResult()
        node = image.producer()
        size, block = const_array(image_shape), const_array(block_shape)
        if size is None or block is None or size.shape != (2,) or block.shape != (2,):
            return result.fail("image_shape and block_shape are not constant 2-vectors.")
        p = int(block[0])
        if int(block[1]) != p:
            return result.fail("the block is not square.")
        if (ints_attr(node, "strides") or [1, 1]) != [p, p]:
            return result.fail("stride is not the block size (patches overlap or leave gaps).")
        if any(ints_attr(node, "pads") or []) or any(d != 1 for d in
                                                    ints_attr(node, "dilations") or []):
            return result.fail("Col2Im has pads or dilations.")
        h, w = int(size[0]), int(size[1])
        dims = cols.shape
        if (dims is None or len(dims) != 3 or not isinstance(dims[1], int)
                or dims[1] % (p * p) or dims[2] != (h // p) * (w // p)):
            return result.fail("column shape is not [B, C·p², (H/p)(W/p)] with static C.")
        self.fold = (dims[1] // (p * p), h, w, p)
        return result

    def rewrite(self, op, cols, image, **_):
        c, h, w, p = self.fold
        name = image.name
        grid = op.Reshape(cols, int64_init(op, [-1, p * p, h // p, w // p], f"{name}_grid"))
        d2s = op.DepthToSpace(grid, blocksize=p)  # [B·C, 1, H', W']
        covered = op.Reshape(d2s, int64_init(op, [-1, c, h - h % p, w - w % p],
                                              f"{name}_image_shape"))
        if not (h % p or w % p):
            return covered
        # rows and columns that no patch covers stay zero, as in Col2Im
        return op.Pad(covered, int64_init(op, [0, 0, 0, 0, 0, 0, h % p, w % p],
                                          f"{name}_uncovered"))


def rules() -> RewriteRuleSet:
    # Gather -> Gather -> Transpose(rank 6) -> Reshape   =>   Reshape -> SpaceToDepth -> Reshape
    # Col2Im(stride = block)                             =>   Reshape -> DepthToSpace -> Reshape
    return RewriteRuleSet([Im2ColUnfold.rule(), Col2ImFold.rule()])
