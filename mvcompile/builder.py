"""``mvcompile build``: MobileViT graph → validated ``model.onnx`` + ``report.json``.

Everything is computed and validated in memory first; files are written only at the end,
each through a temporary file and a rename, so a failed build leaves nothing behind.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import onnx

from mvcompile import analysis, latency, onnx_io
from mvcompile.errors import UserError
from mvcompile.graphs.factory import WeightsInfo, create_mobilevit
from mvcompile.graphs.mobilevit import MobileViTConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BuildOptions:
    """Arguments of ``mvcompile build`` (see ``mvcompile build --help``)."""

    size: str = "xxs"
    weights: str | None = None
    resolution: int = 256
    patch_config: str = "A"
    num_classes: int = 1000
    out_dir: str = "out/mobilevit_xxs"
    seed: int = 0
    latency_runs: int = 20
    threads: int = 2


@dataclass
class BuildResult:
    """What a build produced: file paths and the report written beside them."""

    model_path: Path
    report_path: Path
    report: dict


def build(options: BuildOptions, on_latency_run: Callable[[], None] | None = None
          ) -> BuildResult:
    """Build, validate and write the model; raise :class:`UserError` on bad input."""
    config = MobileViTConfig.for_size(options.size, resolution=options.resolution,
                                      patch_config=options.patch_config,
                                      num_classes=options.num_classes)
    out_dir = Path(options.out_dir)
    _check_writable(out_dir)
    model, weights_info = create_mobilevit(config, options.weights, options.seed)
    proto = onnx_io.to_proto(model)
    onnx_io.validate(proto)
    model_bytes = proto.SerializeToString()
    stats = None
    if options.latency_runs > 0:
        session = latency.make_session(model_bytes, threads=options.threads)
        stats = latency.measure(session, latency.random_feed(session), runs=options.latency_runs,
                                on_run=on_latency_run)
    report = make_report(config, weights_info, proto, len(model_bytes), stats, options)
    model_path, report_path = out_dir / "model.onnx", out_dir / "report.json"
    onnx_io.atomic_write_bytes(model_path, model_bytes)
    onnx_io.atomic_write_text(report_path, json.dumps(report, indent=2) + "\n")
    log.info("Wrote %s and %s", model_path, report_path)
    return BuildResult(model_path, report_path, report)


def make_report(config: MobileViTConfig, weights: WeightsInfo, proto: onnx.ModelProto,
                file_bytes: int, stats: latency.LatencyStats | None,
                options: BuildOptions) -> dict:
    summary = analysis.summarize(proto)
    return {
        "model": {"size": config.size, "resolution": config.resolution,
                  "patch_sizes": list(config.patch_sizes), "num_classes": config.num_classes},
        "weights": asdict(weights),
        "parameters": summary.parameters,
        "macs": summary.macs,
        "op_histogram": summary.op_histogram,
        "node_count": summary.node_count,
        "opset": summary.opsets,
        "ir_version": summary.ir_version,
        "file_bytes": file_bytes,
        "latency": None if stats is None else {
            **asdict(stats), "threads": options.threads, "batch": 1,
            "runtime": "onnxruntime CPUExecutionProvider, ORT_ENABLE_ALL"},
        "artifacts": {"onnx": "model.onnx"},
    }


def _check_writable(out_dir: Path) -> None:
    """Fail before any work if ``out_dir`` is a file or sits under one."""
    for parent in [out_dir, *out_dir.parents]:
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"Cannot write to {out_dir}: {parent} is a file, not a folder.")
            if not os.access(parent, os.W_OK):
                raise UserError(f"Cannot write to {out_dir}: {parent} is not writable.")
            return
