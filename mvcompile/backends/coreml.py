"""Core ML: our ONNX graph → MIL program (:mod:`.mil_lower`) → ``.mlpackage`` (ML Program).

Inputs and outputs of the package (``describe_io`` returns them for reports):

- ``pixel_values``: with ``input_type="image"`` an RGB image of the model's resolution (Core ML
  ``ImageType``; the program scales it by 1/255, MobileViT's preprocessing: RGB in [0, 1], no
  mean/std); with ``input_type="tensor"`` a float32 MultiArray [batch, 3, H, W] already in
  [0, 1], exactly the ONNX model's input.
- ``logits``: float32 MultiArray [batch, classes]. Names are the ONNX names, with characters
  other than letters, digits and '_' replaced by '_'.

Precision ``fp16`` (the default, what Apple ships) or ``fp32``. INT8 QDQ graphs lower as W8A8
(iOS17) or weight-only int8 (iOS16), see :mod:`.mil_quant`.

Before writing, the program is checked: every tensor has rank ≤ 5, and its outputs are compared
with ONNX Runtime on random images: with ``MLModel.predict`` on macOS, with the NumPy MIL
evaluator (:mod:`.mil_eval`) elsewhere. Float programs (and weight-only int8, compared with the
graph without activation Q/DQ) must match to max|Δ| / max(1, max|y_onnx|) ≤ 1e-3 (fp32) or 1e-2
(fp16). W8A8 programs are compared with the QDQ graph run in float (ORT without graph
optimizations) by the signal-to-noise ratio of each output row, see :func:`verify`.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import logging
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import coremltools as ct
import numpy as np
import onnx
import onnxruntime as ort
from coremltools.converters.mil.mil import Program
from coremltools.converters.mil.mil.passes import pass_pipeline

from mvcompile.backends import _output, mil_eval, mil_lower
from mvcompile.backends.qdq_reference import reference_model
from mvcompile.errors import UserError

log = logging.getLogger(__name__)

PRECISIONS = {"fp16": ct.precision.FLOAT16, "fp32": ct.precision.FLOAT32}
INPUT_TYPES = ("image", "tensor")
TOLERANCE = {"fp32": 1e-3, "fp16": 1e-2}
# W8A8: the least SQNR (dB) of each output row against ORT's float QDQ, see verify(). Measured
# on XXS 64x64 W8A8 with random weights (seeds 0-5, 4 images each), correct programs: ≥ 25 dB
# (fp32), ≥ 15.9 dB (fp16); lowering bugs (transposed weight, dropped op, scale x2): ≤ 12.6 dB.
INT8_MIN_SQNR_DB = {"fp32": 20.0, "fp16": 12.0}
IMAGE_SCALE = 1.0 / 255.0
ON_MAC = sys.platform == "darwin"


@dataclass(frozen=True)
class CoreMLOptions:
    """``--coreml-precision``, ``--coreml-int8``, ``--coreml-input`` and ``--coreml-batch``."""

    precision: str = "fp16"
    int8_mode: str = "w8a8"
    input_type: str = "image"
    batch: int | None = 1

    def validate(self) -> None:
        if self.precision not in PRECISIONS:
            raise UserError(f"--coreml-precision must be fp16 or fp32, not {self.precision!r}.")
        if self.input_type not in INPUT_TYPES:
            raise UserError(f"--coreml-input must be image or tensor, not {self.input_type!r}.")
        if self.int8_mode not in mil_lower.INT8_MODES:
            raise UserError(f"--coreml-int8 must be one of {', '.join(mil_lower.INT8_MODES)}, "
                            f"not {self.int8_mode!r}.")
        if self.batch is not None and self.batch < 1:
            raise UserError(f"{mil_lower.BATCH_FLAG} must be at least 1, got {self.batch}.")


@dataclass(frozen=True)
class CoreMLCheck:
    """How the program's outputs compared with ONNX Runtime's (worst over outputs and rows)."""

    method: str  # "MLModel.predict" or "NumPy MIL evaluator"
    max_abs_diff: float
    relative_diff: float  # max|Δ| / max(1, max|y_onnx|)
    tolerance: float  # for relative_diff (the float criterion)
    sqnr_db: float  # least per-row SQNR of the Core ML outputs against ORT's (inf: identical)
    min_sqnr_db: float | None = None  # the W8A8 criterion; None for float programs


def convert(onnx_proto: onnx.ModelProto, options: CoreMLOptions) -> ct.models.MLModel:
    """Lower and convert (in memory); the MIL program after coremltools' passes is
    ``mlmodel._mil_program``."""
    options.validate()
    program = mil_lower.lower(onnx_proto, options.batch, options.int8_mode)
    inputs = _input_types(onnx_proto, program, options)
    try:
        with _quiet_pass_bars():
            mlmodel = ct.convert(program, convert_to="mlprogram", inputs=inputs,
                                 minimum_deployment_target=mil_lower.deployment_target(
                                     onnx_proto.graph, options.int8_mode),
                                 compute_precision=PRECISIONS[options.precision],
                                 skip_model_load=not ON_MAC)
    except (ValueError, TypeError, NotImplementedError) as err:
        raise UserError(f"coremltools could not convert the lowered program: {err}") from err
    _describe(mlmodel, onnx_proto, options)
    return mlmodel


@contextlib.contextmanager
def _quiet_pass_bars() -> Iterator[None]:
    """Hide the tqdm bar that coremltools draws for each of its MIL pass pipelines (three per
    model) unless this module logs at INFO: the CLI already shows a bar for the lowering."""
    bar = getattr(pass_pipeline, "tqdm", None)  # coremltools 9 imports it here
    if bar is None or log.isEnabledFor(logging.INFO):
        yield
        return
    pass_pipeline.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        pass_pipeline.tqdm = bar


def _input_types(proto: onnx.ModelProto, program: Program, options: CoreMLOptions
                 ) -> list[ct.ImageType] | None:
    if options.input_type == "tensor":
        return None
    (name, var), *rest = program.functions["main"].inputs.items()
    if rest or var.rank != 4 or var.shape[1] != 3:
        raise UserError("--coreml-input image needs one input of shape [1, 3, H, W] (an RGB "
                        f"image); this model has {len(rest) + 1} input(s), the first of shape "
                        f"{list(var.shape)}. Use --coreml-input tensor.")
    if var.shape[0] != 1:
        raise UserError(f"--coreml-input image takes one image per prediction, but "
                        f"{mil_lower.BATCH_FLAG} is {var.shape[0]}. Use --coreml-batch 1 or "
                        "--coreml-input tensor.")
    return [ct.ImageType(name=name, shape=tuple(var.shape), scale=IMAGE_SCALE,
                         bias=[0.0, 0.0, 0.0], color_layout=ct.colorlayout.RGB)]


def _describe(mlmodel: ct.models.MLModel, proto: onnx.ModelProto, options: CoreMLOptions
              ) -> None:
    meta = {p.key: p.value for p in proto.metadata_props}
    weights = f"int8 {options.int8_mode}" if is_quantized(proto) else "float"
    mlmodel.short_description = (f"MobileViT lowered by mvcompile from ONNX "
                                 f"({options.precision}, {weights})")
    for io in describe_io(mlmodel):
        text = f"{io['kind']} {io['shape']}"
        if io["role"] == "input":
            text += (": RGB image, scaled by 1/255 inside the model" if io["kind"] == "image"
                     else ": RGB, NCHW, float32 in [0, 1] (no mean/std)")
            mlmodel.input_description[io["name"]] = text
        else:
            mlmodel.output_description[io["name"]] = text + ": class logits"
    mlmodel.user_defined_metadata.update({k: v for k, v in meta.items()
                                          if k.startswith("mvcompile.")})
    mlmodel.user_defined_metadata["mvcompile.coreml"] = (
        f"precision={options.precision} int8_mode={options.int8_mode} "
        f"input={options.input_type}")


def describe_io(mlmodel: ct.models.MLModel) -> list[dict]:
    """Name, role, kind (image/multiarray) and shape of every input and output."""
    spec = mlmodel.get_spec().description
    rows = []
    for role, features in (("input", spec.input), ("output", spec.output)):
        for feature in features:
            kind = feature.type.WhichOneof("Type")
            if kind == "imageType":
                shape = [1, 3, feature.type.imageType.height, feature.type.imageType.width]
                rows.append({"name": feature.name, "role": role, "kind": "image",
                             "shape": shape})
            else:
                rows.append({"name": feature.name, "role": role, "kind": "multiarray",
                             "shape": list(feature.type.multiArrayType.shape)})
    return rows


def is_quantized(proto: onnx.ModelProto) -> bool:
    return any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in proto.graph.node)


def program_summary(program: Program) -> dict:
    """Op histogram and the largest tensor rank of a MIL program's main function."""
    ops = program.functions["main"].operations
    ranks = [v.rank for op in ops for v in op.outputs if hasattr(v, "rank")]
    return {"ops": dict(collections.Counter(op.op_type for op in ops).most_common()),
            "max_rank": max(ranks, default=0)}


