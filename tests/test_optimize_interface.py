"""`mvcompile optimize` keeps a model's input and output names (callers feed and fetch by
name), and accepts float16 results that differ from the input only by float16 rounding."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnx.parser
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import run
from mvcompile.optimize import output_limit
from mvcompile.passes.restore_interface import restore_interface


def _optimize(tmp_path: Path, text: str) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """(input, result) of `mvcompile optimize --no-measure` on the model ``text``."""
    model = onnx.parser.parse_model(text)
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(tmp_path / "in.onnx"))
    code, output = run("optimize", str(tmp_path / "in.onnx"), "-o", str(tmp_path / "out.onnx"),
                       "--no-measure")
    assert code == 0, output
    result = onnx.load(str(tmp_path / "out.onnx"))
    onnx.checker.check_model(result, full_check=True)
    return model, result


def _by_name(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every output of ``model`` fetched by its name."""
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in model.graph.output]
    return dict(zip(names, session.run(names, feed), strict=True))


@pytest.mark.parametrize("body", ["y = Relu(x)\n z = Identity(y)",  # IdentityElimination
                                  "y = Relu(x)\n t = Identity(y)\n z = Identity(t)"])
def test_an_output_copied_by_another_output_keeps_its_name(tmp_path: Path, body: str) -> None:
    model, result = _optimize(tmp_path, f"""<ir_version: 9, opset_import: ["" : 18]>
        g (float[1,4,8] x) => (float[1,4,8] y, float[1,4,8] z) {{ {body} }}""")
    assert [o.name for o in result.graph.output] == ["y", "z"]
    feed = {"x": np.random.default_rng(0).standard_normal((1, 4, 8)).astype(np.float32)}
    expected, got = _by_name(model, feed), _by_name(result, feed)
    assert expected.keys() == got.keys()
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name])


def test_a_value_listed_twice_as_an_output_stays_listed_twice(tmp_path: Path) -> None:
    """(y, y) came back as (y_1, y), and the check refused it ("Please report this")."""
    model, result = _optimize(tmp_path, """<ir_version: 9, opset_import: ["" : 18]>
        g (float[1,4,8] x) => (float[1,4,8] y, float[1,4,8] y) { y = Relu(x) }""")
    assert [o.name for o in result.graph.output] == ["y", "y"]
    assert [n.op_type for n in result.graph.node] == ["Relu"]
    feed = {"x": np.linspace(-1, 1, 32, dtype=np.float32).reshape(1, 4, 8)}
    session = ort.InferenceSession(result.SerializeToString(), providers=["CPUExecutionProvider"])
    for got in session.run(None, feed):
        np.testing.assert_array_equal(got, np.maximum(feed["x"], 0))


def test_an_input_that_is_also_an_output_keeps_its_name(tmp_path: Path) -> None:
    """onnxscript's optimizer renamed x to x_orig; the check then refused the result."""
    model, result = _optimize(tmp_path, """<ir_version: 9, opset_import: ["" : 18]>
        g (float[1,4,8] x) => (float[1,4,8] x, float[1,4,8] y) { y = Relu(x) }""")
    assert [i.name for i in result.graph.input] == ["x"]
    assert [o.name for o in result.graph.output] == ["x", "y"]
    feed = {"x": np.linspace(-1, 1, 32, dtype=np.float32).reshape(1, 4, 8)}
    got = _by_name(result, feed)
    np.testing.assert_array_equal(got["x"], feed["x"])
    np.testing.assert_array_equal(got["y"], np.maximum(feed["x"], 0))
    assert [n.op_type for n in result.graph.node] == ["Relu"]  # no dead Identity of x is left


