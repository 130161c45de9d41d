"""QDQ insertion on small fixtures: op list, check_model, ONNX Runtime fuses and runs it."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx_ir.passes.common import NameFixPass

from mvcompile import onnx_io
from mvcompile.calibration.collect import collect_ranges
from mvcompile.calibration.data import ImageSet
from mvcompile.calibration.qdq import QuantPlan, insert_qdq, plan_tensors
from mvcompile.calibration.qparams import REDUCED_QMAX
from mvcompile.calibration.quantize import QuantizeOptions
from mvcompile.calibration.quantize import quantize as calibration_quantize
from mvcompile.errors import UserError

FIXTURE = """
<ir_version: 10, opset_import: ["" : 24]>
block (float[N, 3, 8, 8] x, float[8, 3, 3, 3] w, float[8] b, float[8, 5] fc_w,
       float[5] fc_b) => (float[N, 5] y) {
    conv = Conv <pads = [1, 1, 1, 1]> (x, w, b)
    act = Swish (conv)
    pooled = GlobalAveragePool (act)
    flat = Flatten (pooled)
    y = Gemm <transB = 0> (flat, fc_w, fc_b)
}
"""


def fixture_model(text: str = FIXTURE, seed: int = 0) -> ir.Model:
    """Parse ONNX text; inputs other than the first become random initializers."""
    proto = onnx.parser.parse_model(text)
    rng = np.random.default_rng(seed)
    model = ir.serde.deserialize_model(proto)
    for value in list(model.graph.inputs[1:]):
        shape = [d for d in value.shape]
        array = rng.normal(0, 0.5, shape).astype(np.float32)
        model.graph.inputs.remove(value)
        value.const_value = ir.tensor(array, name=value.name)
        model.graph.register_initializer(value)
    NameFixPass()(model)  # the parser leaves nodes unnamed; keep_float needs names
    return model


def run(model: ir.Model | bytes, x: np.ndarray, optimized_path: str | None = None) -> np.ndarray:
    data = model if isinstance(model, bytes) else onnx_io.to_proto(model).SerializeToString()
    options = ort.SessionOptions()
    if optimized_path:
        options.optimized_model_filepath = optimized_path
    session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def run_all(model: ir.Model, x: np.ndarray) -> list[np.ndarray]:
    data = onnx_io.to_proto(model).SerializeToString()
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})


def quantize(model: ir.Model, data: np.ndarray, plan: QuantPlan) -> dict[str, int]:
    tensors = [v.name for v in plan_tensors(model.graph, plan)]
    ranges = collect_ranges(model, tensors, [data[i:i + 2] for i in range(0, len(data), 2)],
                            "minmax")
    return insert_qdq(model, ranges, plan)


def op_counts(model: ir.Model) -> collections.Counter:
    return collections.Counter(n.op_type for n in model.graph)


@pytest.fixture
def data() -> np.ndarray:
    return np.random.default_rng(1).uniform(0, 1, (8, 3, 8, 8)).astype(np.float32)


def test_conv_and_gemm_get_qdq_and_ort_fuses_them(tmp_path, data: np.ndarray) -> None:
    model = fixture_model()
    expected = run(model, data)
    counts = quantize(model, data, QuantPlan(frozenset({"Conv", "Gemm"})))
    assert counts == {"activations": 3, "weights": 2, "biases": 2, "nodes": 2}
    ops = op_counts(model)
    # activations x, conv, flat: one Q each and one DQ per consumer; weights and biases: DQ;
    # the graph output y stays float
    assert ops["QuantizeLinear"] == 3
    assert ops["DequantizeLinear"] == 3 + 4
    assert model.graph.outputs[0].producer().op_type == "Gemm"
    assert [n.op_type for n in model.graph if n.op_type not in ("QuantizeLinear",
            "DequantizeLinear")] == ["Conv", "Swish", "GlobalAveragePool", "Flatten", "Gemm"]
    proto = onnx_io.to_proto(model)
    onnx.checker.check_model(proto, full_check=True)
    quantized = run(model, data, optimized_path=str(tmp_path / "opt.onnx"))
    fused = {n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node}
    assert {"QLinearConv", "QGemm"} <= fused
    assert quantized.shape == expected.shape
    # Error of a few quantization steps of the output range, far below the signal.
    assert np.abs(quantized - expected).max() < 0.05 * np.abs(expected).max()
    assert model.graph.outputs[0].name == "y"


def test_the_graph_output_stays_float_beyond_its_calibrated_range(tmp_path,
                                                                   data: np.ndarray) -> None:
    """Logits are not clipped to their calibrated range nor rounded to its 8-bit steps: with
    the output's range calibrated at a tenth of what it reaches, the quantized model still
    gives the float logits, and ORT's fused QGemm writes them."""
    model = fixture_model()
    expected = run(model, data)
    plan = QuantPlan(frozenset({"Conv", "Gemm"}))
    tensors = [v.name for v in plan_tensors(model.graph, plan)]
    ranges = collect_ranges(model, tensors, [data], "minmax")
    narrow = 0.1 * float(np.abs(expected).max())
    ranges["y"] = (-narrow, narrow)
    insert_qdq(model, ranges, plan)
    quantized = run(model, data, optimized_path=str(tmp_path / "opt.onnx"))
    assert np.abs(quantized).max() > 5 * narrow
    assert np.abs(quantized - expected).max() < 0.05 * np.abs(expected).max()
    optimized = onnx.load(str(tmp_path / "opt.onnx")).graph
    assert [n.op_type for n in optimized.node if "y" in n.output] == ["QGemm"]
    steps = quantized / (2 * narrow / 255)  # not rounded to the narrow range's 8-bit steps
    assert np.abs(steps - np.round(steps)).max() > 0.1


