"""Fold multi-head attention's head split/merge transposes into per-head weight constants.

The reference attention on tokens X ∈ R^{G·N×d_in} (G groups of N tokens, h heads of width
d_h = d/h) splits heads with Reshape + Transpose:

    Q_h = (X·W_qᵀ + b_q)[:, h-th slice] as [G, h, N, d_h]   (likewise K_h, V_h; Kᵀ for scores)
    O   = merge_h(softmax(s·Q_h·K_hᵀ)·V_h)·W_oᵀ + b_o        merge_h = Transpose + Reshape

The rewrite keeps every tensor in [G, h, N, ·] order by stacking per-head weights as batched
MatMul constants, with the score scale s folded into the query weights:

    [Q'|K'|V']_h = X[G,1,N,d_in] · A_h,   A_h = [s·W_q,h | W_k,h | W_v,h]ᵀ ∈ R^{h×d_in×3d_h}
    S_h = (Q'_h + s·b_q,h)·K'_hᵀ   (one transposed MatMul: FusedMatMul transB for ORT, Einsum
                                   for mobile)
    O   = Σ_h (softmax(S_h)·V'_h) · W_o,hᵀ + b_o',   W_o,hᵀ ∈ R^{h×d_h×d_out}
    b_o' = b_o + Σ_h b_v,h · W_o,hᵀ

Σ_h is a ReduceSum over the head axis, so no Transpose remains and the rank stays 4. The key
bias drops out exactly: it adds q_i·b_k to every score of query i, a constant along the
softmax axis. The value bias passes through attention unchanged, since each probability row
sums to one, and so joins the out bias (except after torch's NaN guard, which can zero a row;
there it stays on V).

The pattern is the attention's tail, ``Softmax [→ Where(IsNaN, 0)] → MatMul(·, V) → Transpose
→ Reshape → out projection``; the out projection is ``Gemm`` (rule ``fold_head_split_*``: ours,
TorchScript exports, dynamo exports with an output bias) or ``MatMul`` (rule
``fold_head_split_matmul_*``: dynamo exports without one). The NaN guard is torch's SDPA
decomposition and is kept. The scores and V are traced back in ``check`` (by
:mod:`._attention_trace`) through the spellings exporters use:

- projections: ``Gemm(x, W, b)`` with either ``transB``, ``MatMul(x, W) [+ Add(b)]``, and a
  fused ``MatMul(x, [W_q|W_k|W_v]) → Split [→ Add(b)]``, on 2-D [G·N, d] or 3-D [G, N, d]
  tokens (the projections must share x up to Reshapes that keep the last axis);
- head split: any Reshape/Transpose chain that computes [G,N,d] → [G,h,N,d_h] (Kᵀ:
  [G,h,d_h,N], e.g. one ``Transpose(0,2,3,1)``, ``Transpose(0,2,1,3) → Transpose(0,1,3,2)``,
  or SDPA's Reshape to [G·h, N, d_h] → ``Transpose(0,2,1)`` → Reshape), decided by simulating
  the chain on an index tensor;
- scale: constant scalar ``Mul``/``Div`` anywhere on the scores, Q, K or V paths, folded into
  that branch's weights;
- score bias: constant ``Add(B)`` on the scores (Swin's relative position bias), B
  broadcasting to [G, h, N, N]; the rewrite adds it to its own [G, h, N, N] scores.

Every intermediate between x and the out projection must feed only this attention.

Target ``ort-attention`` (the ``fp32`` pipeline) emits the core as ONNX Runtime's fused
com.microsoft ``Attention`` on [G, N, d_in] tokens instead (:func:`fused_attention`), then the
out projection (faster on ORT than the per-head form: README, FP32 and foreign tables). A
score bias becomes its ``attention_bias`` input where it is constant along G or G is static
(otherwise the per-head form stays). The NaN guard is dropped there, as onnxscript's own
SDPA fusion does: without a mask, softmax of finite scores has no NaN to zero.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import (
    MatchResult,
    RewriterContext,
    RewriteRuleClassBase,
    RewriteRuleSet,
)
from onnxscript.rewriter.pattern import OrValue

from mvcompile.passes._attention_trace import (
    HEAD_PERM,
    KEY_PERM,
    Linear,
    broadcasts_to,
    merge_dims,
    only_here,
    projection,
    rows_of,
    split_dims,
    trace_branch,
    trace_scores,
)
from mvcompile.passes._layout import (
    float_init,
    int64_init,
    sim_shape,
    static_shape,
    transposed_matmul,
)

MIN_OPSET = 13  # Split and ReduceSum take their sizes/axes as inputs from opset 13
FUSED_TARGET = "ort-attention"  # ORT, with the attention core as one com.microsoft.Attention


@dataclass(frozen=True)
class Attention:
    """What ``check`` found and ``rewrite`` emits."""

    x: ir.Value
    q: Linear
    k: Linear
    v: Linear
    out: Linear
    heads: int
    tokens: int
    head_dim: int
    out_shape: list[int]  # the merge Reshape's shape with its last entry d_out
    score_bias: np.ndarray | None  # added to the scores before Softmax
    groups: int | None  # G when static


def _scaled(linear: Linear, scale: float) -> Linear:
    return Linear(linear.x, linear.weight * scale, linear.bias * scale)


def _per_head(weight: np.ndarray, heads: int) -> np.ndarray:
    """W [d_out, d_in] of a head-split projection -> [h, d_in, d_h] so that x·result_h is
    head h."""
    d_out, d_in = weight.shape
    return weight.T.reshape(d_in, heads, d_out // heads).transpose(1, 0, 2)


class FoldHeadSplit(RewriteRuleClassBase):
    """Softmax → MatMul(·, V) → Transpose → Reshape → Gemm out, with Q, Kᵀ, V head splits of
    constant projections, as per-head batched MatMuls with no Transpose."""

    kind = ""  # rule name: fold_head_split[_kind]_target

    def __init__(self, target: str = "mobile") -> None:
        infix = f"_{self.kind}" if self.kind else ""
        super().__init__(name=f"fold_head_split{infix}_{target}")
        self.fuse = target == FUSED_TARGET
        self.target = "ort" if self.fuse else target
        self.found: Attention | None = None

    def pattern(self, op, scores, v, merge_shape, wo):
        probs = op.Softmax(scores, _outputs=["probs"])
        # torch's SDPA decomposition zeroes NaN probabilities (rows with every key masked)
        probs = OrValue([op.Where(op.IsNaN(probs), 0.0, probs), probs], tag_var="nan_guard",
                        tag_values=[True, False])
        ctx = op.Transpose(op.MatMul(probs, v, _outputs=["pv"]), _outputs=["ctx"])
        return self.project(op, op.Reshape(ctx, merge_shape, _outputs=["merged"]), wo)

    def project(self, op, merged, wo):
        return op.Gemm(merged, wo, _allow_other_inputs=True, _outputs=["out"])

    def check(self, context, scores, v, **values) -> MatchResult:
        """Match only the reference attention, per group g and head h:

            S = s · Q_h K_hᵀ + B,  Q_h = (X W_qᵀ + b_q)[:, h·d_h:(h+1)·d_h] (K, V alike)
            Y = concat_h(softmax_keys(S) V_h) W_oᵀ + b_o

        with constant s, B (B not widening Q·Kᵀ), W, b; q, k, v projections of the same
        tokens, split [G,N,h,d_h] and transposed as head splits; the merge the inverse
        transpose; float32 weights; no intermediate read elsewhere. Records the
        :class:`Attention` for ``rewrite``."""
        result = MatchResult()
        opset = context.model.opset_imports.get("", 0)
        if opset < MIN_OPSET:
            return result.fail(f"opset {opset} < {MIN_OPSET}: the rewrite emits the opset-13 "
                               "forms of Split and ReduceSum (axes as inputs).")
        if values["probs"].producer().attributes.get_int("axis", -1) not in (-1, 3):
            return result.fail("Softmax is not over the key axis.")
        traced = trace_scores(scores)
        if traced is None:
            return result.fail("scores are not s · MatMul(q, kt) [+ B] with constant s, B.")
        branches = {"q": trace_branch(traced.q), "kt": trace_branch(traced.kt),
                    "v": trace_branch(v)}
        for name, branch in branches.items():
            if branch is None:
                return result.fail(f"{name} is not a Reshape/Transpose head split of a "
                                   "projection with constant W, b (Gemm, MatMul [+ Add], Split).")
        perms = {"q": HEAD_PERM, "kt": KEY_PERM, "v": HEAD_PERM}
        dims = {name: split_dims(branches[name], perm) for name, perm in perms.items()}
        for name, perm in perms.items():
            if dims[name] is None:
                return result.fail(f"Transpose of {name} is not a head split [G,N,h,d_h] -> "
                                   f"{perm} (or a shape is not static).")
        if len(set(dims.values())) != 1:
            return result.fail(f"q/k/v head splits differ: {dims}.")
        heads, tokens, head_dim = dims["q"]
        if any(b.linear.weight.shape[0] != heads * head_dim for b in branches.values()):
            return result.fail("a q/k/v projection's width is not h·d_h.")
        product = traced.values[-1]  # q·kᵀ, before the bias (which may not widen it)
        if traced.bias is not None and not broadcasts_to(traced.bias, sim_shape(product)):
            return result.fail("score bias does not broadcast to the [G, h, N, N] q·kᵀ "
                               "without widening it.")
        x = {rows_of(b.linear.x) for b in branches.values()}
        if len(x) != 1:
            return result.fail("q, k and v are projections of different inputs.")
        out = projection(values["out"].producer())
        if out is None:
            return result.fail("out projection has no constant W, b.")
        out_shape = merge_dims(values["pv"], [values["ctx"].producer(),
                                               values["merged"].producer()], out[0].shape[0])
        if out_shape is None:
            return result.fail("head merge is not Transpose(0,2,1,3) → Reshape([..., d]) "
                               "with a constant shape.")
        weights = [b.linear.weight for b in branches.values()] + [out[0]]
        if any(w.dtype != np.float32 for w in weights):
            return result.fail("weights are not float32.")
        if out[0].shape[1] != heads * head_dim:
            return result.fail("out projection width is not h·d_h.")
        shared = only_here([*traced.values, *(u for b in branches.values() for u in b.values)])
        if shared is not None:
            return result.fail(f"{shared.name} has another consumer.")
        self.found = Attention(
            x=x.pop(), q=_scaled(branches["q"].linear, traced.scale * branches["q"].scale),
            k=_scaled(branches["kt"].linear, branches["kt"].scale),
            v=_scaled(branches["v"].linear, branches["v"].scale),
            out=Linear(values["merged"], *out), heads=heads, tokens=tokens, head_dim=head_dim,
            out_shape=out_shape, score_bias=traced.bias,
            groups=(static_shape(product) or [None])[0])
        return result

    def rewrite(self, op, **values):
        a = self.found
        base = f"{values['probs'].name}__heads"
        score_bias = fused_score_bias(a) if self.fuse and not (
            values["nan_guard"] and masks_a_row(a)) else None
        if score_bias is not None:
            return fused_attention(op, a, score_bias, base)
        h, dh, n = a.heads, a.head_dim, a.tokens
        d_in, d_out = a.q.weight.shape[1], a.out.weight.shape[0]
        stacked = np.concatenate([_per_head(a.q.weight, h), _per_head(a.k.weight, h),
                                  _per_head(a.v.weight, h)], axis=2)  # [h, d_in, 3·d_h]
        xg = op.Reshape(a.x, int64_init(op, [-1, 1, n, d_in], f"{base}_shape"))  # [G,1,N,d_in]
        qkv = op.MatMul(xg, float_init(op, stacked, f"{base}_qkv_weight"))  # [G, h, N, 3·d_h]
        q, k, v = op.Split(qkv, int64_init(op, [dh, dh, dh], f"{base}_split"), axis=-1,
                           _outputs=3)
        # b_k is dropped (softmax over keys ignores the per-query constant q·b_k); b_v moves
        # into the out bias unless torch's NaN guard can zero a whole probability row.
        q = _add_bias(op, q, a.q.bias.reshape(h, 1, dh), f"{base}_q_bias")
        w_out = a.out.weight.T.reshape(h, dh, d_out)  # [h, d_h, d_out]
        out_bias = a.out.bias
        if values["nan_guard"]:
            v = _add_bias(op, v, a.v.bias.reshape(h, 1, dh), f"{base}_v_bias")
        else:
            out_bias = out_bias_with_value_bias(a)
        scores = transposed_matmul(op, q, k, equation="ghnd,ghmd->ghnm", trans_b=True,
                                   target=self.target)  # [G, h, N, N]
        if a.score_bias is not None:
            scores = op.Add(scores, float_init(op, a.score_bias, f"{base}_score_bias"))
        probs = op.Softmax(scores, axis=-1)
        if values["nan_guard"]:
            probs = op.Where(op.IsNaN(probs), op.Constant(value_float=0.0), probs)
        ctx = op.MatMul(probs, v)  # [G, h, N, d_h]
        out = op.MatMul(ctx, float_init(op, w_out, f"{base}_out_weight"))  # [G, h, N, d_out]
        out = op.ReduceSum(out, int64_init(op, [1], f"{base}_head_axis"), keepdims=0)
        out = op.Reshape(out, int64_init(op, a.out_shape, f"{base}_merge_shape"))
        return _add_bias(op, out, out_bias.astype(np.float32), f"{base}_out_bias")


def out_bias_with_value_bias(a: Attention) -> np.ndarray:
    """b_o' = b_o + W_o·b_v: the value bias passes through attention (probability rows sum to
    one) and the out projection."""
    return a.out.bias + a.out.weight @ a.v.bias


def fused_attention(op: RewriterContext, a: Attention, score_bias: np.ndarray, base: str
                    ) -> ir.Value:
    """ONNX Runtime's fused com.microsoft ``Attention`` on [G, N, d_in] tokens, then the out
    projection; no Transpose. Attention computes, per group g and head h (scale 1: s is
    already in W_q, b_q),

        Q, K, V = X_g·W_q,hᵀ + b_q,h, X_g·W_k,hᵀ, X_g·W_v,hᵀ
        O_g[:, h·d_h:(h+1)·d_h] = softmax(Q·Kᵀ)·V

    in one kernel that keeps each [N, N] score block in cache and writes the heads merged.
    b_k is dropped and b_v joins the out bias, as in the per-head form. ``score_bias`` is
    :func:`fused_score_bias`'s ``attention_bias`` (empty: none).
    """
    d_in = a.q.weight.shape[1]
    weight = np.concatenate([a.q.weight, a.k.weight, a.v.weight]).T  # [d_in, 3·h·d_h]
    width = a.heads * a.head_dim
    bias = np.concatenate([a.q.bias, np.zeros(2 * width, np.float32)])
    tokens = op.Reshape(a.x, int64_init(op, [-1, a.tokens, d_in], f"{base}_tokens_shape"))
    extra = [] if not score_bias.size else [  # mask_index, past, attention_bias
        None, None, float_init(op, score_bias, f"{base}_score_bias")]
    ctx = op.Attention(tokens, float_init(op, weight, f"{base}_qkv_weight"),
                       float_init(op, bias, f"{base}_qkv_bias"), *extra,
                       num_heads=a.heads, scale=1.0, _domain="com.microsoft")  # [G, N, h·d_h]
    w_out = float_init(op, a.out.weight.T, f"{base}_out_weight")
    bias_init = float_init(op, out_bias_with_value_bias(a), f"{base}_out_bias")
    if len(a.out_shape) == 2:  # [G·N, d]: one Gemm with the bias
        merged = op.Reshape(ctx, int64_init(op, [-1, width], f"{base}_merge_shape"))
        return op.Gemm(merged, w_out, bias_init)
    merged = op.Reshape(ctx, int64_init(op, [*a.out_shape[:-1], width], f"{base}_merge_shape"))
    return op.Add(op.MatMul(merged, w_out), bias_init)


def fused_score_bias(a: Attention) -> np.ndarray | None:
    """The score bias as Attention's ``attention_bias`` [1 or G, h, N, N] (an empty array when
    there is none); None when it varies along G and G is not static."""
    if a.score_bias is None:
        return np.zeros(0, np.float32)
    bias = a.score_bias.reshape((1,) * (4 - a.score_bias.ndim) + a.score_bias.shape)
    if bias.shape[0] not in (1, a.groups):
        return None
    return np.broadcast_to(bias, (bias.shape[0], a.heads, a.tokens, a.tokens))


def masks_a_row(a: Attention) -> bool:
    """Whether the score bias may mask every key of a query row (non-finite entries). torch's
    NaN guard turns such a row's probabilities into zeros, which the fused Attention (no
    guard, b_v moved into the out bias) does not reproduce, so the per-head form is kept."""
    return a.score_bias is not None and not np.isfinite(a.score_bias).all()


def _add_bias(op: RewriterContext, x: ir.Value, bias: np.ndarray, name: str) -> ir.Value:
    """x + bias, or x itself when the bias is zero."""
    return op.Add(x, float_init(op, bias, name)) if bias.any() else x


class FoldHeadSplitMatMul(FoldHeadSplit):
    """The same with a bias-free ``MatMul(merged, W_o)`` out projection (dynamo exports)."""

    kind = "matmul"

    def project(self, op, merged, wo):
        return op.MatMul(merged, wo, _outputs=["out"])


def rules(target: str = "mobile") -> RewriteRuleSet:
    # Gemm|MatMul [Split] q,k,v -> Reshape -> Transpose -> MatMul -> Softmax -> MatMul
    #   -> Transpose -> Reshape -> Gemm|MatMul
    #   ->  MatMul(per-head qkv) -> Split -> MatMulᵀ -> Softmax -> MatMul -> MatMul -> ReduceSum
    return RewriteRuleSet([FoldHeadSplit.rule(target), FoldHeadSplitMatMul.rule(target)])
