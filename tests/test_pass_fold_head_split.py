"""passes.fold_head_split: head split/merge transposes → per-head batched MatMul constants."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest
from _passes_util import apply, assert_same_outputs, ops, parse, run

from mvcompile.passes import fold_head_split

RNG = np.random.default_rng(0)
G, N, H, DH = 3, 5, 2, 4
D = H * DH
FEED = {"x": RNG.normal(0, 1, (G * N, D)).astype(np.float32)}


def _model(softmax_axis: int = -1, key_perm: str = "[0,2,3,1]", opset: int = 24,
           rows: str = str(G * N), score_bias: np.ndarray | None = None,
           nan_guard: bool = False):
    """ViT-style attention on [rows, D] tokens (groups of N); optionally a constant score
    bias added to s·Q·Kᵀ and torch's NaN guard on the probabilities."""
    scores = "s0 = Mul (qk, scale)\n        s = Add (s0, sbias)" if score_bias is not None else (
        "s = Mul (qk, scale)")
    guard = "n = IsNaN (p)\n        pg = Where (n, zero, p)" if nan_guard else ""
    out_rows = "R" if score_bias is not None else rows  # a bias may widen the groups
    text = f"""<ir_version: 10, opset_import: ["" : {opset}]>
    g (float[{rows},{D}] x) => (float[{out_rows},{D}] y) {{
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
        {scores}
        p = Softmax <axis={softmax_axis}> (s)
        {guard}
        pv = MatMul ({"pg" if nan_guard else "p"}, v)
        c = Transpose <perm=[0,2,1,3]> (pv)
        m = Reshape (c, merge)
        y = Gemm <transB=1> (m, wo, bo)
    }}"""
    inits = {f"w{n}": RNG.normal(0, D**-0.5, (D, D)).astype(np.float32) for n in "qkvo"}
    inits |= {f"b{n}": RNG.normal(0, 0.1, (D,)).astype(np.float32) for n in "qkvo"}
    inits |= {"split": np.array([-1, N, H, DH], np.int64), "merge": np.array([-1, D], np.int64),
              "scale": np.array(DH**-0.5, np.float32), "zero": np.array(0, np.float32)}
    if score_bias is not None:
        inits["sbias"] = score_bias
    return parse(text, inits)


@pytest.mark.parametrize(("target", "matmul"), [("mobile", "Einsum"), ("ort", "FusedMatMul")])
def test_attention_has_no_transpose(target: str, matmul: str) -> None:
    before = _model()
    after, pass_ = apply(before, "fold_head_split", fold_head_split.rules(target))
    # One bias Add on q after the Split; k's bias drops out of the softmax and v's joins the
    # out bias (the final Add).
    assert ops(after) == ["Reshape", "MatMul", "Split", "Add", matmul, "Softmax", "MatMul",
                          "MatMul", "ReduceSum", "Reshape", "Add"]
    assert pass_.counts[f"fold_head_split_{target}"] == 1
    assert_same_outputs(before, after, FEED)


@pytest.mark.parametrize("rows", [str(G * N), "rows"])
def test_fused_target_emits_one_attention_node(rows: str) -> None:
    """``ort-attention``: the core becomes com.microsoft.Attention (q bias in its bias, key bias
    dropped, value bias in the out Gemm's bias); the 2-D merge keeps a Gemm out projection."""
    before = _model(rows=rows)
    after, pass_ = apply(before, "fold_head_split", fold_head_split.rules("ort-attention"))
    assert ops(after) == ["Reshape", "Attention", "Reshape", "Gemm"]
    attention = after.graph.node[1]
    assert attention.domain == "com.microsoft"
    assert {a.name: onnx.helper.get_attribute_value(a) for a in attention.attribute} == {
        "num_heads": H, "scale": 1.0}
    assert pass_.counts["fold_head_split_ort-attention"] == 1
    assert_same_outputs(before, after, FEED)


