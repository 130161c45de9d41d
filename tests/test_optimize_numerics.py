"""`mvcompile optimize`'s numerics check: signed inputs and both branches of a boolean If,
onnxscript's optimizer left out where its rewrite changes the outputs, a limit relative to
large outputs, and the replaced file's permissions kept."""

from __future__ import annotations

import stat
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from conftest import run
from mvcompile import latency


def _const(name: str, value: float) -> onnx.TensorProto:
    return numpy_helper.from_array(np.array(value, np.float32), name)


# Clip(Clip(x, -1, -0.5), 0, 1) is 0 for every x; onnxscript 0.7's FuseSuccessiveClip rewrites
# it as Clip(x, 0, -0.5), which ONNX Runtime evaluates to -0.5. The pipeline runs onnxscript's
# optimizer with a correct Clip fusion; these tests put its own back (the unsound_clip_fusion
# fixture) to have a rewrite that is wrong where the check must catch it.
_CLIPS = [helper.make_node("Clip", ["x", "a", "b"], ["m"]),
          helper.make_node("Clip", ["m", "c", "d"], ["k"])]
_BOUNDS = [_const("a", -1.0), _const("b", -0.5), _const("c", 0.0), _const("d", 1.0)]


def _model(nodes: list, inputs: list, path: Path, inits: list | None = None) -> Path:
    """The model of ``nodes`` with output y shaped as its first input."""
    shape = [d.dim_value for d in inputs[0].type.tensor_type.shape.dim]
    graph = helper.make_graph(nodes, "g", inputs,
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)],
                              initializer=inits if inits is not None else _BOUNDS)
    model = helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return path


def _optimized(src: Path, tmp_path: Path) -> tuple[Path, str]:
    out = tmp_path / "out.onnx"
    code, output = run("optimize", str(src), "-o", str(out), "--no-measure")
    assert code == 0, output
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)
    return out, output


def _outputs(path: Path, feed: dict) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feed)[0]


def test_a_rewrite_wrong_only_for_negative_inputs_is_not_written(
        tmp_path: Path, unsound_clip_fusion: None) -> None:
    # y = Min(x, 0) · k with k = Clip(Clip(x)) = 0: zero on the U[0, 1) inputs either way.
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    src = _model([helper.make_node("Min", ["x", "c"], ["neg"]), *_CLIPS,
                  helper.make_node("Mul", ["neg", "k"], ["y"])], [x], tmp_path / "in.onnx")
    out, output = _optimized(src, tmp_path)
    feed = {"x": np.array([[-2.0, -1.0, 0.5, 1.0]], np.float32)}
    np.testing.assert_array_equal(_outputs(out, feed), _outputs(src, feed))
    assert "onnxscript_optimizer" in output and "differed from the input" in output


def test_a_rewrite_inside_the_then_branch_of_a_boolean_if_is_checked(
        tmp_path: Path, unsound_clip_fusion: None) -> None:
    then = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["x1"]),
         helper.make_node("Clip", ["x1", "a", "b"], ["m"]),
         helper.make_node("Clip", ["m", "c", "d"], ["t"])], "then", [],
        [helper.make_tensor_value_info("t", TensorProto.FLOAT, [2, 3])])
    other = helper.make_graph([helper.make_node("Identity", ["x"], ["e"])], "else", [],
                              [helper.make_tensor_value_info("e", TensorProto.FLOAT, [2, 3])])
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3]),
              helper.make_tensor_value_info("cond", TensorProto.BOOL, [])]
    src = _model([helper.make_node("If", ["cond"], ["y"], then_branch=then, else_branch=other)],
                 inputs, tmp_path / "in.onnx")
    out, output = _optimized(src, tmp_path)
    assert "differed from the input" in output  # caught with cond True
    for cond in (False, True):
        feed = {"x": np.ones((2, 3), np.float32), "cond": np.array(cond)}
        np.testing.assert_array_equal(_outputs(out, feed), _outputs(src, feed))


