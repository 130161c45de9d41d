"""commute_resize: a spatial Resize moves across the 1x1 conv next to an unfold/fold chain."""

from __future__ import annotations

import io

import numpy as np
import onnx
import pytest
from _passes_util import apply, assert_same_outputs, ops, parse

from conftest import build_random
from mvcompile.optimize import optimize_proto
from mvcompile.passes import commute_resize

RNG = np.random.default_rng(0)
FEED = {"x": RNG.normal(size=(1, 4, 3, 3)).astype(np.float32)}


def _unfold_side(mode: str = "linear", kernel: int = 1, consumer: str = "Reshape",
                 sizes: tuple[int, ...] = (1, 6, 4, 4), extra_output: bool = False
                 ) -> onnx.ModelProto:
    """Conv(4→6) → Resize 3×3 → 4×4 → ``consumer``."""
    pad = (kernel - 1) // 2
    outputs = "float[1,6,16] y" + (", float[1,6,3,3] c" if extra_output else "")
    tail = ("y = Reshape(r, shape)" if consumer == "Reshape" else
            "s = Relu(r)\n  y = Reshape(s, shape)")
    text = f"""
    <ir_version: 10, opset_import: ["" : 18]>
    g (float[1,4,3,3] x) => ({outputs}) {{
      c = Conv<pads = [{pad}, {pad}, {pad}, {pad}]>(x, w, b)
      r = Resize<mode = "{mode}">(c, "", "", sizes)
      {tail}
    }}"""
    return parse(text, {
        "w": RNG.normal(size=(6, 4, kernel, kernel)).astype(np.float32),
        "b": RNG.normal(size=6).astype(np.float32),
        "sizes": np.array(sizes, np.int64), "shape": np.array([1, 6, 16], np.int64)})


def _fold_side(scales: bool = False) -> onnx.ModelProto:
    """Reshape (a fold's last op) → Resize 3×3 → 4×4 → Conv(4→6)."""
    resize = ('Resize<mode = "nearest">(t, "", scales)' if scales
              else 'Resize<mode = "linear">(t, "", "", sizes)')
    text = f"""
    <ir_version: 10, opset_import: ["" : 18]>
    g (float[1,4,3,3] x) => (float[1,6,4,4] y) {{
      t = Reshape(x, shape)
      r = {resize}
      y = Conv(r, w, b)
    }}"""
    inits = {"w": RNG.normal(size=(6, 4, 1, 1)).astype(np.float32),
             "b": RNG.normal(size=6).astype(np.float32),
             "shape": np.array([1, 4, 3, 3], np.int64)}
    inits.update({"scales": np.array([1, 1, 4 / 3, 4 / 3], np.float32)} if scales else
                 {"sizes": np.array([1, 4, 4, 4], np.int64)})
    return parse(text, inits)


def test_resize_moves_before_the_conv_that_feeds_an_unfold() -> None:
    before = _unfold_side()
    after, pass_ = apply(before, "commute_resize", commute_resize.rules())
    assert ops(after) == ["Resize", "Conv", "Reshape"]
    assert pass_.counts["ResizeBeforeUnfold"] == 1
    sizes = [i for i in after.graph.initializer if i.name.endswith("_sizes")]
    assert onnx.numpy_helper.to_array(sizes[0]).tolist() == [1, 4, 4, 4]  # the conv's input
    assert_same_outputs(before, after, FEED)


@pytest.mark.parametrize("scales", [False, True])
def test_resize_moves_after_the_conv_that_follows_a_fold(scales: bool) -> None:
    before = _fold_side(scales)
    after, pass_ = apply(before, "commute_resize", commute_resize.rules())
    assert ops(after) == ["Reshape", "Conv", "Resize"]
    assert pass_.counts["ResizeAfterFold"] == 1
    assert_same_outputs(before, after, FEED)


@pytest.mark.parametrize("variant, reason", [
    ({"mode": "cubic"}, "mode 'cubic'"),
    ({"kernel": 3}, "1x1"),
    ({"consumer": "Relu"}, "unfold chain"),
    ({"sizes": (1, 5, 4, 4)}, "batch and channels"),
    ({"extra_output": True}, "other uses"),  # refused by the rewrite engine
])
def test_resize_stays_where_the_swap_would_be_wrong_or_useless(variant: dict, reason: str
                                                                ) -> None:
    before = _unfold_side(**variant)
    after, pass_ = apply(before, "commute_resize", commute_resize.rules())
    assert ops(after) == ops(before)
    assert reason in pass_.refusals["ResizeBeforeUnfold"]


def test_transformers_interpolation_path_loses_its_unfold_fold_transposes() -> None:
    """At 96² the last MobileViT block of transformers' model is 3×3, interpolated to 4×4
    around its unfold/fold; all 12 unfold/fold Transposes must still go."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from mvcompile.graphs.mobilevit import MobileViTConfig
    from mvcompile.reference import hf_model

    cfg = MobileViTConfig.for_size("xxs", resolution=64)  # our graph needs multiples of 64
    _, weights = build_random(cfg, seed=3)
    model = hf_model(cfg, weights)
    model.config.image_size = 96
    buffer = io.BytesIO()
    torch.onnx.export(model, (torch.rand(1, 3, 96, 96),), buffer, dynamo=False,
                      opset_version=18, input_names=["pixel_values"], output_names=["logits"])
    proto = onnx.load_from_string(buffer.getvalue())
    assert sum(n.op_type == "Resize" for n in proto.graph.node) == 2
    optimized, report = optimize_proto(proto, "ort")
    stages = {s["name"]: s.get("rules", {}) for s in report["pipeline"]["stages"]}
    assert stages["commute_resize"] == {"ResizeBeforeUnfold": 1, "ResizeAfterFold": 1}
    assert stages["unfold_fold"]["unfold_after_conv1x1_ort"] == 3
    assert stages["unfold_fold"]["fold_before_conv1x1_ort"] == 3
    # With the attention head split/merge folded as well, no Transpose is left.
    assert (report["transposes"]["onnxsim"], report["transposes"]["optimized"]) == (48, 0)
    assert report["max_abs_diff"] <= 1e-4
