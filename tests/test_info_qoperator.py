"""`mvcompile info` on QOperator INT8 models (ONNX Runtime's quantize_static/quantize_dynamic
output): the int8 weights and int32 biases of QLinearConv, QLinearMatMul, QGemm, ConvInteger,
MatMulInteger, ... are parameters (their scales and zero points are not), and those nodes
count the MACs of their float counterparts, so a quantized model reports its float model's
figures."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import (
    CalibrationDataReader,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)

from conftest import run
from mvcompile import analysis

RNG = np.random.default_rng(0)


def _init(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array), name)


def _int8(*shape: int) -> np.ndarray:
    return RNG.integers(-127, 128, size=shape, dtype=np.int8)


def _scalar_qparams(prefix: str, zero_point_type: type = np.uint8) -> list[onnx.TensorProto]:
    return [_init(f"{prefix}_scale", np.float32(0.05)),
            _init(f"{prefix}_zp", zero_point_type(0))]


def _model(nodes: list[onnx.NodeProto], inputs: list[onnx.ValueInfoProto],
           outputs: list[onnx.ValueInfoProto], inits: list[onnx.TensorProto]) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21),
                                                    helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10
    return model


def _quantized_input(name: str, shape: list[int]) -> tuple[onnx.ValueInfoProto,
                                                             list[onnx.NodeProto],
                                                             list[onnx.TensorProto]]:
    """A float graph input and the QuantizeLinear that makes ``{name}_q`` (uint8) of it."""
    return (helper.make_tensor_value_info(name, TensorProto.FLOAT, shape),
            [helper.make_node("QuantizeLinear", [name, f"{name}_scale", f"{name}_zp"],
                              [f"{name}_q"])],
            _scalar_qparams(name))


def test_qlinearconv_counts_weight_and_bias_not_per_channel_scales() -> None:
    x, nodes, inits = _quantized_input("x", [1, 3, 16, 16])
    inits += [_init("w", _int8(8, 3, 3, 3)),
              _init("w_scale", np.full(8, 0.01, np.float32)),  # per channel: rank 1
              _init("w_zp", np.zeros(8, np.int8)),
              _init("b", RNG.integers(-100, 100, 8, dtype=np.int32)),
              *_scalar_qparams("y")]
    nodes += [
        helper.make_node("QLinearConv", ["x_q", "x_scale", "x_zp", "w", "w_scale", "w_zp",
                                         "y_scale", "y_zp", "b"], ["y_q"], pads=[1, 1, 1, 1]),
        helper.make_node("DequantizeLinear", ["y_q", "y_scale", "y_zp"], ["y"]),
    ]
    model = _model(nodes, [x], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                   inits)
    assert analysis.count_parameters(model) == 8 * 3 * 3 * 3 + 8
    assert analysis.count_macs(model) == (8 * 16 * 16 * 3 * 3 * 3, [])


def test_qlinearmatmul_counts_its_int8_weight() -> None:
    a, nodes, inits = _quantized_input("a", [1, 4, 16])
    inits += [_init("w", _int8(16, 32)), *_scalar_qparams("w", np.int8), *_scalar_qparams("y")]
    nodes += [
        helper.make_node("QLinearMatMul", ["a_q", "a_scale", "a_zp", "w", "w_scale", "w_zp",
                                           "y_scale", "y_zp"], ["y_q"]),
        helper.make_node("DequantizeLinear", ["y_q", "y_scale", "y_zp"], ["y"]),
    ]
    model = _model(nodes, [a], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                   inits)
    assert analysis.count_parameters(model) == 16 * 32
    assert analysis.count_macs(model) == (4 * 32 * 16, [])


@pytest.mark.parametrize("quantized_output", [True, False])
def test_qgemm_counts_parameters_and_macs(quantized_output: bool) -> None:
    """com.microsoft.QGemm, transB=1, per-column weight scales; with a quantized output, or a
    float one (no y_scale / y_zero_point)."""
    a, nodes, inits = _quantized_input("a", [2, 16])
    inits += [_init("w", _int8(10, 16)),
              _init("w_scale", np.full(10, 0.01, np.float32)),
              _init("w_zp", np.zeros(10, np.int8)),
              _init("c", RNG.integers(-100, 100, 10, dtype=np.int32))]
    gemm_inputs = ["a_q", "a_scale", "a_zp", "w", "w_scale", "w_zp", "c"]
    if quantized_output:
        inits += _scalar_qparams("y")
        nodes += [helper.make_node("QGemm", [*gemm_inputs, "y_scale", "y_zp"], ["y_q"],
                                   domain="com.microsoft", transB=1),
                  helper.make_node("DequantizeLinear", ["y_q", "y_scale", "y_zp"], ["y"])]
    else:
        nodes += [helper.make_node("QGemm", gemm_inputs, ["y"], domain="com.microsoft",
                                   transB=1)]
    model = _model(nodes, [a], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                   inits)
    assert analysis.count_parameters(model) == 10 * 16 + 10
    assert analysis.count_macs(model) == (2 * 10 * 16, [])


def test_convinteger_and_matmulinteger() -> None:
    x = helper.make_tensor_value_info("x", TensorProto.UINT8, [1, 3, 8, 8])
    inits = [_init("w", _int8(4, 3, 3, 3)), _init("x_zp", np.uint8(128)),
             _init("w_zp", np.zeros(4, np.int8)), _init("shape", np.array([1, 4, 36], np.int64)),
             _init("m", _int8(36, 6)), _init("m_zp", np.int8(0))]
    nodes = [
        helper.make_node("ConvInteger", ["x", "w", "x_zp", "w_zp"], ["conv"]),  # [1, 4, 6, 6]
        helper.make_node("Cast", ["conv"], ["conv8"], to=TensorProto.UINT8),
        helper.make_node("Reshape", ["conv8", "shape"], ["rows"]),  # [1, 4, 36]
        helper.make_node("MatMulInteger", ["rows", "m", "x_zp", "m_zp"], ["y"]),  # [1, 4, 6]
    ]
    model = _model(nodes, [x], [helper.make_tensor_value_info("y", TensorProto.INT32, None)],
                   inits)
    assert analysis.count_parameters(model) == 4 * 3 * 3 * 3 + 36 * 6
    assert analysis.count_macs(model) == (4 * 6 * 6 * 27 + 4 * 6 * 36, [])


def test_dynamic_quantize_matmul_and_matmul_nbits() -> None:
    """DynamicQuantizeMatMul (int8 weight, float bias), then MatMulNBits, whose 4-bit packed
    weight counts its K · N unpacked elements."""
    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, [1, 5, 32])
    k, n, block = 16, 8, 16
    inits = [_init("w", _int8(32, 16)), _init("w_scale", np.float32(0.01)),
             _init("w_zp", np.int8(0)), _init("bias", np.zeros(16, np.float32)),
             _init("packed", RNG.integers(0, 255, (n, k // block, block // 2), dtype=np.uint8)),
             _init("nbits_scales", np.full(n * (k // block), 0.01, np.float32))]
    nodes = [
        helper.make_node("DynamicQuantizeMatMul", ["a", "w", "w_scale", "w_zp", "bias"], ["h"],
                         domain="com.microsoft"),
        helper.make_node("MatMulNBits", ["h", "packed", "nbits_scales"], ["y"],
                         domain="com.microsoft", K=k, N=n, bits=4, block_size=block),
    ]
    model = _model(nodes, [a], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                   inits)
    assert analysis.count_parameters(model) == 32 * 16 + 16 + k * n
    assert analysis.count_macs(model) == (5 * 16 * 32 + 5 * n * k, [])


def test_matrix_op_without_a_rule_is_reported_not_counted_zero() -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 1, 4])
    inits = [_init("w", np.zeros((1, 4 * 5, 4), np.float32)),
             _init("r", np.zeros((1, 4 * 5, 5), np.float32))]
    model = _model([helper.make_node("LSTM", ["x", "w", "r"], ["y"], name="lstm",
                                     hidden_size=5)],
                   [x], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    assert analysis.count_macs(model) == (0, ["lstm"])


def test_conv_transpose_counts_input_elements_times_weights_per_input_channel() -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 5, 5])
    model = _model([helper.make_node("ConvTranspose", ["x", "w"], ["y"])], [x],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                   [_init("w", np.zeros((4, 2, 3, 3), np.float32))])
    assert analysis.count_macs(model) == (4 * 5 * 5 * 2 * 3 * 3, [])  # y: [1, 2, 7, 7]


def _float_model() -> onnx.ModelProto:
    """Conv 3→8 (3x3, pad 1), Relu, Conv 8→8 (3x3, stride 2, pad 1), Relu, Flatten, Gemm
    (512 → 10, transB): on [1, 3, 16, 16]."""
    inits = [_init("w1", RNG.normal(size=(8, 3, 3, 3)).astype(np.float32)),
             _init("b1", RNG.normal(size=8).astype(np.float32)),
             _init("w2", RNG.normal(size=(8, 8, 3, 3)).astype(np.float32)),
             _init("b2", RNG.normal(size=8).astype(np.float32)),
             _init("fc_w", RNG.normal(size=(10, 8 * 8 * 8)).astype(np.float32)),
             _init("fc_b", RNG.normal(size=10).astype(np.float32))]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1],
                         strides=[2, 2]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("Flatten", ["r2"], ["flat"]),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], transB=1),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 16, 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


FLOAT_PARAMETERS = 8 * 27 + 8 + 8 * 72 + 8 + 512 * 10 + 10
FLOAT_MACS = 8 * 16 * 16 * 27 + 8 * 8 * 8 * 72 + 512 * 10


def _info_counts(path: Path) -> tuple[str, str]:
    code, output = run("info", str(path))
    assert code == 0, output
    params = re.search(r"^parameters\s+(.*)$", output, re.M)
    macs = re.search(r"^MACs \(batch 1\)\s+(.*)$", output, re.M)
    assert params and macs, output
    return params.group(1).strip(), macs.group(1).strip()


@pytest.mark.parametrize("per_channel", [True, False])
def test_info_on_quantize_static_qoperator_matches_the_float_model(
        tmp_path: Path, per_channel: bool) -> None:
    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            rng = np.random.default_rng(1)
            self.feeds = iter([{"x": rng.random((1, 3, 16, 16), np.float32)}
                               for _ in range(2)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.feeds, None)

    float_path, quant_path = tmp_path / "float.onnx", tmp_path / "qop.onnx"
    float_model = _float_model()
    onnx.save(float_model, str(float_path))
    quantize_static(str(float_path), str(quant_path), Reader(),
                    quant_format=QuantFormat.QOperator, per_channel=per_channel,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    quantized = onnx.load(str(quant_path))
    ops = {n.op_type for n in quantized.graph.node}
    assert {"QLinearConv", "QGemm"} <= ops and not {"Conv", "Gemm"} & ops, ops

    assert analysis.count_parameters(float_model) == FLOAT_PARAMETERS
    assert analysis.count_macs(float_model) == (FLOAT_MACS, [])
    assert analysis.count_parameters(quantized) == FLOAT_PARAMETERS
    assert analysis.count_macs(quantized) == (FLOAT_MACS, [])
    assert _info_counts(quant_path) == _info_counts(float_path)


@pytest.mark.parametrize("per_channel", [True, False])
def test_info_on_quantize_dynamic_matches_the_float_model(tmp_path: Path,
                                                          per_channel: bool) -> None:
    """ConvInteger and MatMulInteger weights count; a per-channel weight scale, which the
    rescale Mul multiplies with DynamicQuantizeLinear's scale, does not."""
    float_path, quant_path = tmp_path / "float.onnx", tmp_path / "dynamic.onnx"
    onnx.save(_float_model(), str(float_path))
    quantize_dynamic(str(float_path), str(quant_path), per_channel=per_channel,
                     weight_type=QuantType.QInt8,
                     op_types_to_quantize=["Conv", "MatMul", "Gemm"])
    quantized = onnx.load(str(quant_path))
    ops = {n.op_type for n in quantized.graph.node}
    assert {"ConvInteger", "MatMulInteger"} <= ops and not {"Conv", "Gemm"} & ops, ops
    assert analysis.count_parameters(quantized) == FLOAT_PARAMETERS
    assert analysis.count_macs(quantized) == (FLOAT_MACS, [])


