"""Fold multi-head attention's head split/merge transposes into per-head weight constants.

The reference attention on tokens X ∈ R^{G·N×d} (G groups of N tokens, h heads of width
d_h = d/h) splits heads with Reshape + Transpose:

    Q_h = (X·W_qᵀ + b_q)[:, h-th slice] as [G, h, N, d_h]   (likewise K_h, V_h; Kᵀ for scores)
    O   = merge_h(softmax(s·Q_h·K_hᵀ)·V_h)·W_oᵀ + b_o        merge_h = Transpose + Reshape

The rewrite keeps every tensor in [G, h, N, ·] order by stacking per-head weights as batched
MatMul constants, with the score scale s folded into the query weights:

    [Q|K|V]_h = X[G,1,N,d] · A_h + c_h,  A_h = [s·W_q,h | W_k,h | W_v,h]ᵀ ∈ R^{h×d×3d_h}
    S_h = Q_h·K_hᵀ   (one transposed MatMul: FusedMatMul transB for ORT, Einsum for mobile)
    O   = Σ_h (softmax(S_h)·V_h) · W_o,hᵀ + b_o,        W_o,hᵀ ∈ R^{h×d_h×d}

Σ_h is a ReduceSum over the head axis, so no Transpose remains and the rank stays 4.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import MatchResult, RewriteRuleClassBase, RewriteRuleSet

from mvcompile.passes._layout import (
    const_array,
    float_attr,
    float_init,
    int64_init,
    int_attr,
    ints_attr,
    transposed_matmul,
)

MIN_OPSET = 13  # Split and ReduceSum take their sizes/axes as inputs from opset 13
HEAD_PERM = [0, 2, 1, 3]  # [G, N, h, d_h] <-> [G, h, N, d_h]
KEY_PERM = [0, 2, 3, 1]  # [G, N, h, d_h] -> [G, h, d_h, N]


def _linear(gemm: ir.Node) -> tuple[np.ndarray, np.ndarray] | None:
    """(W [d_out, d_in], b [d_out]) of a ``Gemm(x, W, b, transB=1)`` with constants."""
    if int_attr(gemm, "transA", 0) or not int_attr(gemm, "transB", 0):
        return None
    if float_attr(gemm, "alpha", 1.0) != 1.0 or float_attr(gemm, "beta", 1.0) != 1.0:
        return None
    weight = const_array(gemm.inputs[1])
    bias = const_array(gemm.inputs[2]) if len(gemm.inputs) > 2 else None
    if weight is None or weight.ndim != 2:
        return None
    if bias is None:
        bias = np.zeros(weight.shape[0], np.float32)
    return weight, np.broadcast_to(bias, (weight.shape[0],))


def _per_head(weight: np.ndarray, heads: int) -> np.ndarray:
    """W [d_out, d_in] of a head-split projection -> [h, d_in, d_h] so that x·result_h is
    head h."""
    d_out, d_in = weight.shape
    return weight.T.reshape(d_in, heads, d_out // heads).transpose(1, 0, 2)


class FoldHeadSplit(RewriteRuleClassBase):
    """Gemm q/k/v → Reshape → Transpose ... Transpose → Reshape → Gemm out, as per-head
    batched MatMuls with no Transpose."""

    def __init__(self, target: str = "mobile") -> None:
        super().__init__(name=f"fold_head_split_{target}")
        self.target = target
        self.tokens = self.heads = self.head_dim = 0
        self.scale = 1.0

    def pattern(self, op, x, wq, wk, wv, sq, sk, sv, scale, so, wo):
        q = op.Transpose(op.Reshape(op.Gemm(x, wq, _allow_other_inputs=True, _outputs=["gq"]),
                                    sq), _outputs=["q"])
        kt = op.Transpose(op.Reshape(op.Gemm(x, wk, _allow_other_inputs=True,
                                             _outputs=["gk"]), sk), _outputs=["kt"])
        v = op.Transpose(op.Reshape(op.Gemm(x, wv, _allow_other_inputs=True, _outputs=["gv"]),
                                    sv), _outputs=["v"])
        probs = op.Softmax(op.Mul(op.MatMul(q, kt), scale), _outputs=["probs"])
        ctx = op.Transpose(op.MatMul(probs, v), _outputs=["ctx"])
        return op.Gemm(op.Reshape(ctx, so), wo, _allow_other_inputs=True, _outputs=["out"])

    def check(self, context, x, sq, sk, sv, scale, so, **values) -> MatchResult:
        result = MatchResult()
        opset = context.model.opset_imports.get("", 0)
        if opset < MIN_OPSET:
            return result.fail(f"opset {opset} < {MIN_OPSET}: the rewrite emits the opset-13 "
                               "forms of Split and ReduceSum (axes as inputs).")
        for name in ("gq", "gk", "gv", "out"):
            if _linear(values[name].producer()) is None:
                return result.fail(f"{name} is not Gemm(x, W, b, transB=1) with constant W, b.")
        perms = {"q": HEAD_PERM, "kt": KEY_PERM, "v": HEAD_PERM, "ctx": HEAD_PERM}
        for name, perm in perms.items():
            if ints_attr(values[name].producer(), "perm") != perm:
                return result.fail(f"Transpose of {name} is not {perm}.")
        shapes = [const_array(s) for s in (sq, sk, sv)]
        if any(s is None or s.shape != (4,) for s in shapes) or not all(
                np.array_equal(shapes[0], s) for s in shapes[1:]):
            return result.fail("q/k/v head-split shapes are not one constant [G, N, h, d_h].")
        _, self.tokens, self.heads, self.head_dim = (int(v) for v in shapes[0])
        d = self.heads * self.head_dim
        if min(self.tokens, self.heads, self.head_dim) < 1:
            return result.fail("head-split shape must give N, h and d_h explicitly.")
        merge = const_array(so)
        if merge is None or merge.tolist() != [-1, d]:
            return result.fail(f"head-merge Reshape is not [-1, {d}].")
        scale_value = const_array(scale)
        if scale_value is None or scale_value.size != 1:
            return result.fail("score scale is not a constant scalar.")
        if int_attr(values["probs"].producer(), "axis", -1) not in (-1, 3):
            return result.fail("Softmax is not over the key axis.")
        self.scale = float(scale_value.reshape(()))
        return result

    def rewrite(self, op, x, wq, wk, wv, wo, **values):
        (w_q, b_q), (w_k, b_k), (w_v, b_v), (w_o, b_o) = (
            _linear(values[n].producer()) for n in ("gq", "gk", "gv", "out"))
        h, dh, n = self.heads, self.head_dim, self.tokens
        d = h * dh
        stacked = np.concatenate([_per_head(w_q, h) * self.scale, _per_head(w_k, h),
                                  _per_head(w_v, h)], axis=2)  # [h, d, 3·d_h]
        bias = np.concatenate([b_q.reshape(h, 1, dh) * self.scale, b_k.reshape(h, 1, dh),
                               b_v.reshape(h, 1, dh)], axis=2)  # [h, 1, 3·d_h]
        base = f"{wq.name}__heads"
        xg = op.Reshape(x, int64_init(op, [-1, 1, n, d], f"{base}_shape"))  # [G, 1, N, d]
        qkv = op.Add(op.MatMul(xg, float_init(op, stacked, f"{base}_qkv_weight")),
                     float_init(op, bias, f"{base}_qkv_bias"))  # [G, h, N, 3·d_h]
        q, k, v = op.Split(qkv, int64_init(op, [dh, dh, dh], f"{base}_split"), axis=-1,
                           _outputs=3)
        scores = transposed_matmul(op, q, k, equation="ghnd,ghmd->ghnm", trans_b=True,
                                   target=self.target)  # [G, h, N, N]
        ctx = op.MatMul(op.Softmax(scores, axis=-1), v)  # [G, h, N, d_h]
        w_out = w_o.T.reshape(h, dh, w_o.shape[0])  # [h, d_h, d_out]
        out = op.MatMul(ctx, float_init(op, w_out, f"{base}_out_weight"))  # [G, h, N, d_out]
        out = op.ReduceSum(out, int64_init(op, [1], f"{base}_head_axis"), keepdims=0)
        out = op.Reshape(out, int64_init(op, [-1, w_o.shape[0]], f"{base}_merge_shape"))
        return op.Add(out, float_init(op, b_o, f"{base}_out_bias"))  # [G·N, d_out]


def rules(target: str = "mobile") -> RewriteRuleSet:
    # Gemm q,k,v -> Reshape -> Transpose -> MatMul -> Softmax -> MatMul -> Transpose -> Gemm
    #   ->  MatMul(per-head qkv) -> Split -> MatMulᵀ -> Softmax -> MatMul -> MatMul -> ReduceSum
    return RewriteRuleSet([FoldHeadSplit.rule(target)])
