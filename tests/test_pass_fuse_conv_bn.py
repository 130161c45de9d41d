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