def test_weights_are_int8_per_channel_and_biases_int32(data: np.ndarray) -> None:
    model = fixture_model()
    quantize(model, data, QuantPlan(frozenset({"Conv", "Gemm"})))
    inits = model.graph.initializers
    assert inits["w_quantized"].const_value.dtype == ir.DataType.INT8
    assert list(inits["w_quantized_scale"].const_value.shape) == [8]  # per output channel
    assert list(inits["fc_w_quantized_scale"].const_value.shape) == [5]  # Gemm transB=0: axis 1
    bias = next(v for k, v in inits.items() if k.startswith("b_quantized"))
    assert bias.const_value.dtype == ir.DataType.INT32
    dq_axes = {n.name: n.attributes["axis"].value for n in model.graph
               if n.op_type == "DequantizeLinear" and "axis" in n.attributes}
    assert dq_axes["fc_w_quantized_dq"] == 1 and dq_axes["w_quantized_dq"] == 0


def test_keep_float_leaves_a_node_untouched(data: np.ndarray) -> None:
    model = fixture_model()
    gemm = next(n for n in model.graph if n.op_type == "Gemm")
    counts = quantize(model, data, QuantPlan(frozenset({"Conv", "Gemm"}), keep_float={gemm.name}))
    assert counts["nodes"] == 1
    gemm_inputs = [v.name for v in gemm.inputs]
    assert gemm_inputs[1:] == ["fc_w", "fc_b"]  # weights stay float


SHARED_INPUT = """
<ir_version: 10, opset_import: ["" : 24]>
block (float[N, 3, 8, 8] x, float[8, 3, 3, 3] w, float[8] b, float[8, 3, 3, 3] w2,
       float[8] b2) => (float[N, 8, 8, 8] c1, float[N, 8, 8, 8] c2) {
    c1 = Conv <pads = [1, 1, 1, 1]> (x, w, b)
    c2 = Conv <pads = [1, 1, 1, 1]> (x, w2, b2)
}
"""


def test_a_node_kept_float_reads_its_shared_input_in_float(data: np.ndarray) -> None:
    model = fixture_model(SHARED_INPUT)
    expected = run_all(model, data)
    kept = next(n for n in model.graph if n.outputs[0].name == "c2")
    # 7-bit weights: on x86 without VNNI, ORT's fused u8·s8 QLinearConv saturates int16 pair
    # sums with 8-bit ones
    plan = QuantPlan(frozenset({"Conv"}), keep_float={kept.name}, weight_qmax=REDUCED_QMAX)
    counts = quantize(model, data, plan)
    assert counts["nodes"] == 1
    assert kept.inputs[0] is model.graph.inputs[0]  # x itself, not DQ(Q(x))
    onnx.checker.check_model(onnx_io.to_proto(model), full_check=True)
    c1, c2 = run_all(model, data)
    np.testing.assert_allclose(c2, expected[1], rtol=1e-6, atol=1e-6)
    assert 0 < np.abs(c1 - expected[0]).max() < 0.05 * np.abs(expected[0]).max()


