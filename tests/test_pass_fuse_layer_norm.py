"""passes.fuse_layer_norm: a decomposed layer norm → LayerNormalization (onnxscript's rules),
refused where γ or β would widen the result."""

from __future__ import annotations

import numpy as np
from _passes_util import apply, assert_same_outputs, ops, parse

from mvcompile.optimize import rule_rows
from mvcompile.passes import fuse_layer_norm
from mvcompile.pipeline import NO_CANDIDATE

RNG = np.random.default_rng(0)
CONSTANTS = {"eps": np.array(1e-5, np.float32), "two": np.array(2.0, np.float32),
             "gamma": RNG.normal(1, 0.2, (8,)).astype(np.float32),
             "beta": RNG.normal(0, 0.2, (8,)).astype(np.float32)}


def _layer_norm(inputs: str, output: str, tail: str, square: str = "Mul (d, d)",
                axis: int = -1, eps: np.ndarray = CONSTANTS["eps"]):
    """(x − mean) / sqrt(var + ε) over ``axis``, then ``tail`` (scale and shift)."""
    return parse('<ir_version: 10, opset_import: ["" : 24]>\n' + f"""g ({inputs}) => ({output}) {{
        m = ReduceMean <keepdims=1> (x, axes)
        d = Sub (x, m)
        dd = {square}
        v = ReduceMean <keepdims=1> (dd, axes)
        ve = Add (v, eps)
        s = Sqrt (ve)
        n = Div (d, s)
        {tail}
    }}""", {**CONSTANTS, "eps": eps, "axes": np.array([axis], np.int64)})


def _feed(**shapes: tuple[int, ...]) -> dict[str, np.ndarray]:
    return {name: RNG.normal(0, 1, shape).astype(np.float32) for name, shape in shapes.items()}


def test_decomposed_layer_norm_with_scale_and_shift_becomes_one_node() -> None:
    for square in ("Mul (d, d)", "Pow (d, two)"):
        before = _layer_norm("float[B,5,8] x", "float[B,5,8] y",
                             "ng = Mul (n, gamma)\n y = Add (ng, beta)", square)
        after, pass_ = apply(before, "fuse_layer_norm", fuse_layer_norm.rules)
        assert ops(after) == ["LayerNormalization"]
        assert pass_.counts == {"ExplicitKeepdims": 0, "LayerNormFusion": 1,
                                "LayerNormBiasFusion": 1}
        # keepdims already spelled out: nothing to do, which optimize's table leaves out
        assert pass_.refusal_kinds == {"ExplicitKeepdims": NO_CANDIDATE}
        rows, hidden, _ = rule_rows({"stages": [pass_.report()]}, width=80)
        assert [row[0] for row in rows] == ["LayerNormFusion", "LayerNormBiasFusion"]
        assert hidden == 1
        assert_same_outputs(before, after, _feed(x=(2, 5, 8)))


def test_a_shift_of_x_shape_is_fused() -> None:
    """β may be an activation of x's own shape: it broadcasts to x unchanged."""
    before = _layer_norm("float[2,5,8] x, float[2,5,8] h", "float[2,5,8] y",
                         "ng = Mul (n, gamma)\n y = Add (ng, h)")
    after, _ = apply(before, "fuse_layer_norm", fuse_layer_norm.rules)
    assert ops(after) == ["LayerNormalization"]
    assert_same_outputs(before, after, _feed(x=(2, 5, 8), h=(2, 5, 8)))


def test_a_shift_that_widens_the_result_is_not_fused_into_the_node() -> None:
    """x [1,5,8] + β [3,5,8] is [3,5,8]; LayerNormalization's output keeps x's shape."""
    before = _layer_norm("float[1,5,8] x, float[3,5,8] h", "float[3,5,8] y",
                         "ng = Mul (n, gamma)\n y = Add (ng, h)")
    after, pass_ = apply(before, "fuse_layer_norm", fuse_layer_norm.rules)
    assert ops(after) == ["LayerNormalization", "Add"]
    assert "does not broadcast" in pass_.refusals["LayerNormBiasFusion"]
    assert_same_outputs(before, after, _feed(x=(1, 5, 8), h=(3, 5, 8)))


