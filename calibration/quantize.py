"""The INT8 driver: calibrate, insert QDQ, and (optionally) keep sensitive layers in float.

Phases, in order:

1. plan: which activations need ranges (:func:`.qdq.plan_tensors`);
2. observe: run the calibration images, one observer per tensor (:func:`.collect.collect_ranges`);
3. rewrite: insert QDQ with the ranges (:func:`.qdq.insert_qdq`);
4. budget (only with ``accuracy_budget``): while top-1 disagreement with FP32 on the calibration
   images exceeds the budget, keep the most sensitive remaining layer in float
   (:mod:`.sensitivity`) and rewrite again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

import onnx_ir as ir
from onnx_ir.passes.common import NameFixPass, RemoveUnusedNodesPass, ShapeInferencePass

from mvcompile import metrics, stages
from mvcompile.calibration import sensitivity
from mvcompile.calibration.collect import Range, collect_ranges
from mvcompile.calibration.data import ImageSet
from mvcompile.calibration.qdq import (
    QuantPlan,
    can_stay_float,
    insert_qdq,
    overflowing_biases,
    plan_tensors,
)
from mvcompile.calibration.registry import DEFAULT_OP_TYPES

log = logging.getLogger(__name__)

MAX_FLOAT_FRACTION = 0.25  # the budget loop never keeps more than this share of layers in float


@dataclass(frozen=True)
class QuantizeOptions:
    """``--calib-method``, the quantized op types, activation format, and accuracy budget."""

    method: str = "percentile"
    op_types: frozenset[str] = DEFAULT_OP_TYPES
    activation_dtype: str = "uint8"
    accuracy_budget: float | None = None  # max top-1 disagreement with FP32, in percent
    keep_float: frozenset[str] = frozenset()
    # 7 avoids the int16 saturation of x86 u8·s8 kernels without VNNI (qparams.REDUCED_QMAX);
    # 8 elsewhere. `mvcompile build` picks it per CPU (machine.auto_weight_bits).
    weight_bits: int = 7
    # Compare FP32 and INT8 logits on the calibration set for the report; off when the caller
    # evaluates the finished models itself (mvcompile build does).
    report_accuracy: bool = True


@dataclass
class QuantizeReport:
    """What quantization did, for report.json and the CLI summary."""

    method: str
    activation_dtype: str
    weight_bits: int
    op_types: list[str]
    counts: dict[str, int]
    kept_float: list[dict[str, str]] = field(default_factory=list)
    calibration: str = ""
    calibration_agreement: float | None = None
    calibration_sqnr_db: float | None = None
    budget_met: bool | None = None  # None when no --accuracy-budget was given
    budget_disagreement: float | None = None  # the least reached, when the budget was not met
    # Matrix ops left in float, by op type, other than those in kept_float: contrib ops the QDQ
    # rewrite does not handle (ORT has no integer kernel for FusedMatMul's transposed operands).
    float_matrix_ops: dict[str, int] = field(default_factory=dict)


def quantize(model: ir.Model, images: ImageSet, options: QuantizeOptions,
             on_batch: Callable[[int], None] | None = None) -> tuple[ir.Model, QuantizeReport]:
    """Return an INT8 (QDQ) copy of ``model`` and a report; ``model`` is not modified.
    ``on_batch`` is told of each calibration batch; the accuracy-budget search announces its
    steps through :mod:`mvcompile.stages`."""
    model = model.clone()
    NameFixPass()(model)  # keep-float decisions and reports refer to node names
    ShapeInferencePass()(model)  # element types: only float32 nodes are quantized
    _check_keep_float(model, options.keep_float)
    plan = QuantPlan(frozenset(options.op_types), set(options.keep_float),
                     options.activation_dtype, 2 ** (options.weight_bits - 1) - 1)
    names = [v.name for v in plan_tensors(model.graph, QuantPlan(plan.op_types))]
    ranges = collect_ranges(model, names, images.batches(), options.method, on_batch)
    kept = [{"node": n, "reason": "requested"} for n in sorted(plan.keep_float)]
    for name in overflowing_biases(model.graph, ranges, plan):
        log.warning("%s stays float: its bias exceeds int32 at scale s_x·s_w", name)
        plan.keep_float.add(name)
        kept.append({"node": name, "reason": "its bias exceeds int32 at scale s_x·s_w "
                                             "(a tiny input range with large biases)"})
    quantized, counts = _rewrite(model, ranges, plan)
    report = QuantizeReport(options.method, options.activation_dtype, options.weight_bits,
                            sorted(plan.op_types),
                            counts, calibration=images.description)
    report.kept_float = kept
    if options.accuracy_budget is not None:
        quantized = _meet_budget(model, quantized, ranges, plan, images, options, report)
    report.float_matrix_ops = float_matrix_ops(quantized, exclude=plan.keep_float)
    if not options.report_accuracy:
        return quantized, report
    fp32_logits = sensitivity.logits(model, images)
    int8_logits = sensitivity.logits(quantized, images)
    report.calibration_agreement = metrics.top1_agreement(fp32_logits, int8_logits)
    report.calibration_sqnr_db = metrics.sqnr_db(fp32_logits, int8_logits)
    return quantized, report


def _check_keep_float(model: ir.Model, names: Collection[str]) -> None:
    """ValueError for a requested float node that is missing or cannot stay float."""
    nodes = {node.name: node for node in model.graph}
    for name in sorted(names):
        if name not in nodes:
            raise ValueError(f"keep_float: no node named {name!r}")
        if not can_stay_float(nodes[name]):
            raise ValueError(f"keep_float: {name!r} ({nodes[name].op_type}) cannot stay float "
                             "among quantized nodes; only a Conv, Gemm or MatMul with a "
                             "constant weight can")


MATRIX_OPS = frozenset({"Conv", "MatMul", "Gemm", "FusedMatMul", "Attention", "Einsum"})


def float_matrix_ops(model: ir.Model, exclude: Collection[str] = ()) -> dict[str, int]:
    """{op type: count} of matrix ops whose two operands are not both dequantized: ONNX
    Runtime runs those in float (an integer kernel needs DQ on both). Nodes named in
    ``exclude`` (kept in float on purpose, reported as such) are not counted."""
    counts: dict[str, int] = {}
    for node in model.graph:
        if node.op_type in MATRIX_OPS and node.name not in exclude and not all(
                value is not None and value.producer() is not None
                and value.producer().op_type == "DequantizeLinear"
                for value in node.inputs[:2]):
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items()))


def _rewrite(model: ir.Model, ranges: dict[str, Range], plan: QuantPlan
             ) -> tuple[ir.Model, dict[str, int]]:
    quantized = model.clone()
    counts = insert_qdq(quantized, ranges, plan)
    RemoveUnusedNodesPass()(quantized)  # drops the float weights the DQs replaced
    return quantized, counts


def _meet_budget(model: ir.Model, quantized: ir.Model, ranges: dict[str, Range],
                 plan: QuantPlan, images: ImageSet, options: QuantizeOptions,
                 report: QuantizeReport) -> ir.Model:
    """Greedily keep the most sensitive layer in float until disagreement ≤ budget, at most
    :data:`MAX_FLOAT_FRACTION` of the quantized layers. If the budget is not met, the state
    with the least disagreement (and, among those, the fewest float layers) is returned, so
    layers that did not help are quantized again."""
    budget = options.accuracy_budget / 100.0
    fp32_logits = sensitivity.logits(model, images)
    limit = max(1, int(MAX_FLOAT_FRACTION * report.counts["nodes"]))
    requested = len(report.kept_float)
    stages.start("Accuracy budget: keeping layers in float", limit)

    def disagreement() -> float:
        return 1.0 - metrics.top1_agreement(fp32_logits, sensitivity.logits(quantized, images))

    current = disagreement()
    best = (current, requested, quantized, report.counts)
    while current > budget and len(report.kept_float) - requested < limit:
        ranking = sensitivity.rank_layers(model, quantized, plan, images)
        if not ranking:
            break
        worst = ranking[0]
        plan.keep_float.add(worst.node)
        report.kept_float.append({"node": worst.node, "reason": (
            f"most sensitive: keeping it in float wins back {worst.degradation_db:.1f} dB "
            "of SQNR where the next layer reads it; "
            f"disagreement was {100 * current:.1f}% > budget {options.accuracy_budget}%")})
        quantized, report.counts = _rewrite(model, ranges, plan)
        current = disagreement()
        if current < best[0]:
            best = (current, len(report.kept_float), quantized, report.counts)
        stages.advance()
    report.budget_met = current <= budget
    if not report.budget_met:
        current, kept, quantized, report.counts = best
        for dropped in report.kept_float[kept:]:
            plan.keep_float.discard(dropped["node"])
        del report.kept_float[kept:]
        report.budget_disagreement = current
        log.warning("Accuracy budget not met: %.1f%% disagreement at best, with %d layers in "
                    "float.", 100 * current, len(report.kept_float))
    return quantized