CHAIN = """
<ir_version: 10, opset_import: ["" : 24]>
block (float[N, 3, 8, 8] x, float[8, 3, 3, 3] w, float[8] b, float[8, 8, 3, 3] w2,
       float[8] b2, float[8, 8, 3, 3] w3, float[8] b3) => (float[N, 8, 8, 8] y) {
    c1 = Conv <pads = [1, 1, 1, 1]> (x, w, b)
    c2 = Conv <pads = [1, 1, 1, 1]> (c1, w2, b2)
    c3 = Conv <pads = [1, 1, 1, 1]> (c2, w3, b3)
    y = Relu (c3)
}
"""  # Relu, not quantized, writes the float graph output (which a quantized c3 would write)


@pytest.mark.parametrize(("width", "axis"), [(8, 3), (1, 2)])
def test_a_node_kept_float_between_quantized_ones_runs_in_float_on_ort(
        tmp_path, width: int, axis: int) -> None:
    """c2 kept in float between quantized c1 and c3. Reading a per-tensor DQ(c1) and feeding
    Q(c2), it sat between a DQ and a Q, and ORT's WeightBiasQuantization fused it into a
    QLinearConv with its own int8 weights; reading c1 in float instead left c1, whose
    integer kernel needs a Q as its only reader, in float too. c2 reads a per-axis DQ, along
    an axis longer than 1 (ORT takes a one-element scale for a scalar)."""
    model = fixture_model(CHAIN.replace("8, 8]", f"8, {width}]").replace(
        "3, 8, 8] x", f"3, 8, {width}] x"))
    data = np.random.default_rng(1).uniform(0, 1, (8, 3, 8, width)).astype(np.float32)
    kept = next(n for n in model.graph if n.outputs[0].name == "c2")
    plan = QuantPlan(frozenset({"Conv"}), keep_float={kept.name}, weight_qmax=REDUCED_QMAX)
    counts = quantize(model, data, plan)
    assert counts["nodes"] == 2
    dq = kept.inputs[0].producer()
    assert dq.op_type == "DequantizeLinear" and dq.attributes["axis"].value == axis
    assert [v.name for v in kept.inputs[1:]] == ["w2", "b2"]
    onnx.checker.check_model(onnx_io.to_proto(model), full_check=True)
    run(model, data, optimized_path=str(tmp_path / "opt.onnx"))
    fused = collections.Counter(n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node)
    assert fused["QLinearConv"] == 2 and fused["Conv"] == 1  # c1 and c3 integer, c2 float


def test_a_node_kept_float_behind_a_reshape_runs_in_float_on_ort(tmp_path,
                                                                 data: np.ndarray) -> None:
    """ORT moves a per-tensor DQ across a Reshape, so c2 reading Reshape(DQ(c1)) was fused
    into an integer kernel as well."""
    model = fixture_model(CHAIN.replace("float[8] b3)", "float[8] b3, int64[4] shape)").replace(
        "c2 = Conv <pads = [1, 1, 1, 1]> (c1, w2, b2)",
        "r = Reshape (c1, shape)\n    c2 = Conv <pads = [1, 1, 1, 1]> (r, w2, b2)"))
    model.graph.initializers["shape"].const_value = ir.tensor(
        np.array([-1, 8, 8, 8], np.int64), name="shape")
    kept = next(n for n in model.graph if n.outputs[0].name == "c2")
    plan = QuantPlan(frozenset({"Conv"}), keep_float={kept.name}, weight_qmax=REDUCED_QMAX)
    quantize(model, data, plan)
    onnx.checker.check_model(onnx_io.to_proto(model), full_check=True)
    run(model, data, optimized_path=str(tmp_path / "opt.onnx"))
    fused = collections.Counter(n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node)
    assert fused["QLinearConv"] == 2 and fused["Conv"] == 1