def test_symbolic_token_rows_are_simulated_in_whole_groups() -> None:
    """x [G·N, d] with a symbolic row count (our graphs' batch): the head split is checked on
    whole [N, h, d_h] groups."""
    before = _model(rows="rows")
    after, pass_ = apply(before, "fold_head_split", fold_head_split.rules("ort"))
    assert "Transpose" not in ops(after)
    assert pass_.counts["fold_head_split_ort"] == 1
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


# --- Exported forms: 3-D tokens, MatMul [+ Add] projections (torch.onnx.export + onnxsim) ---

FOREIGN_FEED = {"x": RNG.normal(0, 1, (G, N, D)).astype(np.float32)}


def _projections(qkv: str) -> str:
    """q/k/v projections of x [G, N, D] as ``lq, lk, lv``: one fused MatMul + Split + Add
    (dynamo), separate MatMul + Add(b, ·), or Reshape → Gemm(transB=0) → Reshape
    (TorchScript)."""
    if qkv == "fused":
        return """qkv = MatMul (x, wqkv)
        sq, sk, sv = Split <axis=-1> (qkv, sizes)
        lq = Add (sq, bq)
        lk = Add (sk, bk)
        lv = Add (sv, bv)"""
    if qkv == "separate":
        return "\n".join(f"m{n} = MatMul (x, w{n})\n        l{n} = Add (b{n}, m{n})"
                         for n in "qkv")
    return "x2 = Reshape (x, rows)\n" + "\n".join(
        f"g{n} = Gemm (x2, w{n}, b{n})\n        l{n} = Reshape (g{n}, tokens)" for n in "qkv")


def _foreign_model(qkv: str = "fused", key: str = "one", scale: str = "div", out: str = "matmul",
                   split: tuple[int, ...] = (G, N, -1, DH),
                   perms: tuple[str, str] = ("[0,2,1,3]", "[0,2,3,1]"),
                   score_bias: bool = False, weight_input: bool = False,
                   extra_output: str = "", nan_guard: bool = False, bias_groups: int = 1):
    """The attention of transformers' MobileViT/ViT as exported, with residual y = x + attn."""
    head, key_perm = perms
    split_keys = f"kh = Transpose <perm={head}> (rk)\n        "
    keys = {"one": f"kt = Transpose <perm={key_perm}> (rk)",
            "two": split_keys + "kt = Transpose <perm=[0,1,3,2]> (kh)",
            # torch's SDPA decomposition: 3-D transpose of the [G·h, N, d_h] keys
            "sdpa": split_keys + "k3 = Reshape (kh, keys3)\n        "
                    "kt3 = Transpose <perm=[0,2,1]> (k3)\n        kt = Reshape (kt3, keys4)",
            }[key]
    scores = {"div": "qk = MatMul (q, kt)\n        s0 = Div (qk, root)",
              "mul_q": "qs = Mul (q, scale)\n        s0 = MatMul (qs, kt)",
              "both": "qs = Mul (q, half)\n        ks = Mul (half, kt)\n"
                      "        s0 = MatMul (qs, ks)"}[scale]
    if score_bias:
        scores += "\n        s = Add (s0, bias)"
    else:
        scores = scores.replace("s0 =", "s =")
    project = ("m = Reshape (c, merge)\n        a = MatMul (m, wo_t)" if out == "matmul" else
               "m = Reshape (c, rows)\n        a2 = Gemm (m, wo_t, bo)\n"
               "        a = Reshape (a2, tokens)")
    # torch's SDPA decomposition zeroes NaN probabilities
    guard = "n = IsNaN (p)\n        pg = Where (n, zero, p)" if nan_guard else ""
    wq_input = f", float[{D},{D}] wq" if weight_input else ""
    outputs = f", float {extra_output}_out" if extra_output else ""
    text = f"""<ir_version: 10, opset_import: ["" : 18]>
    g (float[{G},{N},{D}] x{wq_input}) => (float[{G},{N},{D}] y{outputs}) {{
        {_projections(qkv)}
        rq = Reshape (lq, split)
        rk = Reshape (lk, split)
        rv = Reshape (lv, split)
        q = Transpose <perm={head}> (rq)
        {keys}
        v = Transpose <perm={head}> (rv)
        {scores}
        p = Softmax <axis=-1> (s)
        {guard}
        pv = MatMul ({"pg" if nan_guard else "p"}, v)
        c = Transpose <perm=[0,2,1,3]> (pv)
        {project}
        y = Add (a, x)
        {f"{extra_output}_out = Identity ({extra_output})" if extra_output else ""}
    }}"""
    inits = {f"w{n}": RNG.normal(0, D**-0.5, (D, D)).astype(np.float32) for n in "qkv"
             if not (weight_input and n == "q")}
    inits |= {f"b{n}": RNG.normal(0, 0.1, (D,)).astype(np.float32) for n in "qkvo"}
    if not weight_input:
        inits["wqkv"] = np.concatenate([inits[f"w{n}"] for n in "qkv"], axis=1)
    inits |= {"wo_t": RNG.normal(0, D**-0.5, (D, D)).astype(np.float32),
              "sizes": np.array([D, D, D], np.int64), "rows": np.array([-1, D], np.int64),
              "tokens": np.array([G, N, D], np.int64), "merge": np.array([G, N, D], np.int64),
              "split": np.array(split, np.int64), "root": np.array(DH**0.5, np.float32),
              "scale": np.array(DH**-0.5, np.float32), "half": np.array(DH**-0.25, np.float32),
              "bias": RNG.normal(0, 1, (bias_groups, H, N, N)).astype(np.float32),
              "keys3": np.array([G * H, N, DH], np.int64),
              "keys4": np.array([G, H, DH, N], np.int64), "zero": np.array(0, np.float32)}
    return parse(text, inits)


