"""Core ML lowering of the whole MobileViT-XXS (64×64), FP32/FP16 and INT8, and bad input.

Numerics use ``coreml.run_coreml``: the real ``MLModel.predict`` on macOS, the NumPy MIL
evaluator on the program after coremltools' passes elsewhere; the reference is ONNX Runtime on
the same ONNX graph.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx.parser
import onnxruntime as ort
import pytest

from conftest import build_random, quantized_mobile
from mvcompile import onnx_io
from mvcompile.backends import coreml, mil_lower
from mvcompile.errors import UserError
from mvcompile.graphs.mobilevit import MobileViTConfig
from mvcompile.pipeline import run_pipeline

CFG = MobileViTConfig.for_size("xxs", resolution=64)


@pytest.fixture(scope="module")
def plain() -> onnx.ModelProto:
    """The unoptimized graph: BatchNormalization, Sigmoid·Mul, Transpose, Gemm."""
    return onnx_io.to_proto(build_random(CFG)[0])


@pytest.fixture(scope="module")
def mobile() -> onnx.ModelProto:
    """After the mobile pipeline: Swish, SpaceToDepth/DepthToSpace, Einsum, Split, ReduceSum."""
    return onnx_io.to_proto(run_pipeline(build_random(CFG)[0], "mobile")[0])


@pytest.fixture(scope="module")
def int8() -> onnx.ModelProto:
    """INT8 QDQ of the mobile graph, calibrated on the bundled photos."""
    return quantized_mobile(CFG)


def ort_float_qdq(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> np.ndarray:
    """ORT without graph optimizations: Q/DQ evaluated by their formulas, in float."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    return session.run(None, feed)[0]


def compare(model: onnx.ModelProto, options: coreml.CoreMLOptions, reference: onnx.ModelProto
            | None = None) -> tuple[coreml.ct.models.MLModel, float, float]:
    """Convert, run two random images; return the model, max|Δ| and max|Δ| / max(1, max|y|)."""
    mlmodel = coreml.convert(model, options)
    worst, relative = 0.0, 0.0
    for feed in coreml.random_images(model, 1):
        want = ort_float_qdq(reference or model, feed)
        got = coreml.run_coreml(mlmodel, feed, options)["logits"]
        assert got.shape == want.shape == (1, 1000)
        diff = float(np.abs(got - want).max())
        worst = max(worst, diff)
        relative = max(relative, diff / max(1.0, float(np.abs(want).max())))
    return mlmodel, worst, relative


def test_mobile_graph_fp32_tensor_input(mobile: onnx.ModelProto) -> None:
    mlmodel, _, diff = compare(mobile, coreml.CoreMLOptions("fp32", input_type="tensor"))
    assert diff <= 1e-3
    summary = coreml.program_summary(mlmodel._mil_program)
    ops = summary["ops"]
    assert summary["max_rank"] <= 5
    assert ops["conv"] == 29 and ops["silu"] == 34 and ops["layer_norm"] == 21
    assert ops["softmax"] == 9 and ops["split"] == 9
    assert ops["matmul"] == 27 + 15  # the 15 Einsums are plain (transposed) matmuls
    assert "transpose" not in ops and "quantize" not in ops
    assert coreml.describe_io(mlmodel) == [
        {"name": "pixel_values", "role": "input", "kind": "multiarray", "shape": [1, 3, 64, 64]},
        {"name": "logits", "role": "output", "kind": "multiarray", "shape": [1, 1000]}]


def test_plain_graph_fp16_image_input(plain: onnx.ModelProto) -> None:
    mlmodel, _, diff = compare(plain, coreml.CoreMLOptions("fp16", input_type="image"))
    assert diff <= 1e-2
    spec = mlmodel.get_spec()
    image = spec.description.input[0].type.imageType
    assert (image.width, image.height) == (64, 64)
    assert image.colorSpace == coreml.ct.proto.FeatureTypes_pb2.ImageFeatureType.RGB
    first = next(op for op in mlmodel._mil_program.functions["main"].operations
                 if op.op_type != "const")
    assert first.op_type == "mul" and np.isclose(first.y.val, 1 / 255)  # MobileViT /255
    ops = coreml.program_summary(mlmodel._mil_program)["ops"]
    assert ops["cast"] == 2 and "batch_norm" not in ops  # fp16 inside; BN folded into conv


def _quantized_constants(model: onnx.ModelProto) -> int:
    """DequantizeLinear nodes whose data is an 8-bit initializer (weights, constant operands)."""
    eight_bit = {i.name for i in model.graph.initializer
                 if i.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)}
    return sum(n.op_type == "DequantizeLinear" and n.input[0] in eight_bit
               for n in model.graph.node)