def test_a_scale_that_widens_the_result_is_not_fused() -> None:
    before = _layer_norm("float[1,5,8] x, float[3,5,8] h", "float[3,5,8] y", "y = Mul (n, h)")
    after, pass_ = apply(before, "fuse_layer_norm", fuse_layer_norm.rules)
    assert "LayerNormalization" not in ops(after)
    assert "does not broadcast" in pass_.refusals["LayerNormFusion"]
    assert_same_outputs(before, after, _feed(x=(1, 5, 8), h=(3, 5, 8)))


def test_a_mean_over_another_axis_is_not_a_layer_norm() -> None:
    before = _layer_norm("float[2,5,8] x", "float[2,5,8] y", "y = Mul (n, gamma)", axis=1)
    after, _ = apply(before, "fuse_layer_norm", fuse_layer_norm.rules)
    assert "LayerNormalization" not in ops(after)
    assert_same_outputs(before, after, _feed(x=(2, 5, 8)))


def test_an_epsilon_that_widens_the_result_is_not_fused() -> None:
    """ε of shape [1,1,1,1] on x [2,5,8]: the decomposed output is [1,2,5,8], the fused node's
    [2,5,8] (an invalid graph)."""
    before = _layer_norm("float[2,5,8] x", "float[1,2,5,8] y", "y = Mul (n, gamma)",
                         eps=np.full((1, 1, 1, 1), 1e-5, np.float32))
    after, pass_ = apply(before, "fuse_layer_norm", fuse_layer_norm.rules)
    assert "LayerNormalization" not in ops(after)
    assert "epsilon 'eps'" in pass_.refusals["LayerNormFusion"]
    assert_same_outputs(before, after, _feed(x=(2, 5, 8)))


def test_a_shift_after_a_layer_norm_with_three_outputs_is_not_fused() -> None:
    """A LayerNormalization that declares Mean and InvStdDev: the bias rule's replacement has
    one output, and the rewrite raised."""
    before = parse('<ir_version: 10, opset_import: ["" : 24]>\n' + """
    g (float[2,5,8] x) => (float[2,5,8] y) {
        n, mu, inv = LayerNormalization (x, gamma)
        y = Add (n, beta)
    }""", CONSTANTS)
    after, pass_ = apply(before, "fuse_layer_norm", fuse_layer_norm.rules)
    assert ops(after) == ["LayerNormalization", "Add"]
    assert "Mean/InvStdDev" in pass_.refusals["LayerNormBiasFusion"]
    assert_same_outputs(before, after, _feed(x=(2, 5, 8)))


def test_reduce_means_that_leave_keepdims_at_its_default_are_fused_too() -> None:
    """keepdims defaults to 1; onnxscript's pattern asks for it spelled out, so a layer norm
    written without it (onnx.parser text, some exporters) stayed eight nodes."""
    text = '<ir_version: 10, opset_import: ["" : 24]>\n' + """
    g (float[2,5,8] x) => (float[2,5,8] y) {
        m = ReduceMean (x, axes)
        d = Sub (x, m)
        dd = Mul (d, d)
        v = ReduceMean (dd, axes)
        ve = Add (v, eps)
        s = Sqrt (ve)
        n = Div (d, s)
        y = Mul (n, gamma)
    }"""
    before = parse(text, {**CONSTANTS, "axes": np.array([-1], np.int64)})
    after, pass_ = apply(before, "fuse_layer_norm", fuse_layer_norm.rules)
    assert ops(after) == ["LayerNormalization"]
    assert pass_.counts["ExplicitKeepdims"] == 2 and pass_.counts["LayerNormFusion"] == 1
    assert_same_outputs(before, after, _feed(x=(2, 5, 8)))


def test_a_reduce_mean_with_keepdims_0_is_left_as_it_is() -> None:
    before = parse('<ir_version: 10, opset_import: ["" : 24]>\n'
                   "g (float[2,5,8] x) => (float[2,5] y) { y = ReduceMean <keepdims=0> (x, axes) }",
                   {"axes": np.array([-1], np.int64)})
    after, pass_ = apply(before, "fuse_layer_norm", fuse_layer_norm.rules)
    assert ops(after) == ["ReduceMean"] and not pass_.counts.get("ExplicitKeepdims")
    assert after.graph.node[0].attribute[0].i == 0
    assert_same_outputs(before, after, _feed(x=(2, 5, 8)))
