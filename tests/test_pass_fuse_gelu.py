"""passes.fuse_gelu: the erf form of GELU → one Gelu (standard at opset ≥ 20, else
com.microsoft.Gelu, or left alone for the mobile target)."""

from __future__ import annotations

import numpy as np
from _passes_util import apply, assert_same_outputs, ops, parse

from mvcompile.passes import fuse_gelu

FEED = {"x": np.random.default_rng(0).normal(0, 2, (2, 16)).astype(np.float32)}
CONSTANTS = {"half": np.array(0.5, np.float32), "one": np.array(1.0, np.float32),
             "sqrt2": np.array(np.sqrt(2.0), np.float32)}


def _erf_gelu(opset: int, tail: str, outputs: str = "float[2,16] y") -> str:
    """x/√2 → Erf → +1, then ``tail`` (which forms 0.5·x·(…) in some order)."""
    return (f'<ir_version: 10, opset_import: ["" : {opset}]>\n'
            f"""g (float[2,16] x) => ({outputs}) {{
        s = Div (x, sqrt2)
        e = Erf (s)
        e1 = Add (e, one)
        {tail}
    }}""")


OUTER_HALF = "xe = Mul (x, e1)\n y = Mul (half, xe)"  # 0.5·(x·(erf+1))
INNER_HALF = "he = Mul (half, e1)\n y = Mul (x, he)"  # x·(0.5·(erf+1))


def test_both_association_orders_become_standard_gelu_at_opset_20() -> None:
    for tail, rule in ((OUTER_HALF, "ErfGeluOuterHalf"), (INNER_HALF, "ErfGeluInnerHalf")):
        before = parse(_erf_gelu(24, tail), CONSTANTS)
        after, pass_ = apply(before, "fuse_gelu", fuse_gelu.rules())
        assert ops(after) == ["Gelu"]
        assert after.graph.node[0].domain == ""
        assert pass_.counts[rule] == 1
        assert_same_outputs(before, after, FEED)


def test_below_opset_20_ort_gets_the_contrib_gelu_and_mobile_keeps_the_erf_form() -> None:
    before = parse(_erf_gelu(18, OUTER_HALF), CONSTANTS)
    after, _ = apply(before, "fuse_gelu", fuse_gelu.rules())
    assert [(n.op_type, n.domain) for n in after.graph.node] == [("Gelu", "com.microsoft")]
    assert_same_outputs(before, after, FEED)
    kept, pass_ = apply(before, "fuse_gelu", fuse_gelu.rules(standard_only=True))
    assert ops(kept) == ops(before)
    assert "opset 20" in pass_.refusals["ErfGeluOuterHalf"]


def test_an_intermediate_with_another_user_is_not_fused() -> None:
    """erf(x/√2)+1 is also a graph output: fusing would drop a value still needed."""
    before = parse(_erf_gelu(24, OUTER_HALF, "float[2,16] y, float[2,16] e1"), CONSTANTS)
    after, pass_ = apply(before, "fuse_gelu", fuse_gelu.rules())
    assert "Gelu" not in ops(after)
    assert sum(pass_.counts.values()) == 0
    assert_same_outputs(before, after, FEED)


def test_a_different_constant_is_not_gelu() -> None:
    """x/2 instead of x/√2 is not GELU."""
    before = parse(_erf_gelu(24, OUTER_HALF), {**CONSTANTS, "sqrt2": np.array(2.0, np.float32)})
    after, _ = apply(before, "fuse_gelu", fuse_gelu.rules())
    assert "Gelu" not in ops(after)
    assert_same_outputs(before, after, FEED)


def test_a_float16_gelu_and_a_mul_by_one_over_sqrt2_are_fused() -> None:
    """float16 stores √2 as 1.4140625 (1.1e-4 off; onnxscript's match wants 1e-5), and
    some exporters write x·(1/√2) instead of x/√2."""
    half = {name: value.astype(np.float16) for name, value in CONSTANTS.items()}
    text = _erf_gelu(24, OUTER_HALF).replace("float[", "float16[")
    before = parse(text, half)
    after, _ = apply(before, "fuse_gelu", fuse_gelu.rules())
    assert ops(after) == ["Gelu"]
    x16 = {"x": FEED["x"].astype(np.float16)}
    assert_same_outputs(before, after, x16, atol=4e-3)  # a few float16 ulps at |y| ≤ 8
    reciprocal = _erf_gelu(24, INNER_HALF).replace("s = Div (x, sqrt2)", "s = Mul (x, rsqrt2)")
    before = parse(reciprocal, {**CONSTANTS, "rsqrt2": np.array(np.sqrt(0.5), np.float32)})
    after, pass_ = apply(before, "fuse_gelu", fuse_gelu.rules())
    assert ops(after) == ["Gelu"] and pass_.counts["ErfGeluInnerHalf"] == 1
    assert_same_outputs(before, after, FEED)


def test_a_constant_off_by_more_than_float16_rounding_is_not_gelu() -> None:
    before = parse(_erf_gelu(24, OUTER_HALF), {**CONSTANTS,
                                               "sqrt2": np.array(1.41, np.float32)})
    after, _ = apply(before, "fuse_gelu", fuse_gelu.rules())
    assert "Gelu" not in ops(after)
