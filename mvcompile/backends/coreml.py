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
evaluator (:mod:`.mil_eval`) elsewhere. Tolerances, as max|Δ| / max(1, max|y_onnx|):
1e-3 (fp32), 1e-2 (fp16); for W8A8 the reference is the QDQ graph run in float (ORT without
graph optimizations), allowed 5e-2 (fp32) and 0.25 (fp16) for rounding flips; weight-only is
compared with the graph without activation Q/DQ at the float tolerances.
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
# W8A8: rounding flips against ORT's float QDQ; in fp16 the activations are rounded to fp16
# before each quantize, which flips many more (XXS, random weights: 7.6e-3 fp32, 0.11 fp16).
INT8_TOLERANCE = {"fp32": 5e-2, "fp16": 0.25}
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
    """How the program's outputs compared with ONNX Runtime's."""

    method: str  # "MLModel.predict" or "NumPy MIL evaluator"
    max_abs_diff: float
    relative_diff: float
    tolerance: float


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
    """Compare Core ML outputs with ONNX Runtime's; :class:`UserError` if they differ."""
    reference, quantized = reference_model(proto, options.int8_mode)
    level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # QDQ in float, not fused int kernels
    so = ort.SessionOptions()
    so.graph_optimization_level = level
    so.log_severity_level = 3  # the stripped weight-only reference leaves unused initializers
    session = ort.InferenceSession(reference.SerializeToString(), so,
                                   providers=["CPUExecutionProvider"])
    tolerance = (INT8_TOLERANCE if quantized else TOLERANCE)[options.precision]
    worst = (0.0, 0.0)
    for feed in random_images(proto, options.batch or 1):
        expected = session.run(None, feed)
        actual = run_coreml(mlmodel, feed, options)
        for out, want in zip(session.get_outputs(), expected, strict=True):
            got = _as_shape(actual[mil_lower.sanitize(out.name)], want.shape, out.name)
            diff = float(np.max(np.abs(got.astype(np.float64) - want)))
            rel = diff / max(1.0, float(np.max(np.abs(want))))
            worst = max(worst, (rel, diff))
    check = CoreMLCheck("MLModel.predict" if ON_MAC else "NumPy MIL evaluator",
                        worst[1], worst[0], tolerance)
    if not check.relative_diff <= tolerance:
        raise UserError(f"The Core ML program does not match ONNX Runtime "
                        f"({check.method}): max abs diff {check.max_abs_diff:.3g}, relative "
                        f"{check.relative_diff:.3g} > {tolerance:g}. Nothing was written.")
    return check


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
        log.info("Core ML matches ONNX Runtime (%s): max abs diff %.3g", result.method,
                 result.max_abs_diff)
    with _output.staging_dir(out_path, "Core ML package") as stage:
        staged = stage / out_path.name
        mlmodel.save(str(staged))
        return _output.publish(staged, out_path, "Core ML package")
