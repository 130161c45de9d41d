"""``mvcompile bench``: latency of one model file with ONNX Runtime or Core ML.

Latency is the wall time of single predictions at the model's batch (a symbolic batch is 1),
after ``warmup`` untimed runs: median, p90 and min over ``runs``, and throughput
= batch · 1000 / median_ms inferences per second. Symbolic H and W of an [N, C, H, W] input
take ``resolution``; without it such a model is refused rather than timed at 1×1. The table
shows the input shapes actually timed. The paper reports the average of 100
iterations on an iPhone 12; on this machine medians vary ±30% between runs (DESIGN.md).

- ``ort``: ``.onnx`` or ``.ort`` files on the CPU execution provider, ``threads`` intra-op
  threads, thread spinning on (ORT's default, right for one session timed alone). ``mvcompile
  build`` instead times its models interleaved with spinning off (latency.make_session), so
  the two commands' numbers differ and the table says which setting was used.
- ``coreml``: ``.mlpackage``/``.mlmodel`` with ``MLModel.predict``, which exists only on macOS.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from mvcompile import latency, onnx_io
from mvcompile.analysis import format_shape
from mvcompile.errors import UserError, first_line, ort_load_error, raise_if_out_of_memory

log = logging.getLogger(__name__)

BACKENDS = ("ort", "coreml")
COMPUTE_UNITS = {"all": "ALL", "cpu_and_ne": "CPU_AND_NE", "cpu_only": "CPU_ONLY",
                 "cpu_and_gpu": "CPU_AND_GPU"}
SUFFIXES = {".onnx": "ort", ".ort": "ort", ".mlpackage": "coreml", ".mlmodel": "coreml"}
SPINNING_NOTE = "on (ORT default; `mvcompile build` times with it off, interleaved)"


@dataclass(frozen=True)
class BenchResult:
    """What ``mvcompile bench`` prints."""

    model: str
    backend: str
    device: str  # "CPU, 2 threads" or the Core ML compute units
    batch: int
    stats: latency.LatencyStats
    inputs: tuple[tuple[str, tuple[int, ...]], ...] = ()  # (name, shape) as timed

    @property
    def throughput(self) -> float:
        """Inferences per second at the median latency."""
        return self.batch * self.stats.throughput


def detect_backend(path: Path, backend: str | None) -> str:
    """The backend for ``path``: the one asked for, checked against the file type."""
    inferred = SUFFIXES.get(path.suffix.lower())
    if backend is None:
        if inferred is None:
            raise UserError(f"Cannot tell the backend from {path.name}: use a .onnx, .ort, "
                            ".mlpackage or .mlmodel file, or pass --backend.")
        return inferred
    if inferred is not None and inferred != backend:
        kind = {"ort": "an ONNX Runtime", "coreml": "a Core ML"}[inferred]
        raise UserError(f"{path.name} is {kind} model; --backend {backend} cannot run it "
                        f"(use --backend {inferred}).")
    return backend


def bench(model: str | Path, backend: str | None = None, threads: int = 2, runs: int = 100,
          warmup: int = 10, compute_units: str = "all",
          on_run: Callable[[], None] | None = None, resolution: int | None = None
          ) -> BenchResult:
    """Time ``model``; raise :class:`UserError` for a missing file, a wrong backend, inputs
    whose shape cannot be filled in, or Core ML off macOS. ``resolution`` fills symbolic H
    and W of [N, C, H, W] ONNX Runtime inputs."""
    path = Path(model)
    if not path.exists():
        raise UserError(f"Model not found: {path}.")
    if path.is_dir() and path.suffix.lower() != ".mlpackage":
        raise UserError(f"{path} is a folder; pass an .onnx, .ort or .mlpackage model.")
    if runs < 1 or warmup < 0 or threads < 1:
        raise UserError("--runs and --threads must be at least 1 and --warmup at least 0.")
    if resolution is not None and resolution < 1:
        raise UserError("--resolution must be at least 1.")
    chosen = detect_backend(path, backend)
    if chosen == "ort":
        return _bench_ort(path, threads, runs, warmup, on_run, resolution)
    return _bench_coreml(path, compute_units, runs, warmup, on_run)


def _bench_ort(path: Path, threads: int, runs: int, warmup: int,
               on_run: Callable[[], None] | None, resolution: int | None) -> BenchResult:
    session = _ort_session(path, threads)
    if not session.get_outputs():
        raise UserError(f"{path} has no outputs, so there is nothing to time.")
    shapes = _ort_input_shapes(session, path, resolution)
    feed = latency.seeded_inputs((i.name, latency.numpy_dtype(i.type), shapes[i.name])
                                 for i in session.get_inputs())
    batch = next(iter(shapes.values()))[0] if shapes else 1
    try:
        stats = latency.measure(session, feed, runs=runs, warmup=warmup, on_run=on_run)
    except Exception as err:  # e.g. an input type or shape the random feed cannot satisfy
        raise_if_out_of_memory(err)
        raise UserError(f"ONNX Runtime cannot run {path} on random inputs of shape "
                        f"{_describe(shapes)}: {first_line(err)}") from err
    return BenchResult(str(path), "ort", f"CPU, {threads} thread(s)", batch, stats,
                       tuple(shapes.items()))


def _ort_session(path: Path, threads: int) -> ort.InferenceSession:
    """A session for ``path``, with ORT's default thread spinning, right for one session timed
    alone (see the module doc). An .onnx file that ONNX Runtime cannot load from its path is
    read with onnx and handed over as bytes: ORT cannot take shape tensors (a Reshape's) from
    external data, and onnx says which external data file is missing."""
    try:
        return latency.make_session(str(path), threads=threads, spinning=True)
    except Exception as err:  # onnxruntime raises several types for unreadable models
        if path.suffix.lower() != ".onnx":
            raise ort_load_error(err, str(path)) from err
        first = err
    proto = onnx_io.load_model(path)  # UserError for a missing data file, say
    try:
        return latency.make_session(proto.SerializeToString(), threads=threads, spinning=True)
    except Exception:  # the path's error is the one to show
        raise ort_load_error(first, str(path)) from first


def _ort_input_shapes(session: ort.InferenceSession, path: Path, resolution: int | None
                      ) -> dict[str, tuple[int, ...]]:
    """{input: concrete shape}: a symbolic batch (first dim) is 1, symbolic H and W of an
    [N, C, H, W] input are ``resolution``; any other unknown dimension is refused, because
    guessing it (the feed would make it 1) times a different, often tiny, problem."""
    shapes = {i.name: _concrete_shape(i.name, list(i.shape), path, resolution)
              for i in session.get_inputs()}
    spatial = any(len(i.shape) == 4 and not all(_known(d) for d in i.shape[2:])
                  for i in session.get_inputs())
    if resolution is not None and not spatial:
        log.warning("--resolution %d ignored: the inputs of %s have fixed sizes %s.",
                    resolution, path.name, _describe(shapes))
    return shapes


def _concrete_shape(name: str, dims: list[int | str | None], path: Path,
                    resolution: int | None) -> tuple[int, ...]:
    """``dims`` of input ``name`` with the batch and, given ``resolution``, H and W filled."""
    if not dims:
        raise UserError(f"Input '{name}' of {path.name} declares no shape (or is a scalar), "
                        "so bench cannot make a random input for it. Export the model with "
                        "shaped inputs, e.g. [N, 3, 224, 224].")
    shape = [dims[0] if _known(dims[0]) else 1]
    for axis, dim in enumerate(dims[1:], start=1):
        if _known(dim):
            shape.append(dim)
        elif len(dims) == 4 and axis >= 2 and resolution is not None:
            shape.append(resolution)
        else:
            raise UserError(_unknown_dim_message(name, dims, axis, path))
    return tuple(shape)


def _known(dim: int | str | None) -> bool:
    return isinstance(dim, int) and dim > 0


def _unknown_dim_message(name: str, dims: list[int | str | None], axis: int,
                         path: Path) -> str:
    """Why a symbolic dimension stops bench, and (for H and W) the option that fills it."""
    shown = format_shape(["?" if d is None else d for d in dims])
    if len(dims) == 4 and axis >= 2:
        return (f"Input '{name}' of {path.name} has symbolic height and width {shown}; pass "
                f"--resolution R to time it at [1, {dims[1]}, R, R] (e.g. --resolution 224).")
    return (f"Input '{name}' of {path.name} has shape {shown} with an unknown dimension at "
            f"axis {axis}; bench fills only the batch (1) and, with --resolution, the H and W "
            "of an [N, C, H, W] input. Export the model with that dimension fixed.")


def _describe(shapes: dict[str, tuple[int, ...]]) -> str:
    """{"x": (1, 3, 8, 8)} as "x [1, 3, 8, 8]"."""
    return ", ".join(f"{name} {format_shape(list(dims))}" for name, dims in shapes.items())


def _bench_coreml(path: Path, compute_units: str, runs: int, warmup: int,
                  on_run: Callable[[], None] | None) -> BenchResult:
    if compute_units not in COMPUTE_UNITS:
        raise UserError(f"--compute-units must be one of {', '.join(COMPUTE_UNITS)}.")
    if sys.platform != "darwin":
        raise UserError("Core ML predictions need macOS: MLModel.predict does not exist on "
                        f"{sys.platform}. Run `mvcompile bench {path.name}` on a Mac, or open "
                        "the .mlpackage in Xcode and use its Performance report on an iPhone "
                        "(see the README).")
    from mvcompile.interrupts import deferred_interrupt

    with deferred_interrupt():  # a Ctrl-C during coremltools' import would be lost
        import coremltools as ct

    units = getattr(ct.ComputeUnit, COMPUTE_UNITS[compute_units])
    mlmodel = ct.models.MLModel(str(path), compute_units=units)
    feed, batch, shapes = _coreml_feed(mlmodel)
    for _ in range(warmup):
        mlmodel.predict(feed)
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        mlmodel.predict(feed)
        samples.append(time.perf_counter() - start)
        if on_run is not None:
            on_run()
    return BenchResult(str(path), "coreml", f"Core ML, compute units {compute_units}", batch,
                       latency.LatencyStats.from_samples(samples), shapes)


def _coreml_feed(mlmodel: object) -> tuple[dict, int, tuple[tuple[str, tuple[int, ...]], ...]]:
    """Random inputs from the model description (PIL images or float32 arrays), the batch,
    and each input's shape (an image is one [1, 3, H, W] picture)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    feed, batch, shapes = {}, 1, []
    for feature in mlmodel.get_spec().description.input:
        if feature.type.WhichOneof("Type") == "imageType":
            image = feature.type.imageType
            pixels = rng.integers(0, 256, (image.height, image.width, 3), dtype=np.uint8)
            feed[feature.name] = Image.fromarray(pixels)
            shapes.append((feature.name, (1, 3, image.height, image.width)))
        else:
            shape = list(feature.type.multiArrayType.shape)
            feed[feature.name] = rng.uniform(0, 1, shape).astype(np.float32)
            batch = shape[0] if shape else 1
            shapes.append((feature.name, tuple(shape)))
    return feed, batch, tuple(shapes)


def format_rows(result: BenchResult) -> list[tuple[str, object]]:
    """The table ``mvcompile bench`` prints: the conditions (backend, thread spinning, input
    shapes timed), then the latency statistics."""
    s = result.stats
    rows: list[tuple[str, object]] = [("backend", f"{result.backend} ({result.device})")]
    if result.backend == "ort":  # always timed with spinning on (_bench_ort)
        rows.append(("thread spinning", SPINNING_NOTE))
    rows += [(f"input {name}", format_shape(list(dims))) for name, dims in result.inputs]
    return rows + [
        ("batch", result.batch),
        ("runs", s.runs),
        ("median", f"{s.median_ms:.3f} ms"),
        ("p90", f"{s.p90_ms:.3f} ms"),
        ("min", f"{s.min_ms:.3f} ms"),
        ("throughput", f"{result.throughput:.1f} inferences/s"),
    ]
