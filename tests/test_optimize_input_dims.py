"""`mvcompile optimize` on inputs with unknown sizes past the batch: a symbolic height and
width take --resolution; other unknown sizes are filled like the batch, and where the input
cannot run so, the error says how to fix them."""

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
from mvcompile.input_dims import fix_resolution, symbolic_image_sizes, unknown_dims


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


def _reshape_to(path: Path, dims: list[int | str], target: list[int]) -> str:
    """y = Reshape(x, target): runs only where x has prod(target) elements."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    shape = helper.make_tensor("shape", TensorProto.INT64, [len(target)], target)
    graph = helper.make_graph([helper.make_node("Reshape", ["x", "shape"], ["y"])], "reshape",
                              [x], [y], [shape])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    onnx.save(model, str(path))
    return str(path)


def _dims(value: onnx.ValueInfoProto) -> list[int | str]:
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


def test_unknown_sizes_past_the_batch_are_found_named_or_not(tmp_path: Path) -> None:
    proto = onnx.load(_channel_sum(tmp_path / "m.onnx", ["N", 3, "h", None]))
    proto.graph.value_info.append(helper.make_tensor_value_info("t", TensorProto.FLOAT,
                                                                ["N", "h"]))
    assert [(u.axis, u.param) for u in unknown_dims(proto)] == [(2, "h"), (3, "")]
    fixed = fix_resolution(proto, 32, "m.onnx")
    assert _dims(fixed.graph.input[0]) == ["N", 3, 32, 32]  # the batch stays symbolic
    assert _dims(fixed.graph.value_info[0]) == ["N", 32]  # "h" is fixed everywhere
    assert unknown_dims(proto) != []  # the input model is left as it was
    assert fix_resolution(proto, None, "m.onnx") is proto


@pytest.mark.parametrize("dims, image", [
    (["N", "h", "w", 3], ["N", 32, 32, 3]),  # channels last
    (["N", 12, "past", 64], None),  # one unknown size: a cache, not an image
    (["N", "c", "h", "w"], None),  # which two are the image's cannot be told
    ([1, 3, 0, 0], None),  # a size of 0 is a size
])
def test_which_inputs_are_images_with_a_symbolic_size(tmp_path: Path, dims: list,
                                                      image: list | None) -> None:
    proto = onnx.load(_channel_sum(tmp_path / "m.onnx", dims))
    assert bool(symbolic_image_sizes(proto)) == (image is not None)
    if image is not None:
        assert _dims(fix_resolution(proto, 32, "m.onnx").graph.input[0]) == image


def test_a_name_shared_by_the_batch_and_the_image_size_is_refused(tmp_path: Path) -> None:
    model = _channel_sum(tmp_path / "m.onnx", ["s", 3, "s", "s"])
    code, output = run("optimize", model, "-o", str(tmp_path / "o.onnx"), "--no-measure",
                       "--resolution", "32")
    assert_clean_failure(code, output, "also axis 0 of input 'x'", "distinct names")
    assert not (tmp_path / "o.onnx").exists()


def test_other_unknown_sizes_are_filled_like_the_batch_as_before(tmp_path: Path,
                                                                 caplog) -> None:
    model = _channel_sum(tmp_path / "m.onnx", ["N", "tokens", 8])
    code, output = run("optimize", model, "-o", str(tmp_path / "o.onnx"), "--no-measure",
                       "--resolution", "64")
    assert code == 0, output
    assert "--resolution 64 is ignored" in caplog.text and "height, width" not in output
    assert _dims(onnx.load(str(tmp_path / "o.onnx")).graph.input[0]) == ["N", "tokens", 8]


def test_an_input_that_cannot_run_so_names_the_ort_tool_that_fixes_the_size(
        tmp_path: Path) -> None:
    model = _reshape_to(tmp_path / "m.onnx", [1, "tokens", 8], [1, 4, 16])  # runs at 8 tokens
    code, output = run("optimize", model, "-o", str(tmp_path / "o.onnx"), "--no-measure")
    assert_clean_failure(code, output, "ONNX Runtime cannot run the input",
                         "unknown size at axis 1 the check filled like the batch (1)",
                         "make_dynamic_shape_fixed --dim_param tokens --dim_value SIZE")
    assert not (tmp_path / "o.onnx").exists()


@pytest.fixture(scope="module")
def dynamic_size_export(tmp_path_factory) -> Path:
    """transformers' MobileViT (random weights) exported with a symbolic batch, H and W."""
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
    path = tmp_path_factory.mktemp("dynamic") / "dynamic.onnx"
    path.write_bytes(buffer.getvalue())
    return path


def test_a_dynamic_size_mobilevit_export_says_to_pass_resolution(
        dynamic_size_export: Path, tmp_path: Path) -> None:
    """The check's 1×1 images fail in the first unfold Reshape."""
    code, output = run("optimize", str(dynamic_size_export), "-o", str(tmp_path / "o.onnx"),
                       "--no-measure")
    assert_clean_failure(code, output, "symbolic height and width [batch, 3, height, width]",
                         "(1×1 images): pass --resolution R")


def test_a_dynamic_size_mobilevit_export_is_rewritten_at_the_resolution(
        dynamic_size_export: Path, tmp_path: Path) -> None:
    out = tmp_path / "o.onnx"
    code, output = run("optimize", str(dynamic_size_export), "-o", str(out), "--no-measure",
                       "--resolution", "64")
    assert code == 0, output
    assert re.search(r"Transpose +48 -> 6", output) and "fixed to 64" in output, output
    assert _dims(onnx.load(str(out)).graph.input[0]) == ["batch", 3, 64, 64]
    pixels = np.random.default_rng(0).uniform(size=(2, 3, 64, 64)).astype(np.float32)
    plain = ort.SessionOptions()
    plain.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    expected = ort.InferenceSession(str(dynamic_size_export), plain).run(
        None, {"pixel_values": pixels})[0]
    got = ort.InferenceSession(str(out)).run(None, {"pixel_values": pixels})[0]
    assert np.abs(got - expected).max() <= 1e-4