def test_weights_in_constant_nodes_are_parameters() -> None:
    """Some exporters store weights as Constant nodes: they counted 0 parameters."""
    model = _float_model()
    constants = [helper.make_node("Constant", [], [t.name], value=t)
                 for t in model.graph.initializer]
    nodes = [*constants, *model.graph.node]
    del model.graph.initializer[:]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    onnx.checker.check_model(model, full_check=True)
    assert analysis.count_parameters(model) == FLOAT_PARAMETERS
    assert analysis.count_macs(model) == (FLOAT_MACS, [])


def test_an_if_with_matrix_work_is_not_counted_and_its_weights_are(tmp_path: Path
                                                                   ) -> None:
    """A conv in both branches of an If: 0 parameters and 0 MACs, unflagged, before."""
    def branch(name: str) -> onnx.GraphProto:
        return helper.make_graph(
            [helper.make_node("Conv", ["x", f"{name}_w"], [f"{name}_y"])], name, [],
            [helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT, None)],
            [_init(f"{name}_w", np.ones((2, 3, 1, 1), np.float32))])
    graph = helper.make_graph(
        [helper.make_node("If", ["cond"], ["y"], name="choose", then_branch=branch("a"),
                          else_branch=branch("b"))], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4]),
         helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    assert analysis.count_parameters(model) == 2 * 6  # each branch's stored weights
    assert analysis.count_macs(model) == (0, ["choose"])
    onnx.save(model, str(tmp_path / "if.onnx"))
    assert _info_counts(tmp_path / "if.onnx") == (
        "12 (12)", "0 (and 1 matrix node not counted: shapes unknown, or an op with no MAC rule: "
        "choose)")