def test_calibration_refuses_an_activation_that_overflows() -> None:
    text = """
    <ir_version: 10, opset_import: ["" : 24]>
    grow (float[N, 4] x) => (float[N, 4] y) {
        big = Constant <value = float {1e30}> ()
        h = Mul (x, big)
        y = Mul (h, big)
    }
    """
    model = fixture_model(text)
    x = np.random.default_rng(0).uniform(0.5, 1.0, (4, 4)).astype(np.float32)
    with pytest.raises(UserError, match="batch 2 makes tensor 'y' NaN or infinite"):
        collect_ranges(model, ["h", "y"], [x[:2] * 1e-30, x[2:]], "minmax")


def test_matmul_between_activations_quantizes_both_inputs(data: np.ndarray) -> None:
    text = """
    <ir_version: 10, opset_import: ["" : 24]>
    attn (float[N, 4, 6] x, float[6, 6] wq) => (float[N, 4, 4] y) {
        q = MatMul (x, wq)
        xt = Transpose <perm = [0, 2, 1]> (x)
        y = MatMul (q, xt)
    }
    """
    model = fixture_model(text)
    x = np.random.default_rng(2).normal(0, 1, (4, 4, 6)).astype(np.float32)
    expected = run(model, x)
    plan = QuantPlan(frozenset({"MatMul"}))
    assert [v.name for v in plan_tensors(model.graph, plan)] == ["x", "q", "xt", "y"]
    counts = quantize(model, x, plan)
    assert counts["weights"] == 1 and counts["activations"] == 3  # not y, the graph output
    onnx.checker.check_model(onnx_io.to_proto(model), full_check=True)
    np.testing.assert_allclose(run(model, x), expected, atol=0.05 * np.abs(expected).max())


def test_matmul_weight_is_per_tensor() -> None:
    """ORT 1.31's fused QDQ MatMul with per-column weight scales is wrong for batched inputs
    (error grows with the batch); per-tensor weights keep it within a few steps."""
    text = """
    <ir_version: 10, opset_import: ["" : 24]>
    linear (float[N, 4, 6] x, float[6, 6] w) => (float[N, 4, 6] y) { y = MatMul (x, w) }
    """
    model = fixture_model(text)
    x = np.random.default_rng(2).normal(0, 1, (4, 4, 6)).astype(np.float32)
    expected = run(model, x)
    quantize(model, x, QuantPlan(frozenset({"MatMul"})))
    assert model.graph.initializers["w_quantized_scale"].const_value.shape == ir.Shape([])
    np.testing.assert_allclose(run(model, x), expected, atol=0.03 * np.abs(expected).max())


def test_int8_symmetric_activations(data: np.ndarray) -> None:
    model = fixture_model()
    quantize(model, data, QuantPlan(frozenset({"Conv"}), activation_dtype="int8"))
    zero_points = [v.const_value.numpy() for k, v in model.graph.initializers.items()
                   if k in ("x_zero_point", "conv_zero_point")]
    assert len(zero_points) == 2
    assert all(z.dtype == np.int8 and z == 0 for z in zero_points)
    onnx_io.validate(onnx_io.to_proto(model))


def test_add_with_a_constant_operand_becomes_qlinearadd(tmp_path) -> None:
    text = """
    <ir_version: 10, opset_import: ["" : 24]>
    biased (float[N, 4, 6] x, float[6, 6] w, float[6] b) => (float[N, 4, 6] y) {
        h = MatMul (x, w)
        s = Add (h, b)
        y = Relu (s)
    }
    """
    model = fixture_model(text)
    x = np.random.default_rng(3).normal(0, 1, (4, 4, 6)).astype(np.float32)
    expected = run(model, x)
    quantize(model, x, QuantPlan(frozenset({"MatMul", "Add"})))
    add = next(n for n in model.graph if n.op_type == "Add")
    assert all(v.producer() is not None and v.producer().op_type == "DequantizeLinear"
               for v in add.inputs)
    b_quantized = add.inputs[1].producer().inputs[0].const_value
    assert b_quantized.dtype == ir.DataType.UINT8
    quantized = run(model, x, optimized_path=str(tmp_path / "opt.onnx"))
    assert "QLinearAdd" in {n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node}
    np.testing.assert_allclose(quantized, expected, atol=0.03 * np.abs(expected).max())


def _gemm_model(bias_shape: str) -> ir.Model:
    return fixture_model(f"""
<ir_version: 10, opset_import: ["" : 24]>
g (float[N, 8] x, float[8, 4] w, float{bias_shape} b) => (float[N, 4] y) {{
    y = Gemm (x, w, b)
}}""")