def _transposes(proto) -> int:
    return ops(proto).count("Transpose")


@pytest.mark.parametrize(("qkv", "key", "scale", "out", "rule"), [
    ("fused", "one", "div", "matmul", "fold_head_split_matmul"),  # dynamo, no output bias
    ("fused", "two", "mul_q", "gemm", "fold_head_split"),  # dynamo with an output bias
    ("separate", "one", "both", "matmul", "fold_head_split_matmul"),
    ("gemm", "two", "div", "gemm", "fold_head_split"),  # TorchScript
    ("fused", "sdpa", "both", "gemm", "fold_head_split"),  # dynamo ViT (SDPA)
])
@pytest.mark.parametrize("target", ["ort", "mobile"])
def test_exported_attention_has_no_transpose(qkv, key, scale, out, rule, target) -> None:
    before = _foreign_model(qkv, key, scale, out, nan_guard=key == "sdpa")
    after, pass_ = apply(before, "fold_head_split", fold_head_split.rules(target))
    assert _transposes(before) >= 4
    assert _transposes(after) == 0
    assert pass_.counts[f"{rule}_{target}"] == 1
    assert max(len(v.type.tensor_type.shape.dim) for v in
               onnx.shape_inference.infer_shapes(after).graph.value_info) <= 5
    assert_same_outputs(before, after, FOREIGN_FEED, atol=1e-4)


@pytest.mark.parametrize(("out", "tail"), [("matmul", ["MatMul", "Add"]),
                                           ("gemm", ["Gemm", "Reshape"])])
def test_fused_target_on_exported_attention(out: str, tail: list[str]) -> None:
    """3-D tokens: Attention on [G, N, d]; the out projection follows the export's merge."""
    before = _foreign_model("fused", "two", "mul_q", out)
    after, _ = apply(before, "fold_head_split", fold_head_split.rules("ort-attention"))
    assert ops(after) == ["Reshape", "Attention", "Reshape", *tail, "Add"]
    assert_same_outputs(before, after, FOREIGN_FEED, atol=1e-4)


