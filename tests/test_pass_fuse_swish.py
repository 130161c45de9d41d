"""passes.fuse_swish: x·σ(x) → Swish (mobile) / QuickGelu (ORT); refusals."""

from __future__ import annotations

import numpy as np
import pytest
from _passes_util import apply, assert_same_outputs, ops, parse

from mvcompile.passes import fuse_swish

FEED = {"x": np.random.default_rng(0).normal(0, 3, (2, 5)).astype(np.float32)}


def _model(body: str, outputs: str = "float[2,5] y", opset: int = 24):
    return parse(f'<ir_version: 10, opset_import: ["" : {opset}]>\n'
                 f"g (float[2,5] x) => ({outputs}) {{ {body} }}")


@pytest.mark.parametrize(("target", "op"), [("mobile", "Swish"), ("ort", "QuickGelu")])
@pytest.mark.parametrize("order", ["x, s", "s, x"])
def test_sigmoid_mul_becomes_one_op(target: str, op: str, order: str) -> None:
    before = _model(f"s = Sigmoid (x)\n y = Mul ({order})")
    after, pass_ = apply(before, "fuse_swish", fuse_swish.rules(target))
    assert ops(after) == [op]
    assert pass_.counts[f"fuse_swish_{target}"] == 1
    assert_same_outputs(before, after, FEED)


def test_sigmoid_with_other_users_is_not_fused() -> None:
    before = _model("s = Sigmoid (x)\n y = Mul (x, s)", "float[2,5] y, float[2,5] s")
    after, _ = apply(before, "fuse_swish", fuse_swish.rules("mobile"))
    assert ops(after) == ["Sigmoid", "Mul"]


def test_mul_of_a_different_value_is_not_fused() -> None:
    before = parse('<ir_version: 10, opset_import: ["" : 24]>\n'
                   "g (float[2,5] x, float[2,5] z) => (float[2,5] y) "
                   "{ s = Sigmoid (x)\n y = Mul (z, s) }")
    after, _ = apply(before, "fuse_swish", fuse_swish.rules("mobile"))
    assert ops(after) == ["Sigmoid", "Mul"]


def test_swish_needs_opset_24() -> None:
    before = _model("s = Sigmoid (x)\n y = Mul (x, s)", opset=18)
    after, pass_ = apply(before, "fuse_swish", fuse_swish.rules("mobile"))
    assert ops(after) == ["Sigmoid", "Mul"]
    assert "opset 18" in pass_.refusals["fuse_swish_mobile"]
