"""passes.fuse_clips: Clip∘Clip and Relu∘Clip → one Clip, right for ranges that do not overlap
(where onnxscript 0.7's own rules are wrong); onnxscript's optimizer runs with them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxscript.optimizer
import pytest
from _passes_util import apply, assert_same_outputs, ops, parse, run

from conftest import run as run_cli
from mvcompile import onnx_io
from mvcompile.passes import fuse_clips
from mvcompile.pipeline import OnnxscriptOptimize

X = np.linspace(-3, 3, 61, dtype=np.float32)
FEED = {"x": X}
# (a1, b1, a2, b2): overlapping, disjoint below, disjoint above, nested, inverted (min > max)
RANGES = [(-1.0, 2.0, 0.0, 3.0), (-1.0, -0.5, 0.0, 1.0), (0.5, 1.0, -1.0, 0.0),
          (-2.0, 2.0, -1.0, 1.0), (1.0, -1.0, -0.5, 0.5), (-1.0, 1.0, 0.5, -0.5)]


def _two_clips(low1: str, high1: str, low2: str, high2: str, inits: dict) -> onnx.ModelProto:
    return parse('<ir_version: 10, opset_import: ["" : 18]>\n'
                 "g (float[61] x) => (float[61] y) "
                 f'{{ t = Clip (x, {low1}, {high1})\n y = Clip (t, {low2}, {high2}) }}',
                 {k: np.array(v, np.float32) for k, v in inits.items()})


@pytest.mark.parametrize(("a1", "b1", "a2", "b2"), RANGES)
def test_two_clips_become_one_for_every_pair_of_ranges(a1, b1, a2, b2) -> None:
    before = _two_clips("a1", "b1", "a2", "b2", {"a1": a1, "b1": b1, "a2": a2, "b2": b2})
    after, pass_ = apply(before, "fuse_clips", fuse_clips.rules)
    assert ops(after) == ["Clip"]
    assert pass_.counts["FuseSuccessiveClip"] == 1
    expected = np.minimum(np.maximum(np.minimum(np.maximum(X, a1), b1), a2), b2)
    np.testing.assert_array_equal(run(after, FEED)[0], expected)
    assert_same_outputs(before, after, FEED, atol=0)


@pytest.mark.parametrize(("present", "inits"), [
    (("", "b1", "a2", ""), {"b1": -0.5, "a2": 0.0}),  # x ≤ -0.5, then ≥ 0: always 0
    (("a1", "", "", "b2"), {"a1": 1.0, "b2": 0.5}),   # x ≥ 1, then ≤ 0.5: always 0.5
    (("a1", "", "a2", ""), {"a1": -1.0, "a2": 0.5}),  # lower bounds only
    (("", "b1", "", "b2"), {"b1": 2.0, "b2": -1.0}),  # upper bounds only
])
def test_absent_bounds_are_infinite(present: tuple[str, ...], inits: dict) -> None:
    before = _two_clips(*present, inits)
    after, _ = apply(before, "fuse_clips", fuse_clips.rules)
    assert ops(after) == ["Clip"]
    assert_same_outputs(before, after, FEED, atol=0)


@pytest.mark.parametrize(("low", "high"), [(-2.0, -1.0), (-1.0, 1.0), (0.5, 2.0)])
def test_relu_after_clip_becomes_one_clip(low: float, high: float) -> None:
    before = parse('<ir_version: 10, opset_import: ["" : 18]>\n'
                   "g (float[61] x) => (float[61] y) { t = Clip (x, lo, hi)\n y = Relu (t) }",
                   {"lo": np.array(low, np.float32), "hi": np.array(high, np.float32)})
    after, pass_ = apply(before, "fuse_clips", fuse_clips.rules)
    assert ops(after) == ["Clip"]
    assert pass_.counts["FuseSuccessiveReluClip"] == 1
    assert_same_outputs(before, after, FEED, atol=0)


def test_integer_clips_fuse_in_their_type() -> None:
    before = parse('<ir_version: 10, opset_import: ["" : 18]>\n'
                   "g (int32[7] x) => (int32[7] y) { t = Clip (x, a1, b1)\n y = Clip (t, a2, b2) }",
                   {n: np.array(v, np.int32) for n, v in
                    {"a1": -3, "b1": -2, "a2": 0, "b2": 5}.items()})
    after, _ = apply(before, "fuse_clips", fuse_clips.rules)
    assert ops(after) == ["Clip"]
    assert_same_outputs(before, after, {"x": np.arange(-3, 4, dtype=np.int32)}, atol=0)


def test_a_bound_that_is_a_graph_input_is_not_fused() -> None:
    before = parse('<ir_version: 10, opset_import: ["" : 18]>\n'
                   "g (float[61] x, float lo) => (float[61] y) "
                   "{ t = Clip (x, lo, b1)\n y = Clip (t, a2, b2) }",
                   {n: np.array(v, np.float32) for n, v in
                    {"b1": 1.0, "a2": 0.0, "b2": 2.0}.items()})
    after, pass_ = apply(before, "fuse_clips", fuse_clips.rules)
    assert ops(after) == ["Clip", "Clip"]
    assert "graph input" in pass_.refusals["FuseSuccessiveClip"]


def test_the_default_rules_are_onnxscripts_with_ours_in_place_of_its_two() -> None:
    ours = fuse_clips.onnxscript_default_rules()
    theirs = onnxscript.rewriter._DEFAULT_REWRITE_RULES
    assert [r.name for r in ours] == [r.name for r in theirs]
    replaced = [r.name for r, t in zip(ours, theirs, strict=True) if r is not t]
    assert replaced == ["FuseSuccessiveClipRelu", "FuseSuccessiveReluClip", "FuseSuccessiveClip"]


def test_onnxscripts_optimizer_with_our_rules_is_right_inside_an_if_branch() -> None:
    """The case no random-input check sees: the branch only runs when max(x) > 100."""
    then = ('then_branch = g1 () => (float[61] ty) '
            '{ t = Clip (x, a1, b1)\n ty = Clip (t, a2, b2) }')
    els = "else_branch = g2 () => (float[61] ey) { ey = Relu (x) }"
    before = parse('<ir_version: 10, opset_import: ["" : 18]>\n'
                   "g (float[61] x) => (float[61] y) "
                   f"{{ m = ReduceMax <keepdims = 0> (x)\n c = Greater (m, limit)\n"
                   f" y = If <{then}, {els}> (c) }}",
                   {n: np.array(v, np.float32) for n, v in
                    {"a1": -1.0, "b1": -0.5, "a2": 0.0, "b2": 1.0, "limit": 100.0}.items()})
    optimizer = OnnxscriptOptimize()
    after = onnx_io.to_proto(optimizer(ir.serde.deserialize_model(before)).model)
    assert optimizer.failure is None
    branch = next(a.g for n in after.graph.node if n.op_type == "If" for a in n.attribute
                  if a.name == "then_branch")
    assert [n.op_type for n in branch.node] == ["Clip"]  # fused, by our rule
    big = {"x": np.full(61, 200.0, np.float32)}
    assert_same_outputs(before, after, big, atol=0)
    np.testing.assert_array_equal(run(after, big)[0], np.zeros(61, np.float32))


def test_optimize_writes_a_right_model_for_a_clip_pair_in_an_if_branch(tmp_path: Path) -> None:
    """mvcompile optimize end to end on the same kind of model (its check never enters the
    branch: it would have written the wrong one with exit 0)."""
    source = tmp_path / "in.onnx"
    onnx.save(parse('<ir_version: 10, opset_import: ["" : 18]>\n'
                    "g (float[4] x) => (float[4] y) "
                    "{ m = ReduceMax <keepdims = 0> (x)\n c = Greater (m, limit)\n y = If <"
                    "then_branch = g1 () => (float[4] ty) "
                    "{ t = Clip (x, a1, b1)\n ty = Clip (t, a2, b2) }, "
                    "else_branch = g2 () => (float[4] ey) { ey = Relu (x) }> (c) }",
                    {n: np.array(v, np.float32) for n, v in
                     {"a1": -1.0, "b1": -0.5, "a2": 0.0, "b2": 1.0, "limit": 100.0}.items()}),
              source)
    code, output = run_cli("optimize", str(source), "-o", str(tmp_path / "out.onnx"),
                           "--no-measure")
    assert code == 0, output
    assert "differed from the input" not in output  # onnxscript's optimizer was kept
    big = {"x": np.full(4, 200.0, np.float32)}
    np.testing.assert_array_equal(run(onnx.load(tmp_path / "out.onnx"), big)[0], np.zeros(4))


def test_a_nan_bound_is_not_fused() -> None:
    """ONNX Runtime reads a NaN bound as absent; fusing it made the bound NaN."""
    before = _two_clips("a1", "b1", "a2", "b2", {"a1": np.nan, "b1": 1.0, "a2": 0.0, "b2": 2.0})
    after, pass_ = apply(before, "fuse_clips", fuse_clips.rules)
    assert ops(after) == ["Clip", "Clip"]
    assert "NaN" in pass_.refusals["FuseSuccessiveClip"]


@pytest.mark.parametrize(("low", "high"), [(-2.0, -1.0), (0.5, 2.0), (-1.0, 1.0)])
def test_clip_after_relu_becomes_one_clip(low: float, high: float) -> None:
    before = parse('<ir_version: 10, opset_import: ["" : 18]>\n'
                   "g (float[61] x) => (float[61] y) { t = Relu (x)\n y = Clip (t, lo, hi) }",
                   {"lo": np.array(low, np.float32), "hi": np.array(high, np.float32)})
    after, pass_ = apply(before, "fuse_clips", fuse_clips.rules)
    assert ops(after) == ["Clip"] and pass_.counts["FuseSuccessiveClipRelu"] == 1
    assert_same_outputs(before, after, FEED, atol=0)


def test_int64_bounds_keep_their_value() -> None:
    """onnxscript's Clip∘Relu rule took max(0.0, bound) in float64: 2⁶⁰ + 1 lost its 1."""
    big = 2**60 + 1
    before = parse('<ir_version: 10, opset_import: ["" : 18]>\n'
                   "g (int64[3] x) => (int64[3] y) { t = Relu (x)\n y = Clip (t, lo, hi) }",
                   {"lo": np.array(big, np.int64), "hi": np.array(big + 4, np.int64)})
    after, _ = apply(before, "fuse_clips", fuse_clips.rules)
    assert ops(after) == ["Clip"]
    assert_same_outputs(before, after, {"x": np.array([0, big + 2, big + 9], np.int64)}, atol=0)