def test_outputs_that_fold_to_one_constant_keep_their_names(tmp_path: Path) -> None:
    _, result = _optimize(tmp_path, """<ir_version: 9, opset_import: ["" : 18]>
        g (float[2] x) => (float[2] c, float[2] d, float[2] y) {
            k = Constant <value = float[2] {1.0, 2.0}> ()
            c = Identity(k)
            d = Add(k, k)
            h = Sub(d, k)
            y = Add(x, h)
        }""")
    assert [o.name for o in result.graph.output] == ["c", "d", "y"]
    got = _by_name(result, {"x": np.array([10, 20], np.float32)})
    assert got["c"].tolist() == [1, 2] and got["d"].tolist() == [2, 4]
    assert got["y"].tolist() == [11, 22]


def test_restore_interface_frees_a_name_that_a_pass_gave_to_another_value() -> None:
    model = ir.serde.deserialize_model(onnx.parser.parse_model(
        """<ir_version: 9, opset_import: ["" : 18]>
        g (float[2] x) => (float[2] out) { out = Relu(x) }"""))
    output = model.graph.outputs[0]
    output.name = "renamed"
    model.graph.inputs[0].name = "out"  # a pass reused the output's name for the input
    assert restore_interface(model, ["x"], ["out"]) == 2
    assert [v.name for v in model.graph.inputs] == ["x"]
    assert [v.name for v in model.graph.outputs] == ["out"] and model.graph.outputs[0] is output
    onnx.checker.check_model(ir.serde.serialize_model(model), full_check=True)


def _fp16_conv_bn(path: Path) -> None:
    """float16 Conv → BatchNormalization, outputs up to about 40: one ulp there is 0.03."""
    rng = np.random.default_rng(0)

    def f16(name: str, array: np.ndarray) -> onnx.TensorProto:
        return numpy_helper.from_array(array.astype(np.float16), name)

    inits = [f16("W", rng.standard_normal((16, 8, 3, 3))), f16("g", rng.uniform(.5, 1.5, 16)),
             f16("b", rng.standard_normal(16)), f16("m", rng.standard_normal(16)),
             f16("v", rng.uniform(.1, 1.5, 16))]
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["y"])]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [1, 8, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [1, 16, 8, 8])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)],
                                ir_version=9), str(path))


def test_a_float16_model_is_checked_to_float16_rounding(tmp_path: Path) -> None:
    """Folding the BatchNorm rounds the float16 weights once more; the result was refused
    for a difference of one ulp."""
    _fp16_conv_bn(tmp_path / "in.onnx")
    code, output = run("optimize", str(tmp_path / "in.onnx"), "-o", str(tmp_path / "out.onnx"),
                       "--no-measure")
    assert code == 0, output
    assert "BatchNormalization" not in {n.op_type for n in onnx.load(str(tmp_path / "out.onnx"))
                                        .graph.node}


def test_output_limit_is_per_element_with_a_floor_at_the_outputs_scale() -> None:
    def limit(values, dtype, tolerance=1e-4):
        return output_limit(np.array(values, dtype), tolerance).tolist()

    assert limit([1.0, -40.0], np.float16) == [4 * 0.03125] * 2  # 4 float16 ulps of 40
    assert limit([1e-3], np.float16) == [1e-4]  # the tolerance is larger
    assert limit([0.5, -0.25], np.float32) == [1e-4, 1e-4]  # absolute up to 1
    # 0.5 beside 40: a tenth of the tolerance at 40 (4e-4); NaN: exact
    assert limit([40.0, 0.5, np.nan], np.float32) == pytest.approx([40e-4, 4e-4, 0.0])
    # with no tolerance, float rounding: 32 float32 ulps of 40
    assert limit([40.0, 0.5], np.float32, 0.0) == pytest.approx(
        [32 * float(np.spacing(np.float32(40.0)))] * 2)
    # beside 1e4, 0.5 is held to a tenth of the tolerance at 1e4 (0.1), not to 1e4's (1.0)
    assert limit([1e4, 0.5], np.float32) == pytest.approx([1.0, 0.1])
    assert limit([3, 7], np.int64, 0.0) == [0.0, 0.0]  # integers: exact
    assert limit([np.inf, 2.0], np.float16, 0.0) == [0.0, 4 * float(np.spacing(np.float16(2.0)))]