def random_images(proto: onnx.ModelProto, batch: int, count: int = 2, seed: int = 0
                  ) -> list[dict[str, np.ndarray]]:
    """Feeds of random 8-bit RGB images as floats k/255 (exact for image and tensor inputs)."""
    shapes = mil_lower.input_shapes(proto.graph, batch)
    rng = np.random.default_rng(seed)
    return [{name: (rng.integers(0, 256, shape) / 255.0).astype(np.float32)
             for name, shape in shapes.items()} for _ in range(count)]


def run_coreml(mlmodel: ct.models.MLModel, feed: dict[str, np.ndarray],
               options: CoreMLOptions) -> dict[str, np.ndarray]:
    """The Core ML outputs for ``feed`` (pixels in [0, 1], ONNX input names): predict on
    macOS, the NumPy MIL evaluator elsewhere."""
    names = {name: mil_lower.sanitize(name) for name in feed}
    if options.input_type == "image":
        feed = {k: v * 255.0 for k, v in feed.items()}
    if ON_MAC:
        from PIL import Image

        inputs = {names[k]: Image.fromarray(np.round(v[0].transpose(1, 2, 0)).astype(np.uint8))
                  if options.input_type == "image" else v for k, v in feed.items()}
        return {k: np.asarray(v) for k, v in mlmodel.predict(inputs).items()}
    return mil_eval.evaluate(mlmodel._mil_program, {names[k]: v for k, v in feed.items()})