def test_two_chains_on_one_input_get_bounds_of_their_own() -> None:
    """onnxscript's rules named both chains' bounds x_min, and its optimizer failed."""
    before = parse('<ir_version: 10, opset_import: ["" : 18]>\n'
                   "g (float[61] x) => (float[61] y, float[61] z) "
                   "{ t = Clip (x, a, b)\n y = Clip (t, c, d)\n u = Clip (x, e, f)\n"
                   " z = Clip (u, g, h) }",
                   {n: np.array(v, np.float32) for n, v in zip("abcdefgh", (
                       0.0, 1.0, 0.5, 6.0, -1.0, 2.0, 0.0, 0.5), strict=True)})
    optimizer = OnnxscriptOptimize()
    after = onnx_io.to_proto(optimizer(ir.serde.deserialize_model(before)).model)
    assert optimizer.failure is None and optimizer.rewrites == 2
    assert ops(after) == ["Clip", "Clip"]
    assert_same_outputs(before, after, FEED, atol=0)


def test_a_clip_pair_on_a_value_of_unknown_type_is_left_and_the_optimizer_goes_on() -> None:
    """After a custom-domain op the type is unknown: onnxscript's rule raised, and its whole
    optimizer stage (constant folding, BN folds) was skipped."""
    before = onnx.parser.parse_model(
        '<ir_version: 10, opset_import: ["" : 18, "custom" : 1]>\n'
        "g (float[4] x) => (float[4] y) { u = custom.Foo (x)\n t = Clip (u, a, b)\n"
        " y = Clip (t, c, d) }")
    before.graph.initializer.extend(onnx.numpy_helper.from_array(np.array(v, np.float32), n)
                                    for n, v in zip("abcd", (0.0, 1.0, 0.0, 6.0), strict=True))
    optimizer = OnnxscriptOptimize()
    after = onnx_io.to_proto(optimizer(ir.serde.deserialize_model(before)).model)
    assert optimizer.failure is None
    assert [n.op_type for n in after.graph.node] == ["Foo", "Clip", "Clip"]
