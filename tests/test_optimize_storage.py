"""`mvcompile optimize` keeps weights stored as float16/bfloat16 (+ Cast) in that precision."""

from __future__ import annotations

import logging
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import run
from mvcompile.optimize import max_abs_diff, optimize_proto


def _conv_model(storage: np.dtype = np.float16, batch_norm: bool = False) -> onnx.ModelProto:
    """x[1,16,8,8] → Conv(3×3, 32 channels) [→ BatchNorm], the weights (and BN parameters)
    stored as ``storage`` initializers, each Cast to float32."""
    rng = np.random.default_rng(0)
    params = {"w": rng.normal(0, 0.2, (32, 16, 3, 3)), "b": rng.normal(0, 0.2, 32)}
    if batch_norm:
        params.update(s=rng.uniform(0.5, 1.5, 32), o=rng.normal(0, 0.1, 32),
                      m=rng.normal(0, 0.1, 32), v=rng.uniform(0.5, 1.5, 32))
    nodes = [helper.make_node("Cast", [f"{name}_stored"], [name], to=TensorProto.FLOAT)
             for name in params]
    nodes.append(helper.make_node("Conv", ["x", "w", "b"], ["c" if batch_norm else "y"],
                                  pads=[1, 1, 1, 1]))
    if batch_norm:
        nodes.append(helper.make_node("BatchNormalization", ["c", "s", "o", "m", "v"], ["y"]))
    inits = [numpy_helper.from_array(value.astype(storage), f"{name}_stored")
             for name, value in params.items()]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32, 8, 8])], inits)
    model = helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(model, full_check=True)
    return model


def _stored_bytes(proto: onnx.ModelProto) -> dict[int, int]:
    """Initializer bytes by ONNX element type."""
    sizes: dict[int, int] = {}
    for init in proto.graph.initializer:
        sizes[init.data_type] = (sizes.get(init.data_type, 0)
                                 + numpy_helper.to_array(init).nbytes)
    return sizes


@pytest.mark.parametrize("storage", [np.float16, ml_dtypes.bfloat16])
def test_weights_stored_in_reduced_precision_stay_so(storage) -> None:
    """onnxsim folds each Cast into a float32 initializer (twice the bytes); the result
    stores them as the input did again, each followed by a Cast, and computes the same."""
    proto = _conv_model(storage)
    optimized, report = optimize_proto(proto, "ort")
    to = helper.np_dtype_to_tensor_dtype(np.dtype(storage))
    assert _stored_bytes(optimized) == {to: (32 * 16 * 9 + 32) * 2}
    assert sorted(n.op_type for n in optimized.graph.node) == ["Cast", "Cast", "Conv"]
    assert report["storage"]["restored"] == 2 and report["storage"]["float32"] == 0
    assert report["size"]["optimized"] <= 1.1 * report["size"]["input"]
    assert max_abs_diff(proto, optimized) == 0.0
    onnx.checker.check_model(optimized, full_check=True)
    again, _ = optimize_proto(optimized, "ort")  # the fixed point: nothing changes
    assert _stored_bytes(again) == _stored_bytes(optimized)


def test_a_float32_model_gets_no_casts() -> None:
    proto = _conv_model(np.float32)
    optimized, report = optimize_proto(proto, "ort")
    assert [n.op_type for n in optimized.graph.node] == ["Conv"]
    assert report["storage"] is None


def test_weights_folded_with_other_constants_stay_float32_and_a_note_says_so(
        tmp_path: Path) -> None:
    """A BatchNorm folded into the conv scales its float16 weights to values float16 cannot
    hold: those stay float32, the file grows, and the command says so with both sizes."""
    src, dst = tmp_path / "bn16.onnx", tmp_path / "out.onnx"
    onnx.save(_conv_model(np.float16, batch_norm=True), str(src))
    code, output = run("optimize", str(src), "-o", str(dst))
    assert code == 0, output
    assert "Note: the input stores weights as float16; 2 float32 weights" in output
    assert "KiB input" in output and "KiB written" in output
    written = onnx.load(str(dst))
    assert _stored_bytes(written) == {TensorProto.FLOAT: (32 * 16 * 9 + 32) * 4}
    onnx.checker.check_model(written, full_check=True)
    ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"])


def test_the_cli_writes_a_file_about_the_size_of_the_input(tmp_path: Path) -> None:
    src, dst = tmp_path / "conv16.onnx", tmp_path / "out.onnx"
    onnx.save(_conv_model(np.float16), str(src))
    code, output = run("optimize", str(src), "-o", str(dst))
    assert code == 0, output
    assert dst.stat().st_size <= 1.1 * src.stat().st_size
    assert "-> 3 (2 of them Casts of float16 weights)" in output
    assert "Note:" not in output
    onnx.checker.check_model(str(dst), full_check=True)
    ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"])