def _as_shape(got: np.ndarray, want: tuple[int, ...], name: str) -> np.ndarray:
    """``got`` in ONNX Runtime's shape ``want`` when the two differ only in size-1 dims
    (Core ML may drop or add them); a UserError when the lowering computed another shape."""
    if [d for d in got.shape if d != 1] != [d for d in want if d != 1]:
        raise UserError(f"The Core ML program's output {name} has shape {list(got.shape)}, "
                        f"ONNX Runtime's {list(want)}: the lowering is wrong for this model. "
                        "Nothing was written; please report this with the model.")
    return got.reshape(want)


def verify(mlmodel: ct.models.MLModel, proto: onnx.ModelProto, options: CoreMLOptions
           ) -> CoreMLCheck:
    """Compare Core ML outputs with ONNX Runtime's on random images; :class:`UserError` if they
    differ.

    Let y be ONNX Runtime's output, ŷ the Core ML program's, Δ = ŷ − y.

    - Float programs, and weight-only int8 (against the graph without activation Q/DQ): over
      every output and image, max|Δ| ≤ τ·max(1, max|y|), τ = 1e-3 (fp32) or 1e-2 (fp16).
    - W8A8, against the QDQ graph run in float: each row r of each output (one image of the
      batch; the whole tensor for an output without a batch dim) either passes the float test
      above, or has SQNR_r = 10·log10(Σ y_r² / Σ Δ_r²) ≥ S dB, S = 20 (fp32) or 12 (fp16).

    Why not max|Δ| for W8A8: an INT8 network is a discontinuous function of its input. Core ML
    (or the NumPy evaluator) orders float operations differently from ORT, so an activation that
    sits on a rounding tie (x/s = k + ½ up to one ulp) quantizes one step apart, and the
    downstream quantizers turn that step into a cascade of flips: a correct program then moves
    most logits of that image by a share of the activation quantization noise (measured: up to
    max|Δ|/max|y| = 0.07, SQNR ≥ 25 dB in fp32; in fp16, where every value is rounded to
    float16 before it is quantized, SQNR ≥ 15.9 dB). A fixed max|Δ| bound at that level refuses
    correct programs on some images, and a bound loose enough never to do so accepts far more
    than rounding. SQNR measures the error's energy against the logits' own, so it does not
    depend on their scale. A lowering bug (a wrong scale or zero point, a transposed weight, a
    dropped op) changes the function itself: it moves the logits of every image, measured at
    −1 to 12.6 dB. S = 20 dB (error RMS ≤ 10 % of the logits' RMS) leaves ≥ 5 dB of margin on
    each side in fp32; S = 12 dB (25 %) in fp16 is about the former bound max|Δ|/max|y| ≤ 0.25
    for errors spread over the logits, and stays loose because Core ML's own fp16 kernels
    round more than the evaluator. Subtle bugs (a zero point off by one step in one tensor) are
    as small as a rounding cascade and are not caught by any output-level check. Top-1
    agreement is not required: random-weight logits are near-tied, and correct fp16 programs
    change the top-1 class of some images.
    """
    reference, quantized = reference_model(proto, options.int8_mode)
    level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # QDQ in float, not fused int kernels
    so = ort.SessionOptions()
    so.graph_optimization_level = level
    so.log_severity_level = 3  # the stripped weight-only reference leaves unused initializers
    session = ort.InferenceSession(reference.SerializeToString(), so,
                                   providers=["CPUExecutionProvider"])
    tolerance = TOLERANCE[options.precision]
    min_sqnr = INT8_MIN_SQNR_DB[options.precision] if quantized else None
    method = "MLModel.predict" if ON_MAC else "NumPy MIL evaluator"
    rows: list[tuple[float, float, float, str]] = []  # (relative, max|Δ|, SQNR, where)
    for index, feed in enumerate(random_images(proto, options.batch or 1)):
        expected = session.run(None, feed)
        actual = run_coreml(mlmodel, feed, options)
        for out, want in zip(session.get_outputs(), expected, strict=True):
            got = _as_shape(actual[mil_lower.sanitize(out.name)], want.shape, out.name)
            pairs = (list(zip(want, got, strict=True)) if want.ndim > 1 and len(want) > 1
                     else [(want, got)])
            for row, (y, y_hat) in enumerate(pairs):
                y, y_hat = y.astype(np.float64), y_hat.astype(np.float64)
                where = f"output {out.name!r}, image {index}" + (
                    f", batch row {row}" if len(pairs) > 1 else "")
                rows.append((*_max_abs(y, y_hat), _sqnr_db(y, y_hat), where))
    worst = max(rows, key=lambda r: _nan_high(r[0]))
    check = CoreMLCheck(method, worst[1], worst[0], tolerance,
                        min((r[2] for r in rows), key=_nan_low), min_sqnr)
    off = [r for r in rows if not r[0] <= tolerance]  # fail the float test (NaN included)
    if min_sqnr is None and off:
        raise UserError(f"The Core ML program does not match ONNX Runtime ({method}): max abs "
                        f"diff {worst[1]:.3g}, relative {worst[0]:.3g} > {tolerance:g} (the "
                        f"float tolerance, max|Δ| / max(1, max|y|), at {worst[3]}). "
                        "Nothing was written.")
    noisy = [r for r in off if min_sqnr is not None and not r[2] >= min_sqnr]
    if noisy:
        bad = min(noisy, key=lambda r: _nan_low(r[2]))
        raise UserError(f"The INT8 Core ML program does not match ONNX Runtime's QDQ model "
                        f"({method}): SQNR {bad[2]:.1f} dB at {bad[3]} < {min_sqnr:g} dB (the "
                        f"W8A8 {options.precision} criterion, 10·log10 Σy² / Σ(ŷ−y)²; max abs "
                        f"diff {bad[1]:.3g}, relative {bad[0]:.3g}): more than rounding flips. "
                        "Nothing was written.")
    return check