def _constant_softmax_quantizes(model: onnx.ModelProto) -> int:
    """QuantizeLinear nodes fed by a Softmax over an axis of length 1 (a constant output)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    dims = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in inferred.graph.value_info}
    softmax_outputs = {n.output[0] for n in inferred.graph.node if n.op_type == "Softmax"
                       and dims.get(n.output[0], [0])[-1] == 1}
    return sum(n.op_type == "QuantizeLinear" and n.input[0] in softmax_outputs
               for n in inferred.graph.node)


def test_int8_w8a8_uses_quantize_dequantize(int8: onnx.ModelProto) -> None:
    mlmodel, _, diff = compare(int8, coreml.CoreMLOptions("fp32", "w8a8", "tensor"))
    assert diff <= 1e-3  # float logits; an internal rounding flip moves them by far less
    ops = coreml.program_summary(mlmodel._mil_program)["ops"]
    onnx_quantize = sum(n.op_type == "QuantizeLinear" for n in int8.graph.node)
    # At 64x64 the last block has one token per patch group: softmax over one element is the
    # constant 1, and MIL may fold the quantize that follows it.
    assert onnx_quantize - _constant_softmax_quantizes(int8) <= ops["quantize"] <= onnx_quantize
    assert ops["dequantize"] >= ops["quantize"]
    # every quantized constant (int8 weights, uint8 add operands) stays 8-bit in the file
    assert ops["constexpr_affine_dequantize"] == _quantized_constants(int8)
    assert mlmodel.get_spec().specificationVersion == 8  # iOS17


def test_int8_weight_only_fp16(int8: onnx.ModelProto) -> None:
    reference = coreml.reference_model(int8, "weight-only")[0]
    mlmodel, _, diff = compare(int8, coreml.CoreMLOptions("fp16", "weight-only", "tensor"),
                            reference)
    assert diff <= 1e-2
    ops = coreml.program_summary(mlmodel._mil_program)["ops"]
    assert "quantize" not in ops and "dequantize" not in ops
    assert ops["constexpr_affine_dequantize"] == _quantized_constants(int8)
    assert mlmodel.get_spec().specificationVersion == 7  # iOS16


def test_write_coreml_writes_a_verified_package(mobile: onnx.ModelProto, tmp_path) -> None:
    named = onnx.ModelProto()
    named.CopyFrom(mobile)
    names = json.dumps([f"class {i}" for i in range(CFG.num_classes)])
    onnx.helper.set_model_props(named, {"mvcompile.class_names": names})
    out = coreml.write_coreml(named, tmp_path / "m" / "model.mlpackage", precision="fp32")
    assert out.is_dir() and (out / "Manifest.json").is_file()
    spec = coreml.ct.utils.load_spec(str(out))
    assert [i.name for i in spec.description.input] == ["pixel_values"]
    assert [o.name for o in spec.description.output] == ["logits"]
    assert "RGB image" in spec.description.input[0].shortDescription
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["model.mlpackage"]
    metadata = spec.description.metadata.userDefined
    assert metadata["mvcompile.class_names"] == names  # kept for apps that show the classes


# -- bad input: each fails clearly and writes nothing --------------------------------------------


def _tiny(ops: str, x: str = "float[N,3,4,4] x", y: str = "float[N,3,4,4] y"
          ) -> onnx.ModelProto:
    return onnx.parser.parse_model(f'<ir_version: 10, opset_import: ["" : 24]>\n'
                                   f"g ({x}) => ({y}) {{ {ops} }}")


def assert_nothing_written(tmp_path) -> None:
    assert list(tmp_path.iterdir()) == []


def test_unsupported_ops_are_all_listed(tmp_path) -> None:
    model = _tiny("a = Erf(x)\n t = Relu(a)\n y = Where(c, t, x)", "float[1,3,4,4] x, bool c")
    for node, name in zip(model.graph.node, ["erf_1", "relu_1", "where_1"], strict=True):
        node.name = name
    with pytest.raises(UserError) as err:
        coreml.write_coreml(model, tmp_path / "m.mlpackage")
    message = str(err.value)
    assert "Erf (node 'erf_1')" in message and "Where (node 'where_1')" in message
    assert "Relu" not in message.split("Supported")[0] and "Nothing was written" in message
    assert_nothing_written(tmp_path)


def test_dynamic_batch_needs_the_batch_flag(tmp_path) -> None:
    with pytest.raises(UserError, match="--coreml-batch"):
        coreml.write_coreml(_tiny("y = Sigmoid(x)"), tmp_path / "m.mlpackage", batch=None)
    assert_nothing_written(tmp_path)
    out = coreml.write_coreml(_tiny("y = Sigmoid(x)"), tmp_path / "m.mlpackage", batch=2,
                              input_type="tensor", precision="fp32")
    assert coreml.ct.utils.load_spec(str(out)).description.input[0].type.multiArrayType.shape \
        == [2, 3, 4, 4]


def test_dynamic_spatial_dim_fails_naming_the_fix(tmp_path) -> None:
    model = _tiny("y = Sigmoid(x)", "float[1,3,H,4] x", "float[1,3,H,4] y")
    with pytest.raises(UserError, match="dynamic dimension 'H' at axis 2.*--resolution"):
        coreml.write_coreml(model, tmp_path / "m.mlpackage")
    assert_nothing_written(tmp_path)


def test_rank_above_five_is_refused(tmp_path) -> None:
    model = _tiny("s = Constant<value=int64[6] {1,1,3,2,2,4}>()\n r = Reshape(x, s)\n"
                  " y = Sigmoid(r)", "float[1,3,4,4] x", "float[1,1,3,2,2,4] y")
    with pytest.raises(UserError, match="rank 6.*at most 5"):
        coreml.write_coreml(model, tmp_path / "m.mlpackage")
    assert_nothing_written(tmp_path)


def test_unwritable_output_path(tmp_path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(UserError, match="is a file"):
        coreml.write_coreml(_tiny("y = Sigmoid(x)"), blocker / "m.mlpackage")
    with pytest.raises(UserError, match=r"\.mlpackage"):
        coreml.write_coreml(_tiny("y = Sigmoid(x)"), tmp_path / "m.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_bad_options_are_user_errors() -> None:
    with pytest.raises(UserError, match="--coreml-precision"):
        coreml.CoreMLOptions(precision="int4").validate()
    with pytest.raises(UserError, match="--coreml-input image"):
        coreml.convert(_tiny("y = Sigmoid(x)", "float[1,5,4,4] x", "float[1,5,4,4] y"),
                       coreml.CoreMLOptions())
    with pytest.raises(UserError, match="weight-only"):
        mil_lower.lower(_tiny("y = Sigmoid(x)"), int8_mode="int4")
