"""passes.unfold_fold: MobileViT unfold/fold chains → SpaceToDepth/DepthToSpace forms."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from _passes_util import apply, assert_same_outputs, ops, parse

from mvcompile.passes import unfold_fold

RNG = np.random.default_rng(0)
C, D, S, P = 4, 6, 8, 2  # conv in, transformer width, image side, patch
N = (S // P) ** 2
HEADER = '<ir_version: 10, opset_import: ["" : 24]>\n'
FEED = {"x": RNG.normal(0, 1, (2, C, S, S)).astype(np.float32)}


def _shapes(d: int) -> dict[str, np.ndarray]:
    shapes = {"u1": [-1, P, S // P, P], "u2": [-1, d, N, P * P], "u3": [-1, d],
              "f1": [-1, P * P, N, d], "f2": [-1, S // P, P, P], "f3": [-1, d, S, S]}
    return {k: np.array(v, np.int64) for k, v in shapes.items()}


def _model(before_unfold: str, after_fold: str, unfold_perm: str = "[0,3,2,1]", d: int = D):
    """x → (op) → unfold → +bias → fold → (op) → y; 1x1 convs w1 (C→D), w2 (D→C); ``d`` is
    the token width (C when no conv changes it)."""
    text = HEADER + f"""g (float[B,{C},{S},{S}] x) => (float[B,{C},{S},{S}] y) {{
        a = {before_unfold}
        r1 = Reshape (a, u1)
        t1 = Transpose <perm=[0,2,1,3]> (r1)
        r2 = Reshape (t1, u2)
        t2 = Transpose <perm={unfold_perm}> (r2)
        tok = Reshape (t2, u3)
        mid = Add (tok, bias)
        q1 = Reshape (mid, f1)
        s1 = Transpose <perm=[0,3,2,1]> (q1)
        q2 = Reshape (s1, f2)
        s2 = Transpose <perm=[0,2,1,3]> (q2)
        img = Reshape (s2, f3)
        y = {after_fold}
    }}"""
    weights = {"w1": RNG.normal(0, 0.5, (D, C, 1, 1)).astype(np.float32),
               "w2": RNG.normal(0, 0.5, (C, D, 1, 1)).astype(np.float32),
               "b2": RNG.normal(0, 0.5, (C,)).astype(np.float32),
               "w3": RNG.normal(0, 0.5, (D, C, 3, 3)).astype(np.float32),
               "bias": RNG.normal(0, 1, (d,)).astype(np.float32)}
    return parse(text, {**weights, **_shapes(d)})


@pytest.mark.parametrize(("target", "gather", "matmul", "fold"), [
    ("mobile", False, "Einsum", ["Reshape", "Einsum", "Add", "Reshape", "DepthToSpace"]),
    ("ort", False, "FusedMatMul", ["Reshape", "FusedMatMul", "Add", "Reshape", "DepthToSpace"]),
    # one row Gather to raster order, then the matmul writes the image (no DepthToSpace)
    ("ort", True, "FusedMatMul", ["Reshape", "Gather", "FusedMatMul", "Add", "Reshape"]),
])
def test_chains_next_to_1x1_convs_absorb_them(target: str, gather: bool, matmul: str,
                                              fold: list[str]) -> None:
    before = _model("Conv (x, w1)", "Conv (img, w2, b2)")
    after, pass_ = apply(before, "unfold_fold", unfold_fold.rules(target, gather_fold=gather))
    assert ops(after) == ["SpaceToDepth", "Reshape", matmul, "Reshape", "Add", *fold]
    assert pass_.counts[f"unfold_after_conv1x1_{target}"] == 1
    assert pass_.counts[f"fold_before_conv1x1_{target}"] == 1
    assert_same_outputs(before, after, FEED)


def test_mobile_chains_without_convs_use_space_to_depth_twice() -> None:
    before = _model("Relu (x)", "Relu (img)", d=C)
    after, pass_ = apply(before, "unfold_fold", unfold_fold.rules("mobile"))
    assert ops(after) == ["Relu", "SpaceToDepth", "Reshape", "SpaceToDepth", "Reshape", "Add",
                          "Reshape", "DepthToSpace", "Reshape", "DepthToSpace", "Relu"]
    assert pass_.counts["unfold_to_space_to_depth_mobile"] == 1
    assert_same_outputs(before, after, FEED)


def test_ort_chains_without_convs_keep_one_transpose_each() -> None:
    before = _model("Relu (x)", "Relu (img)", d=C)
    after, _ = apply(before, "unfold_fold", unfold_fold.rules("ort"))
    assert ops(after).count("Transpose") == 2
    assert_same_outputs(before, after, FEED)


def test_3x3_conv_is_not_absorbed() -> None:
    before = _model("Conv <pads=[1,1,1,1]> (x, w3)", "Conv (img, w2, b2)")
    after, pass_ = apply(before, "unfold_fold", unfold_fold.rules("mobile"))
    assert "1x1" in pass_.refusals["unfold_after_conv1x1_mobile"]
    assert ops(after)[:3] == ["Conv", "SpaceToDepth", "Reshape"]
    assert "Transpose" not in ops(after)
    assert_same_outputs(before, after, FEED)


def test_a_different_permutation_is_not_an_unfold() -> None:
    # [B,D,N,P] -> [B,N,P,D]: a valid layout change, but tokens are no longer grouped by P.
    before = _model("Relu (x)", "Relu (img)", unfold_perm="[0,2,3,1]", d=C)
    after, pass_ = apply(before, "unfold_fold", unfold_fold.rules("mobile"))
    assert ops(after)[:6] == ["Relu", "Reshape", "Transpose", "Reshape", "Transpose", "Reshape"]
    assert "not a MobileViT unfold" in pass_.refusals["unfold_to_space_to_depth_mobile"]
    assert_same_outputs(before, after, FEED)


@pytest.mark.parametrize("target", ["mobile", "ort"])
def test_chains_that_hard_code_the_batch_are_not_rewritten(target: str) -> None:
    """Shapes [2, -1, N, P²] and [2, -1, N, d] in place of [-1, d, N, P²] and [-1, P², N, d]:
    valid at any batch, but an unfold and a fold at batch 2 only (at other batches they mix
    images). The symbolic batch was simulated at 2 alone, so both were rewritten and wrong at
    every other batch."""
    before = _model("Relu (x)", "Relu (img)", d=C)
    for init in before.graph.initializer:
        if init.name in ("u2", "f1"):
            init.CopyFrom(onnx.numpy_helper.from_array(
                np.array([2, -1, *onnx.numpy_helper.to_array(init)[2:]], np.int64), init.name))
    after, pass_ = apply(before, "unfold_fold", unfold_fold.rules(target))
    assert sum(pass_.counts.values()) == 0 and ops(after) == ops(before)
    assert "one batch size only" in pass_.refusals[f"unfold_to_space_to_depth_{target}"]
    for batch in (1, 2, 3):
        x = RNG.normal(0, 1, (batch, C, S, S)).astype(np.float32)
        assert_same_outputs(before, after, {"x": x})


def test_raster_rows_invert_the_unfold() -> None:
    """Row r of the gathered tokens is image position r: unfold an index image with the
    reference Reshape/Transpose chain, then gather its rows back into raster order."""
    p, h, w = 2, 4, 6
    image = np.arange(h * w).reshape(h // p, p, w // p, p)  # [i, i', j, j']
    tokens = image.transpose(1, 3, 0, 2).reshape(p * p * (h // p) * (w // p))  # [(i',j'),(i,j)]
    np.testing.assert_array_equal(tokens[unfold_fold.raster_rows(p, h, w)], np.arange(h * w))


def _unfold_then_softmax(before_unfold: str, u3: list[int], d: int, dtype: str = "float",
                         batch: str = "B"):
    """x → (op) → unfold with last shape ``u3`` → Softmax over the token axis (1)."""
    rows = P * P * N
    text = HEADER + f"""g ({dtype}[{batch},{C},{S},{S}] x) => ({dtype}[{batch},{rows},{d}] y) {{
        a = {before_unfold}
        r1 = Reshape (a, u1)
        t1 = Transpose <perm=[0,2,1,3]> (r1)
        r2 = Reshape (t1, u2)
        t2 = Transpose <perm=[0,3,2,1]> (r2)
        tok = Reshape (t2, u3)
        y = Softmax <axis=1> (tok)
    }}"""
    np_type = np.float16 if dtype == "float16" else np.float32
    inits = {"u1": np.array([-1, P, S // P, P], np.int64),
             "u2": np.array([-1, d, N, P * P], np.int64), "u3": np.array(u3, np.int64),
             "w1": RNG.normal(0, 0.5, (D, C, 1, 1)).astype(np_type)}
    return parse(text, inits)


@pytest.mark.parametrize("target", ["ort", "mobile"])
@pytest.mark.parametrize("batch", ["B", "2"])
@pytest.mark.parametrize(("before_unfold", "d", "rule"), [
    ("Conv (x, w1)", D, "unfold_after_conv1x1"), ("Relu (x)", C, "unfold_to_space_to_depth")])
def test_a_zero_in_the_last_unfold_shape_copies_the_batch_not_the_new_leading_dim(
        target: str, batch: str, before_unfold: str, d: int, rule: str) -> None:
    """u3 = [0, -1, d]: the 0 copies B from [B, P, N, d]; the rewritten chain's last Reshape
    reads [B·P, N, d], so it must not keep the 0 (it would copy B·P and give [B·P, N, d])."""
    before = _unfold_then_softmax(before_unfold, [0, -1, d], d, batch=batch)
    after, pass_ = apply(before, "unfold_fold", unfold_fold.rules(target))
    assert pass_.counts[f"{rule}_{target}"] == 1
    assert "Transpose" not in ops(after)[:2]
    assert_same_outputs(before, after, FEED)
    if batch == "B":  # the resolved shape keeps the batch symbolic
        assert_same_outputs(before, after, {"x": RNG.normal(0, 1, (3, C, S, S)).astype(np.float32)})


def test_float16_convs_are_not_absorbed_into_float32_weights() -> None:
    """The conv-absorbing rules write float32 weights; on a float16 graph they refuse and the
    chain alone is rewritten, which ORT still loads and runs."""
    before = _unfold_then_softmax("Conv (x, w1)", [-1, P * P * N, D], D, dtype="float16")
    after, pass_ = apply(before, "unfold_fold", unfold_fold.rules("ort"))
    assert "not float32" in pass_.refusals["unfold_after_conv1x1_ort"]
    assert pass_.counts["unfold_to_space_to_depth_ort"] == 1
    assert_same_outputs(before, after, {"x": FEED["x"].astype(np.float16)}, atol=1e-3)