@pytest.mark.parametrize("kwargs", [
    {"key": "sdpa", "nan_guard": True},  # dynamo ViT: torch's SDPA NaN guard
    {"score_bias": True},  # Swin: relative position bias [1, h, N, N]
    {"score_bias": True, "bias_groups": G},  # shifted windows: a bias per window [G, h, N, N]
])
def test_fused_target_takes_nan_guards_and_score_biases(kwargs) -> None:
    """Without a mask the guard has no NaN to zero, so it goes (as in onnxscript's SDPA
    fusion); a score bias becomes Attention's attention_bias input."""
    before = _foreign_model(**kwargs)
    after, _ = apply(before, "fold_head_split", fold_head_split.rules("ort-attention"))
    assert "Attention" in ops(after)
    assert not {"Softmax", "IsNaN", "Transpose"} & set(ops(after))
    assert_same_outputs(before, after, FOREIGN_FEED, atol=1e-4)


def test_fused_target_refuses_a_per_group_bias_when_groups_are_symbolic() -> None:
    found = fold_head_split.Attention(
        x=None, q=None, k=None, v=None, out=None, heads=H, tokens=N, head_dim=DH,
        out_shape=[-1, D], score_bias=np.zeros((G, H, N, N), np.float32), groups=None)
    assert fold_head_split.fused_score_bias(found) is None
    shared = dataclasses.replace(found, score_bias=np.ones((H, N, N), np.float32))
    assert fold_head_split.fused_score_bias(shared).shape == (1, H, N, N)


def test_relative_position_bias_is_added_to_the_new_scores() -> None:
    """Swin's scores: s·Q·Kᵀ + B with a constant B [1, h, N, N], kept in [G, h, N, N]."""
    before = _foreign_model(score_bias=True)
    after, pass_ = apply(before, "fold_head_split", fold_head_split.rules("mobile"))
    assert _transposes(after) == 0
    assert pass_.counts["fold_head_split_matmul_mobile"] == 1
    assert_same_outputs(before, after, FOREIGN_FEED, atol=1e-4)


def test_non_constant_weights_are_not_rewritten() -> None:
    before = _foreign_model(qkv="separate", weight_input=True)
    feed = FOREIGN_FEED | {"wq": RNG.normal(0, D**-0.5, (D, D)).astype(np.float32)}
    after, pass_ = apply(before, "fold_head_split", fold_head_split.rules("ort"))
    assert ops(after) == ops(before)
    assert "q is not a Reshape/Transpose head split of a projection with constant W" in \
        pass_.refusals["fold_head_split_matmul_ort"]
    assert_same_outputs(before, after, feed)


def test_interleaved_heads_are_not_a_head_split() -> None:
    """Reshape [G, N, d_h, h] → Transpose(0,3,1,2) gives [G, h, N, d_h] shapes too, but head
    j takes channels j, j+h, …: not the contiguous slices the per-head weights assume."""
    before = _foreign_model(split=(G, N, DH, H), perms=("[0,3,1,2]", "[0,3,2,1]"))
    after, pass_ = apply(before, "fold_head_split", fold_head_split.rules("ort"))
    assert ops(after) == ops(before)
    assert "Transpose of q is not a head split" in pass_.refusals["fold_head_split_matmul_ort"]
    assert_same_outputs(before, after, FOREIGN_FEED)


@pytest.mark.parametrize("shared", ["q", "kt"])
def test_intermediates_with_another_consumer_are_not_rewritten(shared: str) -> None:
    before = _foreign_model(extra_output=shared, key="two" if shared == "kt" else "one")
    after, pass_ = apply(before, "fold_head_split", fold_head_split.rules("ort"))
    assert ops(after) == ops(before)
    assert f"{shared} has another consumer" in pass_.refusals["fold_head_split_matmul_ort"]