def _nan_high(value: float) -> float:
    """``value`` with NaN as +inf, to rank a NaN difference as the worst."""
    return np.inf if np.isnan(value) else value


def _nan_low(value: float) -> float:
    """``value`` with NaN as −inf, to rank a NaN SQNR as the worst."""
    return -np.inf if np.isnan(value) else value


def _max_abs(want: np.ndarray, got: np.ndarray) -> tuple[float, float]:
    """max|Δ| and max|Δ| / max(1, max|y|) (NaN in either gives NaN, which fails)."""
    if not want.size:
        return 0.0, 0.0
    diff = float(np.max(np.abs(got - want)))
    return diff, diff / max(1.0, float(np.max(np.abs(want))))


def _sqnr_db(want: np.ndarray, got: np.ndarray) -> float:
    """10·log10(Σ y² / Σ (ŷ − y)²): inf when identical, −inf when y is all zero and ŷ is not,
    NaN when ŷ holds NaN."""
    noise = float(np.sum((got - want) ** 2))
    signal = float(np.sum(want ** 2))
    if noise == 0.0:
        return np.inf
    if np.isnan(noise):
        return np.nan
    return -np.inf if signal == 0.0 else 10.0 * float(np.log10(signal / noise))


def write_coreml(onnx_proto: onnx.ModelProto, out_path: str | Path, precision: str = "fp16",
                 int8_mode: str = "w8a8", input_type: str = "image", batch: int | None = 1,
                 check: bool = True) -> Path:
    """Lower ``onnx_proto`` to ``out_path`` (a ``.mlpackage``), verified before it is written.

    Raises :class:`UserError` for an op with no lowering (all listed), a dynamic dimension
    Core ML needs fixed (``batch=None`` with a dynamic batch; names ``--coreml-batch``), a bad
    option, an output that does not match ONNX Runtime, or an unwritable ``out_path``.
    """
    out_path = Path(out_path)
    options = CoreMLOptions(precision, int8_mode, input_type, batch)
    if out_path.suffix != ".mlpackage":
        raise UserError(f"The Core ML output must end in .mlpackage (an ML Program package), "
                        f"got {out_path}.")
    if out_path.exists() and not out_path.is_dir():
        raise UserError(f"Cannot write the Core ML package to {out_path}: it is a file.")
    _output.check_writable_dir(out_path.parent, "Core ML package")
    mlmodel = convert(onnx_proto, options)
    summary = program_summary(mlmodel._mil_program)
    if summary["max_rank"] > mil_lower.MAX_RANK:
        raise UserError(f"The Core ML program has a tensor of rank {summary['max_rank']}; "
                        f"Core ML allows at most {mil_lower.MAX_RANK}. Nothing was written.")
    if check:
        result = verify(mlmodel, onnx_proto, options)
        log.info("Core ML matches ONNX Runtime (%s): max abs diff %.3g, least SQNR %.1f dB",
                 result.method, result.max_abs_diff, result.sqnr_db)
    with _output.staging_dir(out_path, "Core ML package") as stage:
        staged = stage / out_path.name
        mlmodel.save(str(staged))
        return _output.publish(staged, out_path, "Core ML package")