def test_a_restore_that_fails_validation_falls_back_to_float32(monkeypatch) -> None:
    """Simulated: validation refuses any model with a Cast. The float32 result is checked and
    returned instead, and the note names the failure and both sizes."""
    from mvcompile import optimize
    from mvcompile.errors import UserError

    check = optimize._check

    def no_casts(proto, result, *args):
        if any(node.op_type == "Cast" for node in result.graph.node):
            raise UserError("The optimized model failed validation (simulated)")
        return check(proto, result, *args)

    monkeypatch.setattr(optimize, "_check", no_casts)
    optimized, report = optimize_proto(_conv_model(np.float16), "ort")
    assert [n.op_type for n in optimized.graph.node] == ["Conv"]
    assert report["storage"]["restored"] == 0 and report["storage"]["float32"] == 2
    note = optimize.storage_note(report)
    assert "failed validation" in note and "KiB input" in note and "KiB written" in note


def test_bfloat16_weights_are_folded_before_onnxsim_quietly(capfd) -> None:
    """onnxsim's constant folding cannot run ONNX Runtime's Cast on bfloat16 (pages of
    tracebacks, nothing folded, the BatchNorm kept): the Casts of stored weights are folded
    to float32 first, exactly, so the BatchNorm folds into the conv."""
    proto = _conv_model(ml_dtypes.bfloat16, batch_norm=True)
    optimized, report = optimize_proto(proto, "ort")
    assert [n.op_type for n in optimized.graph.node] == ["Conv"]
    assert report["nodes"]["onnxsim"] == 1
    assert max_abs_diff(proto, optimized) <= 1e-5
    captured = capfd.readouterr()
    assert "Traceback" not in captured.out + captured.err
    assert "MLDataType" not in captured.out + captured.err


def test_float16_weights_in_a_constant_node_stay_float16() -> None:
    """storage_types read the Constant's tensor, not the output's type (unknown without shape
    inference)."""
    weights = np.random.default_rng(0).normal(0, 0.2, (64, 64)).astype(np.float16)
    graph = helper.make_graph(
        [helper.make_node("Constant", [], ["w16"], value=numpy_helper.from_array(weights)),
         helper.make_node("Cast", ["w16"], ["w"], to=TensorProto.FLOAT),
         helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])])
    proto = helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 18)])
    optimized, report = optimize_proto(proto, "ort")
    assert _stored_bytes(optimized) == {TensorProto.FLOAT16: 64 * 64 * 2}
    assert report["storage"]["restored"] == 1
    assert max_abs_diff(proto, optimized) == 0.0


def test_a_float16_weight_also_read_directly_is_not_stored_twice() -> None:
    """W16 feeds a Cast (float32 branch) and a float16 MatMul: the weight stored back reuses
    W16 instead of adding an identical copy."""
    weights = np.random.default_rng(0).normal(0, 0.2, (64, 64)).astype(np.float16)
    graph = helper.make_graph(
        [helper.make_node("Cast", ["w16"], ["w"], to=TensorProto.FLOAT),
         helper.make_node("MatMul", ["x", "w"], ["y"]),
         helper.make_node("Cast", ["x"], ["x16"], to=TensorProto.FLOAT16),
         helper.make_node("MatMul", ["x16", "w16"], ["y16"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64]),
         helper.make_tensor_value_info("y16", TensorProto.FLOAT16, [1, 64])],
        [numpy_helper.from_array(weights, "w16")])
    proto = helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 18)])
    optimized, report = optimize_proto(proto, "ort")
    assert [init.name for init in optimized.graph.initializer] == ["w16"]
    assert report["storage"]["restored"] == 1
    assert max_abs_diff(proto, optimized) == 0.0
    onnx.checker.check_model(optimized, full_check=True)


def test_verbose_log_has_one_match_line_per_rule(caplog) -> None:
    """Commuted variants of a rule share its name; -v logs one line per rule and pass, the
    variants' matches summed (ErfGeluOuterHalf has 16 variants)."""
    with caplog.at_level(logging.INFO, logger="mvcompile.pipeline"):
        optimize_proto(_conv_model(np.float16), "ort")
    lines = [record.getMessage() for record in caplog.records if "matched" in record.getMessage()]
    assert "fuse_gelu: ErfGeluOuterHalf matched 0 time(s)" in lines
    assert len(lines) == len(set(lines))
