"""im2col: MobileViTV2's Gather/rank-6-Transpose unfold and Col2Im fold → SpaceToDepth and
DepthToSpace per channel, rank 4."""

from __future__ import annotations

import numpy as np
import onnx
from _passes_util import apply, assert_same_outputs, ops, parse

from mvcompile.passes import im2col

RNG = np.random.default_rng(0)
B, C, H, W, P = 2, 3, 4, 6, 2


def _unfold_model(perm: tuple[int, ...] = (0, 1, 2, 4, 3, 5), h: int = H, w: int = W
                  ) -> onnx.ModelProto:
    """torch's unfold as the dynamo exporter writes it: rows[ki, i] = i·p + ki (rows and
    columns past the last whole patch are not gathered)."""
    n = (h // P) * (w // P)
    text = f"""
    <ir_version: 10, opset_import: ["" : 18]>
    g (float[{B},{C},{h},{w}] x) => (float[{B},{C},{P * P},{n}] y) {{
      r = Gather<axis = 2>(x, rows)
      rc = Gather<axis = 4>(r, cols)
      t = Transpose<perm = [{", ".join(map(str, perm))}]>(rc)
      y = Reshape(t, shape)
    }}"""
    return parse(text, {
        "rows": np.arange(h - h % P).reshape(h // P, P).T.copy().astype(np.int64),
        "cols": np.arange(w - w % P).reshape(w // P, P).T.copy().astype(np.int64),
        "shape": np.array([B, C, P * P, n], np.int64)})


def _fold_model(strides: int = P, h: int = H, w: int = W) -> onnx.ModelProto:
    blocks = ((h - P) // strides + 1) * ((w - P) // strides + 1)
    text = f"""
    <ir_version: 10, opset_import: ["" : 18]>
    g (float[{B},{C * P * P},{blocks}] x) => (float[{B},{C},{h},{w}] y) {{
      y = Col2Im<strides = [{strides}, {strides}]>(x, size, block)
    }}"""
    return parse(text, {"size": np.array([h, w], np.int64), "block": np.array([P, P], np.int64)})


def test_unfold_chain_becomes_space_to_depth_per_channel() -> None:
    before = _unfold_model()
    after, pass_ = apply(before, "im2col", im2col.rules())
    assert ops(after) == ["Reshape", "SpaceToDepth", "Reshape"]
    assert pass_.counts["Im2ColUnfold"] == 1
    feed = {"x": RNG.normal(size=(B, C, H, W)).astype(np.float32)}
    assert_same_outputs(before, after, feed, atol=0)
    x = feed["x"]
    np.testing.assert_array_equal(im2col.im2col_ref(x, P)[0, 1, 3, 2], x[0, 1, 1, 5])


def test_rows_and_columns_past_the_last_patch_are_cropped_and_padded_back() -> None:
    """A 5×7 map with p = 2: unfold skips row 4 and column 6, fold leaves them zero."""
    unfold, fold = _unfold_model(h=5, w=7), _fold_model(h=5, w=7)
    unfold_after, _ = apply(unfold, "im2col", im2col.rules())
    fold_after, _ = apply(fold, "im2col", im2col.rules())
    assert ops(unfold_after) == ["Slice", "Reshape", "SpaceToDepth", "Reshape"]
    assert ops(fold_after) == ["Reshape", "DepthToSpace", "Reshape", "Pad"]
    image = {"x": RNG.normal(size=(B, C, 5, 7)).astype(np.float32)}
    assert_same_outputs(unfold, unfold_after, image, atol=0)
    columns = {"x": RNG.normal(size=(B, C * P * P, 6)).astype(np.float32)}
    assert_same_outputs(fold, fold_after, columns, atol=0)


def test_a_chain_that_is_not_an_unfold_is_left_alone() -> None:
    before = _unfold_model(perm=(0, 1, 4, 2, 3, 5))
    after, pass_ = apply(before, "im2col", im2col.rules())
    assert ops(after) == ops(before)
    assert "does not compute an im2col unfold" in pass_.refusals["Im2ColUnfold"]


def test_col2im_without_overlap_becomes_depth_to_space_per_channel() -> None:
    before = _fold_model()
    after, pass_ = apply(before, "im2col", im2col.rules())
    assert ops(after) == ["Reshape", "DepthToSpace", "Reshape"]
    assert pass_.counts["Col2ImFold"] == 1
    feed = {"x": RNG.normal(size=(B, C * P * P, H * W // P // P)).astype(np.float32)}
    assert_same_outputs(before, after, feed, atol=0)


def test_overlapping_col2im_is_left_alone() -> None:
    before = _fold_model(strides=1)
    after, pass_ = apply(before, "im2col", im2col.rules())
    assert ops(after) == ["Col2Im"]
    assert "stride is not the block size" in pass_.refusals["Col2ImFold"]
    feed = {"x": RNG.normal(size=(B, C * P * P, 15)).astype(np.float32)}
    assert_same_outputs(before, after, feed, atol=0)  # the model is valid and runs


def test_an_unfold_at_one_batch_size_only_is_left_alone() -> None:
    """With a symbolic batch and the tokens' shape [2, -1, P², N], the chain is an im2col
    unfold at batch 2 only (at batch 4 it is [2, 2C, P², N]); simulated at batch 2 alone, it
    was rewritten to [-1, C, P², N], wrong at every other batch."""
    n = (H // P) * (W // P)
    before = parse(f"""
    <ir_version: 10, opset_import: ["" : 18]>
    g (float[B,{C},{H},{W}] x) => (float[2,?,{P * P},{n}] y) {{
      r = Gather<axis = 2>(x, rows)
      rc = Gather<axis = 4>(r, cols)
      t = Transpose<perm = [0, 1, 2, 4, 3, 5]>(rc)
      y = Reshape(t, shape)
    }}""", {"rows": np.arange(H).reshape(H // P, P).T.copy().astype(np.int64),
            "cols": np.arange(W).reshape(W // P, P).T.copy().astype(np.int64),
            "shape": np.array([2, -1, P * P, n], np.int64)})
    after, pass_ = apply(before, "im2col", im2col.rules())
    assert pass_.counts["Im2ColUnfold"] == 0 and ops(after) == ops(before)
    assert "one batch size only" in pass_.refusals["Im2ColUnfold"]
    for batch in (2, 4):
        assert_same_outputs(before, after,
                            {"x": RNG.normal(size=(batch, C, H, W)).astype(np.float32)})
