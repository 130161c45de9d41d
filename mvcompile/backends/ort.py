"""ONNX Runtime mobile: the ``.ort`` format plus the operator configs for a reduced-op build.

Two optimization styles (``onnxruntime.tools.convert_onnx_models_to_ort``):

- ``fixed``: graph optimizations applied at conversion time, for the CPU and XNNPACK execution
  providers (what runs on any phone).
- ``runtime``: only basic optimizations are applied; the rest are saved as records and replayed
  when the session loads with the NNAPI or Core ML execution provider (which must see the
  unfused graph to claim nodes).

Beside the model go ``required_operators.config`` (op types per opset) and
``required_operators_and_types.config`` (also the element types each kernel needs), the inputs
of ORT's ``build.py --minimal_build --include_ops_by_config`` (with ``--enable_reduced_operator_
type_support`` for the second).

Before anything is written the ``.ort`` file is loaded by onnxruntime here and its outputs are
compared with the ``.onnx`` model's on the same random inputs:
``max|y_ort − y_onnx| ≤ 1e-5·max(1, max|y_onnx|)`` for float outputs, and for an INT8 (QDQ) model
at most one quantization step ``s`` of the DequantizeLinear that produces the output.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from mvcompile import latency
from mvcompile.backends import _output
from mvcompile.errors import UserError

log = logging.getLogger(__name__)

# onnxruntime.tools imports torch when present, so the converter is imported only when used.
STYLES = ("fixed", "runtime")
# Which style each execution provider wants (the --ort-style default is "fixed").
STYLE_FOR_EP = {"cpu": "fixed", "xnnpack": "fixed", "nnapi": "runtime", "coreml": "runtime"}
FLOAT_TOLERANCE = 1e-5
REFERENCE_LEVEL = {"fixed": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                   "runtime": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC}


@dataclass(frozen=True)
class OrtCheck:
    """The verification of one ``.ort`` file against its ``.onnx`` source."""

    max_abs_diff: float
    tolerance: float


def write_ort(onnx_proto: onnx.ModelProto, out_dir: str | Path, style: str = "fixed",
              name: str = "model", target_platform: str = "arm",
              final_dir: str | Path | None = None) -> list[Path]:
    """Convert ``onnx_proto`` to ``OUT_DIR/NAME[.with_runtime_opt].ort`` plus its two operator
    configs, verify the ``.ort``, then write. Returns the written paths, ``.ort`` first.

    ``target_platform`` "arm" lets the optimizer keep int8 QDQ forms that ARM kernels prefer
    (phones); "amd64" targets x86. ``final_dir`` is the folder the configs' headers name as
    the model's home, for a caller that stages ``out_dir`` and moves the files on (default
    ``out_dir``). Raises :class:`UserError` for an unknown style, a model
    onnxruntime cannot convert, an output that does not match, or an unwritable ``out_dir``.
    """
    if style not in STYLES:
        raise UserError(f"Unknown ORT optimization style {style!r}: choose fixed (CPU/XNNPACK "
                        "execution providers) or runtime (NNAPI/Core ML execution providers).")
    out_dir = Path(out_dir)
    _output.check_writable_dir(out_dir, "ORT model")
    with _output.staging_dir(out_dir, "ORT model") as stage:
        source = stage / f"{name}.onnx"
        source.write_bytes(onnx_proto.SerializeToString())
        staged = _convert(source, stage / "out", style, target_platform)
        for config in staged[1:]:  # the header names the converted model: use its final path
            config.write_text(_config_header_for(config.read_text(), stage,
                                                 Path(final_dir or out_dir)))
        check = verify_ort(onnx_proto, staged[0], style)
        log.info("%s matches the ONNX model: max abs diff %.3g (tolerance %.3g)",
                 staged[0].name, check.max_abs_diff, check.tolerance)
        return [_output.publish(path, out_dir / path.name, "ORT model") for path in staged]


def _config_header_for(text: str, stage: Path, final_dir: Path) -> str:
    """An operator config whose "# Generated from model/s:" header names the model where it
    will be (``final_dir``), not the staging folder; lines naming the converter's intermediate
    models (the runtime style's temporary without_runtime_opt copy) are dropped, since those
    files are gone after the build."""
    text = text.replace(str((stage / "out").resolve()), str(final_dir.resolve()))
    staged = str(stage.resolve())
    return "".join(line for line in text.splitlines(keepends=True)
                   if not (line.startswith("#") and staged in line))


def _convert(source: Path, out: Path, style: str, target_platform: str
             ) -> list[Path]:
    """Run the converter twice (plain and type-reduced config); return [.ort, configs...]."""
    from onnxruntime.tools.convert_onnx_models_to_ort import (
        OptimizationStyle,
        convert_onnx_models_to_ort,
    )

    optimization = {"fixed": OptimizationStyle.Fixed, "runtime": OptimizationStyle.Runtime}
    captured = io.StringIO()  # the tool prints its progress; keep it for the debug log
    tool_log = logging.getLogger("ort_format_model.utils")  # logs each config at INFO
    try:
        with contextlib.redirect_stdout(captured), _quiet(tool_log):
            for reduced in (False, True):
                convert_onnx_models_to_ort(source, output_dir=out,
                                           optimization_styles=[optimization[style]],
                                           target_platform=target_platform,
                                           enable_type_reduction=reduced)
    except Exception as err:
        log.debug("converter output:\n%s", captured.getvalue())
        raise UserError(f"onnxruntime could not convert the model to the .ort format "
                        f"({type(err).__name__}: {err}).") from err
    log.debug("converter output:\n%s", captured.getvalue())
    models = sorted(out.glob("*.ort"))
    configs = sorted(out.glob("*.config"))
    if len(models) != 1 or len(configs) != 2:
        raise RuntimeError(f"unexpected converter output: {sorted(p.name for p in out.iterdir())}")
    return models + configs


@contextlib.contextmanager
def _quiet(logger: logging.Logger) -> Iterator[None]:
    level = logger.level
    logger.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        logger.setLevel(level)


def verify_ort(onnx_proto: onnx.ModelProto, ort_path: Path, style: str = "fixed",
               seed: int = 0) -> OrtCheck:
    """Load ``ort_path`` in onnxruntime and compare it with ``onnx_proto`` on random inputs.

    The reference runs at the level the ``.ort`` file was optimized to: all optimizations for
    the fixed style; basic for the runtime style, whose saved optimizations are replayed only
    by the NNAPI/Core ML execution providers (on the CPU here it runs as basic).
    """
    level = REFERENCE_LEVEL[style]
    reference = latency.make_session(onnx_proto.SerializeToString(), threads=1, level=level)
    try:
        session = latency.make_session(str(ort_path), threads=1)
    except Exception as err:
        raise UserError(f"onnxruntime cannot load the converted {ort_path.name}: {err}") from err
    feed = latency.random_feed(reference, batch=1, seed=seed)
    expected = reference.run(None, feed)
    actual = session.run(None, feed)
    worst, tolerance = 0.0, 0.0
    for out, want, got in zip(reference.get_outputs(), expected, actual, strict=True):
        diff = float(np.max(np.abs(want.astype(np.float64) - got))) if want.size else 0.0
        limit = FLOAT_TOLERANCE * max(1.0, float(np.max(np.abs(want))))
        if not diff <= limit:
            raise UserError(f"The converted {ort_path.name} does not match the ONNX model: "
                            f"output {out.name!r} differs by up to {diff:.3g} (allowed "
                            f"{limit:.3g}). Nothing was written.")
        worst, tolerance = max(worst, diff), max(tolerance, limit)
    return OrtCheck(worst, tolerance)