def test_float32_rounding_of_large_outputs_is_within_the_relative_limit(tmp_path: Path) -> None:
    # A 3x3 conv + BatchNorm with outputs near 2e3: folding the BN moves them by float32
    # rounding (about 2e-3), far above an absolute 1e-4 and far below 1e-4 of the outputs.
    rng = np.random.default_rng(0)
    c = 64
    inits = [numpy_helper.from_array((3 * rng.standard_normal([c, c, 3, 3])).astype(np.float32),
                                     "W"),
             numpy_helper.from_array((3 * rng.random(c) + 0.5).astype(np.float32), "g"),
             numpy_helper.from_array(rng.standard_normal(c).astype(np.float32), "be"),
             numpy_helper.from_array(rng.standard_normal(c).astype(np.float32), "mu"),
             numpy_helper.from_array((0.1 * rng.random(c) + 0.01).astype(np.float32), "var")]
    nodes = [helper.make_node("Conv", ["x", "W"], ["conv"], pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["conv", "g", "be", "mu", "var"], ["y"])]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, 8, 8])
    src = _model(nodes, [x], tmp_path / "in.onnx", inits)
    out, output = _optimized(src, tmp_path)
    assert "BatchNormalization" not in {n.op_type for n in onnx.load(str(out)).graph.node}
    feed = {"x": rng.standard_normal((1, c, 8, 8)).astype(np.float32)}
    want, got = _outputs(src, feed), _outputs(out, feed)
    assert np.abs(want).max() > 1000
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


def test_signed_inputs_are_normal_floats_and_true_booleans() -> None:
    specs = [("f", np.float32, [2, 500]), ("b", np.bool_, [3]), ("i", np.int64, ["n"])]
    plain = latency.seeded_inputs(specs)
    signed = latency.seeded_inputs(specs, signed=True)
    assert plain["f"].min() >= 0 and signed["f"].min() < -1 and signed["f"].max() > 1
    assert not plain["b"].any() and signed["b"].all()
    assert signed["i"].shape == (1,) and not signed["i"].any()


def test_a_private_model_optimized_in_place_stays_private(tmp_path: Path) -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    src = _model([helper.make_node("Relu", ["x"], ["y"])], [x], tmp_path / "in.onnx", [])
    src.chmod(0o600)
    code, output = run("optimize", str(src), "-o", str(src), "--no-measure")
    assert code == 0, output
    assert stat.S_IMODE(src.stat().st_mode) == 0o600


def test_a_batchnorm_fold_with_cancellation_is_within_the_limit(tmp_path: Path) -> None:
    """Running mean 288 far above the conv's spread (std 7): the folded conv's outputs near 0
    are differences of terms near 290 and move by float32 rounding at that scale (1.5e-3);
    a per-element limit of 1e-4 · max(1, |y|) refused the model outright."""
    rng = np.random.default_rng(0)
    cin, cout = 64, 8
    inits = [numpy_helper.from_array(a, n) for n, a in {
        "W": (1 + 0.01 * rng.standard_normal((cout, cin, 3, 3))).astype(np.float32),
        "g": np.full(cout, 100.0, np.float32), "be": np.zeros(cout, np.float32),
        "mu": np.full(cout, 288.0, np.float32), "var": np.full(cout, 49.0, np.float32)}.items()]
    nodes = [helper.make_node("Conv", ["x", "W"], ["conv"]),
             helper.make_node("BatchNormalization", ["conv", "g", "be", "mu", "var"], ["y"])]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, cin, 16, 16])
    graph = helper.make_graph(nodes, "g", [x], [helper.make_tensor_value_info(
        "y", TensorProto.FLOAT, [1, cout, 14, 14])], inits)
    src = tmp_path / "in.onnx"
    onnx.save(helper.make_model(graph, ir_version=10,
                                opset_imports=[helper.make_opsetid("", 17)]), str(src))
    out, _ = _optimized(src, tmp_path)
    assert [n.op_type for n in onnx.load(str(out)).graph.node] == ["Conv"]
