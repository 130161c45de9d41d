"""passes.fuse_conv_bn: Conv→BN folds into Conv; refusals for shared/non-constant stats."""

from __future__ import annotations

import numpy as np
from _passes_util import apply, assert_same_outputs, ops, parse

from mvcompile.passes import fuse_conv_bn

RNG = np.random.default_rng(0)


def _stats(prefix: str, c: int = 4) -> dict[str, np.ndarray]:
    return {f"{prefix}g": RNG.uniform(0.5, 1.5, c).astype(np.float32),
            f"{prefix}b": RNG.normal(0, 0.1, c).astype(np.float32),
            f"{prefix}m": RNG.normal(0, 0.3, c).astype(np.float32),
            f"{prefix}v": RNG.uniform(0.5, 2.0, c).astype(np.float32)}


def _weights(*names: str) -> dict[str, np.ndarray]:
    return {n: RNG.normal(0, 0.5, (4, 3, 3, 3)).astype(np.float32) for n in names}


FEED = {"x": RNG.uniform(0, 1, (2, 3, 8, 8)).astype(np.float32)}
HEADER = "<ir_version: 10, opset_import: [\"\" : 24]>\n"


def test_conv_bn_becomes_one_conv() -> None:
    before = parse(HEADER + """g (float[2,3,8,8] x) => (float[2,4,8,8] y) {
        c = Conv <pads=[1,1,1,1]> (x, w)
        y = BatchNormalization <epsilon=0.001> (c, sg, sb, sm, sv)
    }""", {**_weights("w"), **_stats("s")})
    after, pass_ = apply(before, "fuse_conv_bn", fuse_conv_bn.rules)
    assert ops(after) == ["Conv"]
    assert pass_.counts == {"fold_bn_into_conv": 1}
    assert_same_outputs(before, after, FEED)


def test_shared_bn_statistics_are_not_folded() -> None:
    before = parse(HEADER + """g (float[2,3,8,8] x) => (float[2,4,8,8] y, float[2,4,8,8] z) {
        c = Conv <pads=[1,1,1,1]> (x, w)
        y = BatchNormalization (c, sg, sb, sm, sv)
        d = Conv <pads=[1,1,1,1]> (x, w2)
        z = BatchNormalization (d, sg, sb, sm, sv)
    }""", {**_weights("w", "w2"), **_stats("s")})
    after, pass_ = apply(before, "fuse_conv_bn", fuse_conv_bn.rules)
    assert ops(after).count("BatchNormalization") == 2
    assert "shared" in pass_.refusals["fold_bn_into_conv"]
    assert_same_outputs(before, after, FEED)


def test_bn_statistics_from_graph_inputs_are_not_folded() -> None:
    before = parse(HEADER + """g (float[2,3,8,8] x, float[4] sm) => (float[2,4,8,8] y) {
        c = Conv <pads=[1,1,1,1]> (x, w)
        y = BatchNormalization (c, sg, sb, sm, sv)
    }""", {**_weights("w"), **{k: v for k, v in _stats("s").items() if k != "sm"}})
    after, pass_ = apply(before, "fuse_conv_bn", fuse_conv_bn.rules)
    assert ops(after) == ["Conv", "BatchNormalization"]
    assert "not a constant" in pass_.refusals["fold_bn_into_conv"]


def test_conv_output_with_another_user_is_not_folded() -> None:
    before = parse(HEADER + """g (float[2,3,8,8] x) => (float[2,4,8,8] y, float[2,4,8,8] c) {
        c = Conv <pads=[1,1,1,1]> (x, w)
        y = BatchNormalization (c, sg, sb, sm, sv)
    }""", {**_weights("w"), **_stats("s")})
    after, _ = apply(before, "fuse_conv_bn", fuse_conv_bn.rules)
    assert ops(after) == ["Conv", "BatchNormalization"]
    assert_same_outputs(before, after, FEED)


BN7_SPATIAL0 = """<ir_version: 4, opset_import: ["" : 7]>
g (float[1,4,5,5] x) => (float[1,3,5,5] y) {
    c = Conv <pads=[1,1,1,1]> (x, w)
    y = BatchNormalization <spatial=0> (c, sg, sb, sm, sv)
}"""


def bn7_spatial0_model():
    """BatchNormalization-7 with spatial=0: statistics per activation, [C, H, W]."""
    stats = {k: v.reshape(3, 5, 5) for k, v in _stats("s", 75).items()}
    weight = {"w": RNG.normal(0, 0.5, (3, 4, 3, 3)).astype(np.float32)}
    return parse(BN7_SPATIAL0, {**weight, **stats})


def test_per_activation_statistics_are_not_folded() -> None:
    """The fold reshaped [C, H, W] statistics to [C·H·W, 1, 1, 1] and raised."""
    before = bn7_spatial0_model()
    after, pass_ = apply(before, "fuse_conv_bn", fuse_conv_bn.rules)
    assert ops(after) == ["Conv", "BatchNormalization"]
    assert "has shape [3, 5, 5], not [3]" in pass_.refusals["fold_bn_into_conv"]
    assert_same_outputs(before, after, {"x": RNG.uniform(0, 1, (1, 4, 5, 5)).astype(np.float32)})


def test_statistics_of_another_type_than_the_weights_are_not_folded() -> None:
    """BatchNormalization-15 takes float32 statistics on float16 data; folding wrote the conv
    weights as float32, an invalid graph."""
    before = parse(HEADER + """g (float16[2,3,8,8] x) => (float16[2,4,8,8] y) {
        c = Conv <pads=[1,1,1,1]> (x, w)
        y = BatchNormalization (c, sg, sb, sm, sv)
    }""", {"w": _weights("w")["w"].astype(np.float16), **_stats("s")})
    after, pass_ = apply(before, "fuse_conv_bn", fuse_conv_bn.rules)
    assert ops(after) == ["Conv", "BatchNormalization"]
    assert "is FLOAT and the conv weight FLOAT16" in pass_.refusals["fold_bn_into_conv"]
    assert_same_outputs(before, after, {"x": FEED["x"].astype(np.float16)}, atol=1e-2)


def test_a_folded_bias_does_not_take_a_name_the_graph_uses() -> None:
    """The new bias is named W_bias; with an initializer of that name already there, onnx_ir
    renamed the old one and left its reader dangling."""
    before = parse(HEADER + """g (float[2,3,8,8] x) => (float[2,4,8,8] y, float[2,3,8,8] z) {
        c = Conv <pads=[1,1,1,1]> (x, w)
        y = BatchNormalization (c, sg, sb, sm, sv)
        z = Add (x, w_bias)
    }""", {**_weights("w"), **_stats("s"), "w_bias": np.ones((3, 1, 1), np.float32)})
    after, pass_ = apply(before, "fuse_conv_bn", fuse_conv_bn.rules)
    assert ops(after) == ["Conv", "BatchNormalization", "Add"]
    assert "'w_bias', which the graph already uses" in pass_.refusals["fold_bn_into_conv"]
    assert_same_outputs(before, after, FEED)
