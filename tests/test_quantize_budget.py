"""The accuracy budget keeps the most sensitive layer in float, and says why."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx_ir.passes.common import NameFixPass

from conftest import StageRecorder
from mvcompile import stages
from mvcompile.calibration import sensitivity
from mvcompile.calibration.data import ImageSet
from mvcompile.calibration.qdq import QuantPlan
from mvcompile.calibration.quantize import QuantizeOptions, quantize
from mvcompile.calibration.registry import DEFAULT_OP_TYPES
from test_qdq import fixture_model


def _fragile_model() -> ir.Model:
    """The Conv → Swish → pool → Gemm fixture with one huge tap per filter, on input channel 0,
    which the test images leave at zero: the tap never contributes, but per-channel int8 scales
    to it and rounds every tap that does contribute to zero."""
    model = fixture_model(seed=3)
    weight = model.graph.initializers["w"]
    array = weight.const_value.numpy().copy()
    array[:, 0, 1, 1] = 500.0
    weight.const_value = ir.tensor(array, name="w")
    return model


def _images(count: int = 32) -> ImageSet:
    pixels = np.random.default_rng(5).uniform(0, 1, (count, 3, 8, 8)).astype(np.float32)
    pixels[:, 0] = 0.0
    return ImageSet(pixels, description="random test images, channel 0 blank")


def test_conv_with_outlier_weights_is_ranked_most_sensitive() -> None:
    model, images = _fragile_model(), _images()
    quantized, _ = quantize(model, images, QuantizeOptions(method="minmax", weight_bits=8))
    plan = QuantPlan(frozenset({"Conv", "Gemm"}))
    NameFixPass()(model)
    ranking = sensitivity.rank_layers(model, quantized, plan, images)
    assert [r.op_type for r in ranking] == ["Conv", "Gemm"]
    assert ranking[0].degradation_db > ranking[1].degradation_db + 10


def test_budget_keeps_the_sensitive_conv_in_float() -> None:
    model, images = _fragile_model(), _images()
    options = QuantizeOptions(method="minmax", weight_bits=8,
                              op_types=frozenset({"Conv", "Gemm"}))
    _, unconstrained = quantize(model, images, options)
    assert unconstrained.calibration_agreement < 1.0  # the outliers do flip predictions
    _, report = quantize(model, images, QuantizeOptions(
        method="minmax", weight_bits=8, op_types=frozenset({"Conv", "Gemm"}),
        accuracy_budget=0.0))
    assert len(report.kept_float) == 1
    kept = report.kept_float[0]
    conv = next(n.name for n in model.graph if n.op_type == "Conv")
    assert kept["node"] == conv and "most sensitive" in kept["reason"]
    assert report.calibration_agreement == 1.0 and report.budget_met is True
    assert report.counts["nodes"] == 1  # the Gemm is still quantized
    # the kept Conv is reported once, under kept_float, not as a matrix op ORT cannot quantize
    assert report.float_matrix_ops == {}


def test_a_missed_budget_quantizes_again_the_layers_that_did_not_help(monkeypatch) -> None:
    """Ranking the harmless Gemm first: keeping it in float leaves the disagreement as it was,
    the one-layer limit (a quarter of two) stops the search, and the result is the state
    with the least disagreement and fewest float layers: both layers quantized."""
    model, images = _fragile_model(), _images()
    options = QuantizeOptions(method="minmax", weight_bits=8,
                              op_types=frozenset({"Conv", "Gemm"}))
    _, unconstrained = quantize(model, images, options)
    gemm = next(n.name for n in model.graph if n.op_type == "Gemm")
    monkeypatch.setattr(sensitivity, "rank_layers", lambda *args: [
        sensitivity.LayerSensitivity(gemm, "Gemm", 1.0)])
    steps = StageRecorder()
    with stages.reporting_to(steps):
        quantized, report = quantize(model, images, QuantizeOptions(
            method="minmax", weight_bits=8, op_types=frozenset({"Conv", "Gemm"}),
            accuracy_budget=0.0))
    assert report.budget_met is False
    assert report.kept_float == [] and report.counts["nodes"] == 2
    assert report.budget_disagreement == 1.0 - unconstrained.calibration_agreement > 0
    assert report.calibration_agreement == unconstrained.calibration_agreement
    assert steps.calls[0][0] == "start" and "Accuracy budget" in steps.calls[0][1]
    assert steps.calls[1:] == [("advance", 1)]
    assert steps.finished == 1


def test_a_missed_budget_is_a_build_error_that_says_what_to_change() -> None:
    from mvcompile.calibration.quantize import QuantizeReport
    from mvcompile.int8_build import _budget_missed

    report = QuantizeReport("percentile", "uint8", 7, ["Conv"], {"nodes": 40},
                            kept_float=[{"node": "conv_3", "reason": "most sensitive"}],
                            budget_met=False, budget_disagreement=0.25)
    message = _budget_missed(report, 0.0, 4)
    assert "--accuracy-budget 0% was not met" in message
    assert "25.0%, with 1 layers kept in float" in message
    assert "each image is 25.0%" in message and "Nothing was written" in message


def test_only_weighted_matrix_ops_are_ranked_or_kept_in_float() -> None:
    """A float Sigmoid, Mul or Add between quantized nodes reads a per-axis DQ, which ORT's
    elementwise QDQ fusion takes all the same and then refuses ('Scale and Zero-point must be
    a scalar'): only a Conv, Gemm or MatMul with a constant weight can stay float."""
    model, images = _fragile_model(), _images()
    quantized, _ = quantize(model, images, QuantizeOptions(method="minmax"))
    NameFixPass()(model)
    plan = QuantPlan(frozenset({"Conv", "Gemm", "Swish", "GlobalAveragePool"}))
    ranking = sensitivity.rank_layers(model, quantized, plan, images)
    assert sorted(r.op_type for r in ranking) == ["Conv", "Gemm"]
    swish = next(n.name for n in model.graph if n.op_type == "Swish")
    with pytest.raises(ValueError, match="cannot stay float"):
        quantize(model, images, QuantizeOptions(keep_float=frozenset({swish})))


def test_a_layer_is_charged_for_its_input_quantization_only_where_keeping_it_saves_that() -> None:
    """Kept in float, a layer still reads a quantized tensor when an integer kernel writes it,
    but reads the float tensor otherwise (a graph input, a LayerNorm output): only there does
    its input's quantization count as its own loss."""
    from mvcompile.calibration.registry import QUANTIZERS
    from mvcompile.calibration.sensitivity import _kept_input
    from test_qdq import CHAIN, REDUCED_QMAX
    from test_qdq import quantize as quantize_graph

    model = fixture_model(CHAIN)
    data = np.random.default_rng(1).uniform(0, 1, (8, 3, 8, 8)).astype(np.float32)
    plan = QuantPlan(frozenset({"Conv"}), weight_qmax=REDUCED_QMAX)
    integer = {n.name for n in model.graph
               if n.op_type in QUANTIZERS and QUANTIZERS[n.op_type].output}
    quantize_graph(model, data, plan)
    convs = {n.outputs[0].name: n for n in model.graph if n.op_type == "Conv"}
    assert _kept_input(convs["c1"].inputs[0], integer) == "x"  # the graph input, in float
    read = convs["c2"].inputs[0]
    assert _kept_input(read, integer) == read.name != "c1"  # c1 is quantized either way


_THREE_CONVS = """<ir_version: 10, opset_import: ["" : 24]>
m (float[N, 3, 8, 8] x, float[8, 3, 3, 3] w1, float[8] b1, float[8, 8, 1, 1] w2, float[8] b2,
   float[8, 8, 3, 3] w3, float[8] b3, float[6, 8] fw, float[6] fb) => (float[N, 6] y) {
    c1 = Conv <pads = [1, 1, 1, 1]> (x, w1, b1)
    s1 = Sigmoid (c1)
    a1 = Mul (c1, s1)
    c2 = Conv (a1, w2, b2)
    s2 = Sigmoid (c2)
    a2 = Mul (c2, s2)
    c3 = Conv <pads = [1, 1, 1, 1]> (a2, w3, b3)
    r = Add (c3, a1)
    p = GlobalAveragePool (r)
    f = Flatten (p)
    y = Gemm <transB = 1> (f, fw, fb)
}"""


def _broken_middle_conv() -> tuple[ir.Model, list[str]]:
    """Three convs; the second has one huge tap on a channel the first always zeroes, so the
    tap never matters but per-channel int8 rounds every other tap of that conv to zero.
    Returns the model and its Conv node names in order."""
    import onnx.parser

    model = ir.serde.deserialize_model(onnx.parser.parse_model(_THREE_CONVS))
    rng = np.random.default_rng(3)
    arrays = {v.name: rng.normal(0, 0.5, list(v.shape)).astype(np.float32)
              for v in model.graph.inputs[1:]}
    arrays["w1"][0], arrays["b1"][0] = 0.0, 0.0
    arrays["w2"][:, 0, 0, 0] = 200.0
    for value in list(model.graph.inputs[1:]):
        model.graph.inputs.remove(value)
        value.const_value = ir.tensor(arrays[value.name], name=value.name)
        model.graph.register_initializer(value)
    NameFixPass()(model)
    return model, [n.name for n in model.graph if n.op_type == "Conv"]


def test_a_layer_that_reads_the_exact_input_is_not_ranked_first_for_that() -> None:
    """The stem's input is exact (SQNR capped at 100 dB), so it scored about 60 dB, first,
    though its output is requantized at once and keeping it in float changes nothing
    (agreement 0.594 either way); the broken conv, which keeping in float fixes (logit SQNR
    1.5 → 32.6 dB), came second."""
    model, (stem, broken, _) = _broken_middle_conv()
    images = ImageSet(np.random.default_rng(5).uniform(0, 1, (32, 3, 8, 8)).astype(np.float32))
    options = QuantizeOptions(method="minmax", weight_bits=7, report_accuracy=False)
    quantized, _ = quantize(model, images, options)
    ranking = sensitivity.rank_layers(model, quantized, QuantPlan(DEFAULT_OP_TYPES), images)
    assert ranking[0].node == broken, ranking
    stem_score = next(r.degradation_db for r in ranking if r.node == stem)
    assert ranking[0].degradation_db > stem_score + 20
