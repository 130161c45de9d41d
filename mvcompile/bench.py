"""``mvcompile bench``: latency of one model file with ONNX Runtime or Core ML.

Latency is the wall time of single predictions at the model's batch (a symbolic batch is 1),
after ``warmup`` untimed runs: median, p90 and min over ``runs``, and throughput
= batch · 1000 / median_ms inferences per second. The paper reports the average of 100
iterations on an iPhone 12; on this machine medians vary ±30% between runs (DESIGN.md).

- ``ort``: ``.onnx`` or ``.ort`` files on the CPU execution provider, ``threads`` intra-op
  threads.
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

from mvcompile import latency
from mvcompile.errors import UserError, first_line

log = logging.getLogger(__name__)

BACKENDS = ("ort", "coreml")
COMPUTE_UNITS = {"all": "ALL", "cpu_and_ne": "CPU_AND_NE", "cpu_only": "CPU_ONLY",
                 "cpu_and_gpu": "CPU_AND_GPU"}
SUFFIXES = {".onnx": "ort", ".ort": "ort", ".mlpackage": "coreml", ".mlmodel": "coreml"}


@dataclass(frozen=True)
class BenchResult:
    """What ``mvcompile bench`` prints."""

    model: str
    backend: str
    device: str  # "CPU, 2 threads" or the Core ML compute units
    batch: int
    stats: latency.LatencyStats

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
          on_run: Callable[[], None] | None = None) -> BenchResult:
    """Time ``model``; raise :class:`UserError` for a missing file, a wrong backend, or
    Core ML off macOS."""
    path = Path(model)
    if not path.exists():
        raise UserError(f"Model not found: {path}.")
    if path.is_dir() and path.suffix != ".mlpackage":
        raise UserError(f"{path} is a folder; pass an .onnx, .ort or .mlpackage model.")
    if runs < 1 or warmup < 0 or threads < 1:
        raise UserError("--runs and --threads must be at least 1 and --warmup at least 0.")
    chosen = detect_backend(path, backend)
    if chosen == "ort":
        return _bench_ort(path, threads, runs, warmup, on_run)
    return _bench_coreml(path, compute_units, runs, warmup, on_run)


def _bench_ort(path: Path, threads: int, runs: int, warmup: int,
               on_run: Callable[[], None] | None) -> BenchResult:
    try:
        session = latency.make_session(str(path), threads=threads, spinning=True)  # alone
    except Exception as err:  # onnxruntime raises several types for unreadable models
        raise UserError(f"ONNX Runtime cannot load {path}: {first_line(err)}") from err
    feed = latency.random_feed(session, batch=1)
    batch = next(iter(feed.values())).shape[0] if feed else 1
    try:
        stats = latency.measure(session, feed, runs=runs, warmup=warmup, on_run=on_run)
    except Exception as err:  # e.g. an input type or shape the random feed cannot satisfy
        raise UserError(f"ONNX Runtime cannot run {path} on random inputs: "
                        f"{first_line(err)}") from err
    return BenchResult(str(path), "ort", f"CPU, {threads} thread(s)", batch, stats)


def _bench_coreml(path: Path, compute_units: str, runs: int, warmup: int,
                  on_run: Callable[[], None] | None) -> BenchResult:
    if compute_units not in COMPUTE_UNITS:
        raise UserError(f"--compute-units must be one of {', '.join(COMPUTE_UNITS)}.")
    if sys.platform != "darwin":
        raise UserError("Core ML predictions need macOS: MLModel.predict does not exist on "
                        f"{sys.platform}. Run `mvcompile bench {path.name}` on a Mac, or open "
                        "the .mlpackage in Xcode and use its Performance report on an iPhone "
                        "(see the README).")
    import coremltools as ct

    units = getattr(ct.ComputeUnit, COMPUTE_UNITS[compute_units])
    mlmodel = ct.models.MLModel(str(path), compute_units=units)
    feed, batch = _coreml_feed(mlmodel)
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
                       latency.LatencyStats.from_samples(samples))


def _coreml_feed(mlmodel: object) -> tuple[dict, int]:
    """Random inputs from the model description: PIL images or float32 arrays."""
    from PIL import Image

    rng = np.random.default_rng(0)
    feed, batch = {}, 1
    for feature in mlmodel.get_spec().description.input:
        if feature.type.WhichOneof("Type") == "imageType":
            image = feature.type.imageType
            pixels = rng.integers(0, 256, (image.height, image.width, 3), dtype=np.uint8)
            feed[feature.name] = Image.fromarray(pixels)
        else:
            shape = list(feature.type.multiArrayType.shape)
            feed[feature.name] = rng.uniform(0, 1, shape).astype(np.float32)
            batch = shape[0] if shape else 1
    return feed, batch


def format_rows(result: BenchResult) -> list[tuple[str, object]]:
    s = result.stats
    return [
        ("backend", f"{result.backend} ({result.device})"),
        ("batch", result.batch),
        ("runs", s.runs),
        ("median", f"{s.median_ms:.3f} ms"),
        ("p90", f"{s.p90_ms:.3f} ms"),
        ("min", f"{s.min_ms:.3f} ms"),
        ("throughput", f"{result.throughput:.1f} inferences/s"),
    ]