def test_a_mask_fill_value_does_not_set_the_scale() -> None:
    """float32's lowest value (a common mask fill) made every limit infinite, with numpy's
    overflow warning."""
    fill = float(np.finfo(np.float32).min)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        limits = output_limit(np.array([0.0, 0.3, 0.9, fill], np.float32), 1e-4)
    assert limits.tolist() == pytest.approx([1e-4, 1e-4, 1e-4, abs(fill) * 1e-4])


def test_a_large_element_does_not_hide_a_wrong_small_one(tmp_path: Path,
                                                         unsound_clip_fusion: None) -> None:
    """Boxes in pixels beside scores in [0, 1] (a detector's head): onnxscript's optimizer, with
    its own Clip fusion, turns the scores from 0 into -0.5; a limit taken from the boxes
    (1e4 · 1e-4 = 1) let that through."""
    model = onnx.parser.parse_model("""<ir_version: 10, opset_import: ["" : 18]>
        g (float[1,8] x) => (float[1,16] y) {
            c1 = Clip (x, lo1, hi1)
            scores = Clip (c1, lo2, hi2)
            boxes = Mul (x, scale)
            y = Concat <axis = 1> (boxes, scores) }""")
    for name, value in {"lo1": -1.0, "hi1": -0.5, "lo2": 0.0, "hi2": 1.0, "scale": 1e4}.items():
        model.graph.initializer.append(onnx.numpy_helper.from_array(
            np.array(value, np.float32), name))
    onnx.save(model, tmp_path / "in.onnx")
    code, output = run("optimize", str(tmp_path / "in.onnx"), "-o", str(tmp_path / "out.onnx"),
                       "--no-measure")
    assert code == 0, output
    assert "differed from the input" in output  # the optimizer's result was refused
    feed = {"x": np.random.default_rng(3).uniform(0, 1, (1, 8)).astype(np.float32)}
    got = ort.InferenceSession(str(tmp_path / "out.onnx")).run(None, feed)[0]
    np.testing.assert_array_equal(got[0, 8:], np.zeros(8, np.float32))


def test_onnxsims_bookkeeping_is_not_written_and_the_users_metadata_is(tmp_path: Path) -> None:
    model = onnx.parser.parse_model("""<ir_version: 9, opset_import: ["" : 18]>
        g (float[2] x) => (float[2] y) { y = Relu(x) }""")
    helper.set_model_props(model, {"author": "me", "onnxsim.note": "mine"})
    onnx.save(model, str(tmp_path / "in.onnx"))
    code, output = run("optimize", str(tmp_path / "in.onnx"), "-o", str(tmp_path / "out.onnx"),
                       "--no-measure")
    assert code == 0, output
    props = {p.key: p.value for p in onnx.load(str(tmp_path / "out.onnx")).metadata_props}
    assert props == {"author": "me", "onnxsim.note": "mine"}


def test_shape_inference_failures_are_not_printed_as_tracebacks(tmp_path: Path) -> None:
    """A stale value_info made onnx_ir's shape inference log three tracebacks before the
    one-paragraph error; they are shown with -v."""
    model = onnx.parser.parse_model("""<ir_version: 9, opset_import: ["" : 18]>
        g (float[1,4,8] x) => (float[1,8,4] y) <int64[3] sh = {1,8,4}> {
            r = Relu(x)
            y = Reshape(r, sh)
        }""")
    model.graph.value_info.append(helper.make_tensor_value_info("r", TensorProto.FLOAT,
                                                                [1, 8, 4]))
    onnx.save(model, str(tmp_path / "in.onnx"))
    command = [sys.executable, "-c", "from mvcompile._entry import main; main()", "optimize",
               str(tmp_path / "in.onnx"), "-o", str(tmp_path / "o.onnx")]
    # A process of its own: logging's handlers are set up once per process.
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "fails onnx.checker's full check" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    verbose = subprocess.run([*command, "-v"], capture_output=True, text=True, timeout=300)
    assert "Shape inference failed" in verbose.stderr  # still there for those who ask


