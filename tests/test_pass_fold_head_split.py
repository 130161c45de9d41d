"""passes.fold_head_split: head split/merge transposes → per-head batched MatMul constants."""

from __future__ import annotations

import numpy as np
import pytest
from _passes_util import apply, assert_same_outputs, ops, parse

from mvcompile.passes import fold_head_split

RNG = np.random.default_rng(0)
G, N, H, DH = 3, 5, 2, 4
D = H * DH
FEED = {"x": RNG.normal(0, 1, (G * N, D)).astype(np.float32)}


def _model(softmax_axis: int = -1, key_perm: str = "[0,2,3,1]", opset: int = 24):
    text = f"""<ir_version: 10, opset_import: ["" : {opset}]>
    g (float[{G * N},{D}] x) => (float[{G * N},{D}] y) {{
        lq = Gemm <transB=1> (x, wq, bq)
        lk = Gemm <transB=1> (x, wk, bk)
        lv = Gemm <transB=1> (x, wv, bv)
        rq = Reshape (lq, split)
        rk = Reshape (lk, split)
        rv = Reshape (lv, split)
        q = Transpose <perm=[0,2,1,3]> (rq)
        kt = Transpose <perm={key_perm}> (rk)
        v = Transpose <perm=[0,2,1,3]> (rv)
        qk = MatMul (q, kt)
        s = Mul (qk, scale)
        p = Softmax <axis={softmax_axis}> (s)
        pv = MatMul (p, v)
        c = Transpose <perm=[0,2,1,3]> (pv)
        m = Reshape (c, merge)
        y = Gemm <transB=1> (m, wo, bo)
    }}"""
    inits = {f"w{n}": RNG.normal(0, D**-0.5, (D, D)).astype(np.float32) for n in "qkvo"}
    inits |= {f"b{n}": RNG.normal(0, 0.1, (D,)).astype(np.float32) for n in "qkvo"}
    inits |= {"split": np.array([-1, N, H, DH], np.int64), "merge": np.array([-1, D], np.int64),
              "scale": np.array(DH**-0.5, np.float32)}
    return parse(text, inits)


@pytest.mark.parametrize(("target", "matmul"), [("mobile", "Einsum"), ("ort", "FusedMatMul")])
def test_attention_has_no_transpose(target: str, matmul: str) -> None:
    before = _model()
    after, pass_ = apply(before, "fold_head_split", fold_head_split.rules(target))
    assert ops(after) == ["Reshape", "MatMul", "Add", "Split", matmul, "Softmax", "MatMul",
                          "MatMul", "ReduceSum", "Reshape", "Add"]
    assert pass_.counts[f"fold_head_split_{target}"] == 1
    assert_same_outputs(before, after, FEED)


def test_softmax_over_queries_is_not_rewritten() -> None:
    before = _model(softmax_axis=2)
    after, pass_ = apply(before, "fold_head_split", fold_head_split.rules("mobile"))
    assert ops(after).count("Transpose") == 4
    assert "key axis" in pass_.refusals["fold_head_split_mobile"]
    assert_same_outputs(before, after, FEED)


def test_keys_not_transposed_for_scores_are_not_rewritten() -> None:
    before = _model(key_perm="[0,2,1,3]")  # q·k with k as [G,h,N,dh]: shapes differ for N≠dh
    before_ops = ops(before)
    after, pass_ = apply(before, "fold_head_split", fold_head_split.rules("mobile"))
    assert ops(after) == before_ops
    assert "Transpose of kt" in pass_.refusals["fold_head_split_mobile"]


def test_opsets_before_13_are_refused() -> None:
    """The rewrite emits opset-13 Split/ReduceSum (axes as inputs); older graphs keep theirs."""
    before = _model(opset=12)
    before_ops = ops(before)
    after, pass_ = apply(before, "fold_head_split", fold_head_split.rules("ort"))
    assert ops(after) == before_ops
    assert "opset 12 < 13" in pass_.refusals["fold_head_split_ort"]
