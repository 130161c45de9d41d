"""The ``--int8`` part of ``mvcompile build``: calibration data → QDQ model → accuracy report."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import onnx
import onnx_ir as ir
import onnxruntime as ort

from mvcompile import machine, onnx_io, stages
from mvcompile.calibration.data import ImageSet, load_images, probe_images
from mvcompile.calibration.quantize import (
    MAX_FLOAT_FRACTION,
    QuantizeOptions,
    QuantizeReport,
    quantize,
)
from mvcompile.errors import UserError
from mvcompile.evaluate import (
    accuracy_report,
    model_class_names,
    open_session,
    predict,
    source_noun,
    with_label_note,
)

if TYPE_CHECKING:
    from mvcompile.builder import BuildOptions, Progress

log = logging.getLogger(__name__)

# The graph form that quantizes fastest on ONNX Runtime (measured; see README, "Measured results").
INT8_PIPELINE = "int8"


def build_int8(plain: ir.Model, fp32: onnx.ModelProto, options: BuildOptions,
               progress: Progress) -> tuple[onnx.ModelProto, dict]:
    """Quantize the compiled graph; report calibration and (optional) eval accuracy."""
    source, pass_report = int8_source(plain, options.passes)
    calibration = _images(options.calib_data, options, progress, options.calib_size, "train")
    if options.eval_data is not None:
        # A probe before calibrating, so that unusable eval data (a wrong path or array, an
        # empty folder, more images than memory holds) fails the build at once rather than
        # after minutes of calibration and of the --accuracy-budget search; all of it is read
        # after, not held meanwhile.
        probe_images(options.eval_data, options.resolution, "val", remedy=(
            "Build without --eval-data, then evaluate on an evenly spread subset with "
            "`mvcompile eval MODEL --data DATA --limit {fits}`."))
    if calibration.skipped:
        log.warning("Skipped %d non-image files in %s", len(calibration.skipped),
                    options.calib_data)
    if len(calibration.pixels) < options.calib_size:
        log.warning("--calib-size %d asks for more images than %s has; calibrating on all %d",
                    options.calib_size, options.calib_data or "the bundled photos",
                    len(calibration.pixels))
    weight_bits, weight_bits_why = _weight_bits(options.weight_bits)
    progress.start("Calibrating", len(calibration.pixels))
    quantize_options = QuantizeOptions(method=options.calib_method,
                                       accuracy_budget=options.accuracy_budget,
                                       weight_bits=weight_bits,
                                       report_accuracy=False)
    with stages.reporting_to(progress):  # the accuracy-budget search, if any, reports too
        int8, qreport = quantize(source, calibration, quantize_options, progress.advance)
    if qreport.budget_met is False:
        raise UserError(_budget_missed(qreport, options.accuracy_budget, len(calibration.pixels)))
    int8_proto = onnx_io.to_proto(int8)
    pair = _Pair(open_session(fp32.SerializeToString(), "the FP32 model"),
                 open_session(int8_proto.SerializeToString(), "the INT8 model"),
                 model_class_names(fp32))
    on_calibration = _compare(pair, calibration, progress, options.calib_data)
    qreport.calibration_agreement = on_calibration["top1_agreement"]
    qreport.calibration_sqnr_db = on_calibration["sqnr_db"]
    report = {"passes": pass_report,
              "quantization": {**asdict(qreport), "weight_bits_why": weight_bits_why},
              "calibration_skipped": calibration.skipped,
              "accuracy": {"calibration": on_calibration}}
    if options.eval_data is not None:
        images = _images(options.eval_data, options, progress, None, "val")
        report["accuracy"]["eval"] = _compare(pair, images, progress, options.eval_data)
    return int8_proto, report


def _weight_bits(requested: int | str | None) -> tuple[int, str]:
    """``--weight-bits``: as given, or (None or "auto") chosen for this CPU by
    :func:`mvcompile.machine.auto_weight_bits`; with the reason for the report."""
    if requested not in (None, "auto"):
        return int(requested), "as requested"
    bits, why = machine.auto_weight_bits(machine.cpu_summary())
    log.info("%d-bit weights (%s)", bits, why)
    return bits, why


def _budget_missed(qreport: QuantizeReport, budget: float, images: int) -> str:
    """Why --accuracy-budget failed, and what to change."""
    return (f"--accuracy-budget {budget:g}% was not met: the least top-1 disagreement with FP32 "
            f"on the {images} calibration images was {100 * qreport.budget_disagreement:.1f}%, "
            f"with {len(qreport.kept_float)} layers kept in float (the search keeps at most "
            f"{MAX_FLOAT_FRACTION:.0%} of the quantized layers; each image is "
            f"{100 / images:.1f}% of the agreement). Nothing was written. Allow a larger budget, "
            "or calibrate on more images (--calib-size, --calib-data).")


def int8_source(plain: ir.Model, passes: bool) -> tuple[ir.Model, dict | None]:
    """The graph that gets quantized, the plain graph through :data:`INT8_PIPELINE`, and the
    pipeline's report."""
    from mvcompile.builder import compile_graph

    return compile_graph(plain, INT8_PIPELINE, passes)


def _images(source: str | None, options: BuildOptions, progress: Progress,
            limit: int | None, split: str) -> ImageSet:
    """Calibration uses the training split of ``digits``, evaluation its validation split."""
    progress.start(f"Loading images from {source or 'bundled photos'}", limit or 0)
    images = load_images(source, options.resolution, limit, on_image=progress.advance,
                         split=split)
    progress.finish()
    return images


@dataclass(frozen=True)
class _Pair:
    """The FP32 and INT8 models, each opened once for every accuracy comparison."""

    fp32: ort.InferenceSession
    int8: ort.InferenceSession
    class_names: list[str] | None  # the FP32 model's (the INT8 model has the same)


def _compare(pair: _Pair, images: ImageSet, progress: Progress, data: str | None) -> dict:
    progress.start(f"Evaluating on {images.description}", 2 * len(images.pixels))
    fp32_logits = predict(pair.fp32, images, on_batch=progress.advance)
    int8_logits = predict(pair.int8, images, on_batch=progress.advance)
    progress.finish()
    if not data:  # the bundled photos: no labels, and none expected
        return accuracy_report(images, fp32_logits, int8_logits, source="the photos",
                               model_classes=pair.class_names)
    report = accuracy_report(images, fp32_logits, int8_logits, source=source_noun(data),
                             model_classes=pair.class_names)
    return with_label_note(report, images, data)