def test_gemm_bias_of_shape_1_n_is_quantized_per_channel_and_runs(data: np.ndarray) -> None:
    model = _gemm_model("[1, 4]")
    x = np.random.default_rng(2).uniform(0, 1, (4, 8)).astype(np.float32)
    expected = run(model, x)
    counts = quantize(model, x, QuantPlan(frozenset({"Gemm"})))
    assert counts["biases"] == 1
    onnx.checker.check_model(onnx_io.to_proto(model), full_check=True)
    np.testing.assert_allclose(run(model, x), expected, atol=0.1)  # fused into QGemm
    np.testing.assert_allclose(_run_unfused(model, x), expected, atol=0.1)  # DQ runs itself


def _run_unfused(model: ir.Model, x: np.ndarray) -> np.ndarray:
    """ORT with no graph optimization: every DequantizeLinear runs as written."""
    unfused = ort.SessionOptions()
    unfused.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(onnx_io.to_proto(model).SerializeToString(), unfused,
                                   providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


@pytest.mark.parametrize("op", ["Gemm", "Conv"])
def test_a_node_whose_bias_exceeds_int32_stays_float(caplog, op: str) -> None:
    """Inputs of range 1e-6 and biases of 1: b / (s_x·s_w) overflows int32. Saturating it
    flipped its sign; leaving only the bias in float let ORT's fusion into QGemm/QLinearConv
    quantize it itself and lose it (outputs off by 1). The whole node stays float, and the
    report says so (it said nothing)."""
    if op == "Gemm":
        model, shape = _gemm_model("[4]"), (4, 8)
    else:
        model, shape = fixture_model(CONV_ONLY), (2, 3, 8, 8)
    bias = model.graph.initializers["b"]
    bias.const_value = ir.tensor(np.ones(bias.shape[0], np.float32), name="b")
    x = np.random.default_rng(2).uniform(0, 1e-6, shape).astype(np.float32)
    expected = run(model, x)
    quantized, report = calibration_quantize(
        model, ImageSet(x), QuantizeOptions(op_types=frozenset({op}), report_accuracy=False))
    node = next(n.name for n in model.graph if n.op_type == op)
    assert report.counts["weights"] == report.counts["biases"] == report.counts["nodes"] == 0
    assert [k["node"] for k in report.kept_float] == [node]
    assert "bias exceeds int32" in report.kept_float[0]["reason"] and "stays float" in caplog.text
    assert report.float_matrix_ops == {}  # reported as kept, not as a float matrix op
    onnx.checker.check_model(onnx_io.to_proto(quantized), full_check=True)
    np.testing.assert_allclose(run(quantized, x), expected, atol=1e-3)  # ORT_ENABLE_ALL
    np.testing.assert_allclose(_run_unfused(quantized, x), expected, atol=1e-3)


CONV_ONLY = """
<ir_version: 10, opset_import: ["" : 24]>
block (float[N, 3, 8, 8] x, float[8, 3, 3, 3] w, float[8] b) => (float[N, 8, 8, 8] y) {
    y = Conv <pads = [1, 1, 1, 1]> (x, w, b)
}
"""


def test_a_weight_read_along_two_axes_gets_two_dequantizes() -> None:
    """One [8, 8] weight, per channel along axis 1 (transB=0) and axis 0 (transB=1): two DQ
    outputs that used to share one name (an SSA violation check_model refuses)."""
    model = fixture_model("""
<ir_version: 10, opset_import: ["" : 24]>
g (float[N, 8] x, float[8, 8] w) => (float[N, 8] y, float[N, 8] z) {
    y = Gemm (x, w)
    z = Gemm <transB = 1> (x, w)
}""")
    x = np.random.default_rng(2).uniform(0, 1, (4, 8)).astype(np.float32)
    counts = quantize(model, x, QuantPlan(frozenset({"Gemm"})))
    assert counts["weights"] == 2
    proto = onnx_io.to_proto(model)
    onnx.checker.check_model(proto, full_check=True)
    assert op_counts(model)["DequantizeLinear"] >= 2


def test_insert_qdq_refuses_a_bias_beyond_int32_that_is_not_kept_float() -> None:
    """Called directly (not through quantize(), which keeps such a node float), it used to
    saturate the bias, its sign flipped."""
    model = _gemm_model("[4]")
    model.graph.initializers["b"].const_value = ir.tensor(np.ones(4, np.float32), name="b")
    x = np.random.default_rng(2).uniform(0, 1e-6, (4, 8)).astype(np.float32)
    with pytest.raises(ValueError, match="biases beyond int32"):
        quantize(model, x, QuantPlan(frozenset({"Gemm"})))


def test_integer_shape_arithmetic_is_not_quantized() -> None:
    """Shape → Concat(int64) → Reshape: the Concat (a quantizable op type) was given
    QuantizeLinear on its int64 inputs, and the model failed the checker and ORT's load."""
    text = """<ir_version: 10, opset_import: ["" : 24]>
    m (float[N, 3, 4, 4] x, float[8, 3, 1, 1] w) => (float[N, 8, 16] y) {
        c = Conv (x, w)
        sh = Shape <start = 0, end = 2> (c)
        minus1 = Constant <value = int64[1] {-1}> ()
        tgt = Concat <axis = 0> (sh, minus1)
        y = Reshape (c, tgt)
    }"""
    model = ir.serde.deserialize_model(onnx.parser.parse_model(text))
    weight = model.graph.inputs[1]
    model.graph.inputs.remove(weight)
    weight.const_value = ir.tensor(np.random.default_rng(0).normal(0, 0.5, (8, 3, 1, 1))
                                   .astype(np.float32), name="w")
    model.graph.register_initializer(weight)
    pixels = np.random.default_rng(1).uniform(0, 1, (8, 3, 4, 4)).astype(np.float32)
    quantized, _ = calibration_quantize(model, ImageSet(pixels),
                                        QuantizeOptions(report_accuracy=False))
    proto = onnx_io.to_proto(quantized)
    assert sorted(n.input[0] for n in proto.graph.node if n.op_type == "QuantizeLinear") == [
        "c", "x"]
    onnx.checker.check_model(proto, full_check=True)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    assert session.run(None, {"x": pixels})[0].shape == (8, 8, 16)


def test_a_softmax_reads_a_float_input_so_ort_cannot_fuse_it() -> None:
    """Mul → Softmax → MatMul, the attention of a graph built without passes: with the Mul
    and MatMul quantized, ORT fused DQ → Softmax → Q into QLinearSoftmax, which gives 0
    instead of 1 over one element (one token per patch group): y was 0, not v."""
    text = """<ir_version: 10, opset_import: ["" : 24]>
    m (float[N, 4, 1, 1] s) => (float[N, 4, 1, 8] y)
      <float k = {0.25}, float[1, 8] v = {0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8}> {
        a = Mul (s, k)
        p = Softmax <axis = -1> (a)
        y = MatMul (p, v)
    }"""
    model = ir.serde.deserialize_model(onnx.parser.parse_model(text))
    scores = np.random.default_rng(0).normal(0, 1, (6, 4, 1, 1)).astype(np.float32)
    quantized, _ = calibration_quantize(model, ImageSet(scores),
                                        QuantizeOptions(report_accuracy=False))
    proto = onnx_io.to_proto(quantized)
    writer = {o: n.op_type for n in proto.graph.node for o in n.output}
    softmax = next(n for n in proto.graph.node if n.op_type == "Softmax")
    assert writer[softmax.input[0]] == "Mul"  # float, not a DequantizeLinear
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    expected = np.broadcast_to(np.linspace(0.1, 0.8, 8, dtype=np.float32), (6, 4, 1, 8))
    np.testing.assert_allclose(session.run(None, {"s": scores})[0], expected, atol=0.02)


def test_the_bundled_photos_give_at_most_their_distinct_crops() -> None:
    """They cycled after 39 (13 photos × 3 crops), so --calib-size 100 calibrated on repeats
    while the summary said "100 crops"; now there are 39, and the build says it uses all."""
    from mvcompile.calibration.data import BUNDLED_CROPS, bundled_photos

    images = bundled_photos(64, 100)
    assert len(images.pixels) == BUNDLED_CROPS == 39
    assert len({image.tobytes() for image in images.pixels}) == BUNDLED_CROPS
    assert images.description.startswith("39 crops")
