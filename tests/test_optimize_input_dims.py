"""`mvcompile optimize` on inputs with unknown sizes past the batch: a symbolic height and
width take --resolution; any other unknown size is refused with the way to fix it."""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from conftest import assert_clean_failure, build_random, run
from mvcompile.input_dims import fix_resolution, unknown_dims


def _channel_sum(path: Path, dims: list[int | str | None], opset: int = 18) -> str:
    """y = ReduceSum(x, axis 1, keepdims): an input of shape ``dims`` (None: unknown, unnamed)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    axes = helper.make_tensor("axes", TensorProto.INT64, [1], [1])
    graph = helper.make_graph([helper.make_node("ReduceSum", ["x", "axes"], ["y"])], "sum",
                              [x], [y], [axes])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10
    onnx.save(model, str(path))
    return str(path)


def test_unknown_sizes_past_the_batch_are_found_named_or_not(tmp_path: Path) -> None:
    proto = onnx.load(_channel_sum(tmp_path / "m.onnx", ["N", 3, "h", None]))
    proto.graph.value_info.append(helper.make_tensor_value_info("t", TensorProto.FLOAT,
                                                                ["N", "h"]))
    assert [(u.axis, u.param, u.is_spatial) for u in unknown_dims(proto)] == [
        (2, "h", True), (3, "", True)]
    fixed = fix_resolution(proto, 32, "m.onnx")
    dims = fixed.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["N", 3, 32, 32]  # the batch stays
    inner = fixed.graph.value_info[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in inner] == ["N", 32]  # "h" fixed everywhere
    assert unknown_dims(proto) != []  # the input model is left as it was


def test_symbolic_height_and_width_need_resolution(tmp_path: Path) -> None:
    model = _channel_sum(tmp_path / "m.onnx", ["N", 3, "h", "w"])
    code, output = run("optimize", model, "-o", str(tmp_path / "o.onnx"), "--no-measure")
    assert_clean_failure(code, output, "Input 'x' of", "symbolic height and width [N, 3, h, w]",
                         "--resolution R")
    assert not (tmp_path / "o.onnx").exists()


def test_another_unknown_size_is_refused_with_the_ort_tool_that_fixes_it(tmp_path: Path) -> None:
    model = _channel_sum(tmp_path / "m.onnx", ["N", "tokens", 8])
    code, output = run("optimize", model, "-o", str(tmp_path / "o.onnx"), "--no-measure",
                       "--resolution", "64")  # fills H and W only
    assert_clean_failure(code, output, "shape [N, tokens, 8], with an unknown size at axis 1",
                         "make_dynamic_shape_fixed --dim_param tokens")
    assert not (tmp_path / "o.onnx").exists()


def test_resolution_on_fixed_sizes_is_ignored_with_a_warning(tmp_path: Path, caplog) -> None:
    model = _channel_sum(tmp_path / "m.onnx", [1, 3, 8, 8])
    code, output = run("optimize", model, "-o", str(tmp_path / "o.onnx"), "--no-measure",
                       "--resolution", "64")
    assert code == 0, output
    assert "--resolution 64 is ignored" in caplog.text and "height, width" not in output


def test_a_dynamic_size_mobilevit_export_is_rewritten_at_the_resolution(tmp_path: Path) -> None:
    """Without --resolution the random check input was 1×1 (H and W set like the batch) and
    the input model itself failed in a Reshape."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from mvcompile.graphs.mobilevit import MobileViTConfig
    from mvcompile.reference import hf_model

    cfg = MobileViTConfig.for_size("xxs", resolution=64)
    buffer = io.BytesIO()
    torch.onnx.export(hf_model(cfg, build_random(cfg, seed=2)[1]), (torch.rand(1, 3, 64, 64),),
                      buffer, dynamo=False, opset_version=18, input_names=["pixel_values"],
                      output_names=["logits"],
                      dynamic_axes={"pixel_values": {0: "batch", 2: "height", 3: "width"},
                                    "logits": {0: "batch"}})
    model, out = tmp_path / "dynamic.onnx", tmp_path / "o.onnx"
    model.write_bytes(buffer.getvalue())
    code, output = run("optimize", str(model), "-o", str(out), "--no-measure",
                       "--resolution", "64")
    assert code == 0, output
    assert re.search(r"Transpose +48 -> 6", output) and "fixed to 64" in output, output
    dims = onnx.load(str(out)).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["batch", 3, 64, 64]
    pixels = np.random.default_rng(0).uniform(size=(2, 3, 64, 64)).astype(np.float32)
    plain = ort.SessionOptions()
    plain.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    expected = ort.InferenceSession(str(model), plain).run(None, {"pixel_values": pixels})[0]
    got = ort.InferenceSession(str(out)).run(None, {"pixel_values": pixels})[0]
    assert np.abs(got - expected).max() <= 1e-4