def test_transformers_mobilevit_dynamo_export_has_no_transpose_left() -> None:
    """A small transformers MobileViT (9 attention layers) through the dynamo exporter and
    ``optimize_proto``: unfold_fold removes the 12 unfold/fold Transposes and this pass the
    36 head split/merge ones. The first block's attentions have no output bias, which the
    exporter writes as a bare ``MatMul`` (the second rule); the others end in ``Gemm``."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from mvcompile.optimize import optimize_proto

    torch.manual_seed(0)
    model = transformers.MobileViTForImageClassification(transformers.MobileViTConfig(
        image_size=128, hidden_sizes=[16, 24, 32], neck_hidden_sizes=[8, 8, 8, 16, 16, 16, 32],
        num_attention_heads=2, num_labels=5, expand_ratio=2.0)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.add_(torch.randn_like(param) * 0.05)  # non-zero biases: Split → Add(b)
            if "encoder.layer.2." in name and name.endswith("attention.output.dense.bias"):
                param.zero_()
    pixels = torch.rand(1, 3, 128, 128)  # N = 64, 16, 4 tokens per patch position
    proto = torch.onnx.export(model, (pixels,), dynamo=True, verbose=False,
                              input_names=["pixel_values"], output_names=["logits"]).model_proto
    optimized, report = optimize_proto(proto, "ort")  # raises if numerics differ > 1e-4
    rules = {s["name"]: s["rules"] for s in report["pipeline"]["stages"] if "rules" in s}
    assert report["transposes"]["onnxsim"] == 48
    assert report["transposes"]["optimized"] == 0
    assert rules["fold_head_split"] == {"fold_head_split_ort-attention": 7,
                                        "fold_head_split_matmul_ort-attention": 2}
    assert [node.op_type for node in optimized.graph.node].count("Attention") == 9
    onnx.checker.check_model(optimized, full_check=True)


@pytest.mark.parametrize("target", ["mobile", "ort", "ort-attention"])
def test_a_score_bias_that_widens_the_groups_is_not_rewritten(target: str) -> None:
    """One group of tokens, a bias for two: the scores (and the output) widen to two groups.
    A fused Attention on one group's tokens cannot produce that (ORT refused the node the old
    check let through); the per-head forms could, but a bias that widens the q·kᵀ product is
    refused for every target, as no exporter writes one."""
    before = _model(rows=str(N), score_bias=RNG.normal(0, 1, (2, H, N, N)).astype(np.float32))
    after, pass_ = apply(before, "fold_head_split", fold_head_split.rules(target))
    assert "without widening" in pass_.refusals[f"fold_head_split_{target}"]
    assert ops(after) == ops(before)


def test_fused_target_keeps_the_nan_guard_when_the_bias_masks_a_whole_row() -> None:
    """Query 0 sees no key: its probabilities are NaN, which torch's guard zeroes (its output
    row is then the out bias alone). The fused Attention has no guard, so the per-head form,
    guard included, is kept."""
    bias = np.zeros((1, H, N, N), np.float32)
    bias[..., 0, :] = -np.inf
    bias[..., 1, 2:] = -np.inf  # a partial mask too
    before = _model(score_bias=bias, nan_guard=True)
    after, pass_ = apply(before, "fold_head_split", fold_head_split.rules("ort-attention"))
    assert pass_.counts["fold_head_split_ort-attention"] == 1
    assert "Attention" not in ops(after)
    assert {"IsNaN", "Where"} <= set(ops(after))
    assert np.isfinite(run(after, FEED)[0]).all()
    assert_same_outputs(before, after, FEED, atol=1e-4)


@pytest.mark.parametrize("target", ["ort", "ort-attention", "mobile"])
def test_a_head_split_that_hard_codes_the_groups_is_not_rewritten(target: str) -> None:
    """Symbolic rows and a split shape [2, -1, h, d_h]: a head split over groups of N tokens
    at 2·N rows only (at 4·N rows, groups of 2·N). Simulated at one row count, it was
    rewritten with groups of N, wrong at every other count."""
    before = _model(rows="rows")
    for init in before.graph.initializer:
        if init.name == "split":
            init.CopyFrom(onnx.numpy_helper.from_array(np.array([2, -1, H, DH], np.int64),
                                                       "split"))
    after, pass_ = apply(before, "fold_head_split", fold_head_split.rules(target))
    assert pass_.counts[f"fold_head_split_{target}"] == 0
    for rows in (2 * N, 4 * N):
        assert_same_outputs(before, after,
                            {"x": RNG.normal(0, 1, (rows, D)).astype(np.float32)})
