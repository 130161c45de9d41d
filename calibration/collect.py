"""Calibration phases 1 and 2: expose the planned tensors as outputs, run data, get ranges.

Phase 1 adds every tensor that needs a range as an extra graph output (on a copy). Phase 2 runs
the calibration batches through ONNX Runtime and feeds each tensor to its own observer; the
observers' ``compute_range()`` are the result. Phase 3 is :func:`.qdq.insert_qdq`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from mvcompile import onnx_io
from mvcompile.calibration.observers import make_observer
from mvcompile.errors import UserError

log = logging.getLogger(__name__)

Range = tuple[float, float]


def observation_session(model: ir.Model, tensors: list[str], threads: int = 2
                        ) -> ort.InferenceSession:
    """Phase 1: a session over a copy of ``model`` whose outputs include ``tensors``."""
    proto = onnx_io.to_proto(model)
    observed = onnx.ModelProto()
    observed.CopyFrom(proto)
    existing = {o.name for o in observed.graph.output}
    observed.graph.output.extend(onnx.ValueInfoProto(name=t) for t in tensors
                                 if t not in existing)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    return ort.InferenceSession(observed.SerializeToString(), options,
                                providers=["CPUExecutionProvider"])


def collect_ranges(model: ir.Model, tensors: list[str], batches: Iterable[np.ndarray],
                   method: str, on_batch: Callable[[int], None] | None = None
                   ) -> dict[str, Range]:
    """Phase 2: observe every tensor over all ``batches`` with a ``method`` observer each."""
    if not tensors:
        return {}
    session = observation_session(model, tensors)
    input_name = session.get_inputs()[0].name
    observers = {t: make_observer(method) for t in tensors}
    for number, batch in enumerate(batches, start=1):
        outputs = session.run(tensors, {input_name: batch})
        for name, value in zip(tensors, outputs, strict=True):
            _refuse_non_finite(name, value, number)
            observers[name].update(value)
        if on_batch is not None:
            on_batch(len(batch))
    return {name: observer.compute_range() for name, observer in observers.items()}


def _refuse_non_finite(name: str, value: np.ndarray, batch_number: int) -> None:
    """A NaN or ±inf activation has no quantization range: the FP32 model overflows on the
    calibration data, and no range computed from it would mean anything."""
    if value.dtype.kind == "f" and not np.isfinite(value).all():
        raise UserError(
            f"Calibration batch {batch_number} makes tensor {name!r} NaN or infinite: the FP32 "
            "model overflows on these images, so it cannot be calibrated. Check the checkpoint "
            "(its weights or BatchNorm statistics) and that the images are preprocessed as the "
            "model expects.")
