"""passes.tidy_reshape: no-op Reshapes removed, Reshape chains merged; what stays."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from _passes_util import apply, assert_same_outputs, ops, parse

from mvcompile.passes import tidy_reshape
from mvcompile.passes.tidy_reshape import resolve_reshape

FEED = {"x": np.random.default_rng(0).normal(size=(4, 16, 8)).astype(np.float32)}


def _model(body: str, out: str, shapes: dict[str, list[int]]):
    inits = {name: np.array(shape, np.int64) for name, shape in shapes.items()}
    return parse('<ir_version: 10, opset_import: ["" : 18]>\n'
                 f"g (float[4,16,8] x) => ({out} y) {{ {body} }}", inits)


def _tidy(before):
    """The tidy_reshape rules, then identity elimination, as in the foreign pipelines."""
    after, pass_ = apply(before, "tidy_reshape", tidy_reshape.rules)
    model = ir.serde.deserialize_model(after)
    ir.passes.common.IdentityEliminationPass()(model)
    return ir.serde.serialize_model(model), pass_


@pytest.mark.parametrize("shape", [[4, 16, 8], [-1, 16, 8], [4, 16, -1], [0, 0, 8], [0, -1, 8]])
def test_a_reshape_to_the_input_shape_is_removed(shape: list[int]) -> None:
    before = _model("r = Reshape (x, s)\n y = Relu (r)", "float[4,16,8]", {"s": shape})
    after, pass_ = _tidy(before)
    assert ops(after) == ["Relu"]
    assert pass_.counts["noop_reshape"] == 1
    assert_same_outputs(before, after, FEED)


def test_a_reshape_that_changes_the_shape_stays() -> None:
    before = _model("r = Reshape (x, s)\n y = Relu (r)", "float[4,8,16]", {"s": [4, 8, -1]})
    after, pass_ = _tidy(before)
    assert ops(after) == ["Reshape", "Relu"]
    assert "reshapes [4, 16, 8] to [4, 8, 16]" in pass_.refusals["noop_reshape"]


def test_a_reshape_chain_becomes_one_reshape_or_none() -> None:
    """[4,16,8] → [64,8] → [4,16,8] is no reshape at all; [4,16,8] → [64,8] → [4,128] one."""
    back = _model("a = Reshape (x, s1)\n r = Reshape (a, s2)\n y = Relu (r)", "float[4,16,8]",
                  {"s1": [64, 8], "s2": [4, 16, -1]})
    after, pass_ = _tidy(back)
    assert ops(after) == ["Relu"]
    assert pass_.counts["ReshapeReshape"] == pass_.counts["noop_reshape"] == 1
    assert_same_outputs(back, after, FEED)
    on = _model("a = Reshape (x, s1)\n r = Reshape (a, s2)\n y = Relu (r)", "float[4,128]",
                {"s1": [64, 8], "s2": [4, -1]})
    after, _ = _tidy(on)
    assert ops(after) == ["Reshape", "Relu"]
    assert_same_outputs(on, after, FEED)


def test_a_no_op_reshape_that_is_the_graph_output_keeps_its_name() -> None:
    before = parse('<ir_version: 10, opset_import: ["" : 18]>\n'
                   "g (float[4,16,8] x) => (float[4,16,8] y) "
                   "{ r = Relu (x)\n y = Reshape (r, s) }", {"s": np.array([-1, 16, 8])})
    after, _ = _tidy(before)
    assert ops(after) == ["Relu"] and after.graph.output[0].name == "y"
    assert_same_outputs(before, after, FEED)


@pytest.mark.parametrize(("target", "shape", "allowzero", "expected"), [
    ([0, -1], [4, 16, 8], False, [4, 128]),
    ([0, 16, 8], [0, 16, 8], True, [0, 16, 8]),
    ([-1, -1], [4, 16], False, None),  # two -1
    ([3, -1], [4, 16], False, None),  # 64 elements do not split into 3 rows
    ([0, 0, 0], [4, 16], False, None),  # a 0 past the input's rank
])
def test_resolve_reshape_follows_onnx_semantics(target, shape, allowzero, expected) -> None:
    assert resolve_reshape(target, shape, allowzero) == expected


def _reduce_model(keepdims: int, axes: list[int], target: list[int]):
    """x → Unsqueeze(axis 1, size 1) → ReduceSum(axes) → Reshape(target) → Relu."""
    return parse('<ir_version: 10, opset_import: ["" : 18]>\n'
                 f"g (float[4,16,8] x) => (float[{target[0]},{target[1]}] y) "
                 f"{{ u = Unsqueeze (x, a1)\n s = ReduceSum <keepdims = {keepdims}> (u, ax)\n"
                 " r = Reshape (s, t)\n y = Relu (r) }",
                 {"a1": np.array([1]), "ax": np.array(axes), "t": np.array(target)})


@pytest.mark.parametrize(("keepdims", "axes", "target", "left"), [
    (0, [1], [64, 8], ["Unsqueeze", "Reshape", "Relu"]),  # sum over the new axis: a Reshape
    (0, [-3], [64, 8], ["Unsqueeze", "Reshape", "Relu"]),
    (1, [1], [64, 8], ["Unsqueeze", "Reshape", "Relu"]),  # the two Reshapes merge
    (0, [2], [4, 8], ["Unsqueeze", "ReduceSum", "Reshape", "Relu"]),  # axis of size 16
])
def test_a_reduction_over_axes_of_size_one_is_a_reshape(keepdims, axes, target, left) -> None:
    """ReduceSum over the size-1 head axis (one attention head) only drops it: a Reshape, which
    merges into the Reshape after it."""
    before = _reduce_model(keepdims, axes, target)
    after, pass_ = _tidy(before)
    assert ops(after) == left
    assert pass_.counts["singleton_reducesum"] == (axes != [2])
    assert_same_outputs(before, after, FEED)


def test_a_reduction_of_a_scalar_is_refused_not_a_crash() -> None:
    """Non-empty axes on a scalar (an invalid model) fail the rule's check cleanly."""
    before = parse('<ir_version: 10, opset_import: ["" : 18]>\n'
                   "g (float x) => (float y) { y = ReduceSum (x, a) }",
                   {"a": np.array([0], np.int64)})
    _, pass_ = _tidy(before)
    assert pass_.counts["singleton_reducesum"] == 0
    assert "is a scalar" in pass_.refusals["singleton_reducesum"]