def test_an_initializer_that_is_also_an_input_stays_an_overridable_input(tmp_path: Path) -> None:
    # y = x + w·2, w an input with a default (IR ≥ 4): onnxsim used to fold w·2 into a
    # constant and drop the input w, so a caller feeding w got "invalid input name".
    _, result = _optimize(tmp_path, """<ir_version: 10, opset_import: ["" : 17]>
        g (float[1,3] x, float[1,3] w) => (float[1,3] y)
        <float[1,3] w = {1.0, 1.0, 1.0}, float[1,3] c = {2.0, 2.0, 2.0}>
        { wc = Mul(w, c)  y = Add(x, wc) }""")
    assert [v.name for v in result.graph.input] == ["x", "w"]
    x = np.zeros((1, 3), np.float32)
    assert _by_name(result, {"x": x})["y"].tolist() == [[2.0, 2.0, 2.0]]  # the default
    assert _by_name(result, {"x": x, "w": np.full((1, 3), 5.0, np.float32)})["y"].tolist() == [
        [10.0, 10.0, 10.0]]


def test_weights_kept_as_inputs_are_counted_in_the_size_and_said(tmp_path: Path) -> None:
    """An export with keep_initializers_as_inputs=True: the size line left every weight out
    (567 B -> 657 B for 41 KB files), and nothing said why no fold applied."""
    weights = np.ones((1, 3000), np.float32)
    model = onnx.parser.parse_model("""<ir_version: 10, opset_import: ["" : 17]>
        g (float[1,3000] x, float[1,3000] w) => (float[1,3000] y) { y = Add(x, w) }""")
    model.graph.initializer.append(numpy_helper.from_array(weights, "w"))
    onnx.save(model, str(tmp_path / "in.onnx"))
    code, output = run("optimize", str(tmp_path / "in.onnx"), "-o", str(tmp_path / "out.onnx"),
                       "--no-measure")
    assert code == 0, output
    size = next(line for line in output.splitlines() if line.startswith("size"))
    assert size.split()[1:3] == ["11.83", "KiB"], size  # the 12 kB of weights are counted
    assert "1 initializer is also graph input(s)" in output


def _sequence_out() -> onnx.ModelProto:
    return helper.make_model(helper.make_graph(
        [helper.make_node("Relu", ["x"], ["r"]),
         helper.make_node("SequenceConstruct", ["x", "r"], ["s"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_sequence_value_info("s", TensorProto.FLOAT, None)]),
        opset_imports=[helper.make_opsetid("", 18)])


def _optional_in() -> onnx.ModelProto:
    optional = helper.make_value_info("o", helper.make_optional_type_proto(
        helper.make_tensor_type_proto(TensorProto.FLOAT, [2, 3])))
    return helper.make_model(helper.make_graph(
        [helper.make_node("OptionalHasElement", ["o"], ["h"])], "g", [optional],
        [helper.make_tensor_value_info("h", TensorProto.BOOL, [])]),
        opset_imports=[helper.make_opsetid("", 18)])


@pytest.mark.parametrize(("model", "says"), [(_sequence_out, "output 's' is a sequence"),
                                             (_optional_in, "input 'o' is an optional")])
def test_inputs_and_outputs_that_are_not_tensors_are_named(tmp_path: Path, model, says: str
                                                           ) -> None:
    """ONNX Runtime runs both; the check, which feeds and compares tensors, cannot (it used to
    fail with "'list' object has no attribute 'shape'" or "cannot run the input (0)")."""
    onnx.checker.check_model(model(), full_check=True)
    onnx.save(model(), tmp_path / "in.onnx")
    code, output = run("optimize", str(tmp_path / "in.onnx"), "-o", str(tmp_path / "out.onnx"))
    assert code == 1 and says in output and "Nothing was written" in output, output
    assert not (tmp_path / "out.onnx").exists()
