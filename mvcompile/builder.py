"""``mvcompile build``: MobileViT graph → compiled FP32 (and INT8) ONNX + ``report.json``.

Steps: validate every input → author the graph → run the pass pipeline (checking numerics
against the plain graph) → optionally calibrate and quantize → time with ONNX Runtime → write.
Everything is computed and validated in memory first; the files are then written into a
staging folder beside the output and moved into place one by one (each move is a rename), so a
build that fails while computing or staging leaves nothing behind. The set as a whole is not
swapped atomically: a crash between two renames can leave new and old files side by side.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from mvcompile import analysis, latency, machine, onnx_io
from mvcompile.backends._output import check_writable_dir
from mvcompile.calibration.observers import OBSERVERS
from mvcompile.errors import UserError
from mvcompile.graphs.channel_order import check_choice
from mvcompile.graphs.checkpoints import resolve_run_weights, training_metadata
from mvcompile.graphs.factory import create_mobilevit
from mvcompile.graphs.mobilevit import MobileViTConfig
from mvcompile.stages import StageListener

log = logging.getLogger(__name__)

TARGETS = ("onnx", "ort", "coreml")
WEIGHT_BITS = (None, "auto", 7, 8)  # --weight-bits; None and "auto" pick per CPU
PASS_TOLERANCE = 1e-4  # max abs logit difference between plain and compiled graphs, per
# unit of the largest logit above 1 (pass_limit)


Progress = StageListener  # what the builder reports long work to (the CLI draws bars)


class _Silent:
    def start(self, label: str, total: int) -> None:
        log.info("%s (%d)", label, total)

    def advance(self, n: int = 1) -> None:
        pass

    def finish(self) -> None:
        pass


@dataclass(frozen=True)
class BuildOptions:
    """Arguments of ``mvcompile build`` (see ``mvcompile build --help``)."""

    size: str = "xxs"
    weights: str | None = None
    channel_order: str = "auto"  # that --weights were trained on (graphs.channel_order)
    resolution: int = 256
    patch_config: str = "A"
    num_classes: int = 1000
    out_dir: str | None = None  # None: out/mobilevit_SIZE, as the CLI's default
    seed: int = 0
    latency_runs: int = 20
    threads: int = 2
    passes: bool = True
    int8: bool = False
    calib_data: str | None = None
    calib_size: int = 32
    calib_method: str = "percentile"
    accuracy_budget: float | None = None
    eval_data: str | None = None
    weight_bits: int | str | None = None  # None or "auto": machine.auto_weight_bits here
    targets: tuple[str, ...] = ("onnx",)
    ort_style: str = "fixed"
    coreml_precision: str = "fp16"
    coreml_int8: str = "w8a8"
    coreml_input: str = "image"
    coreml_batch: int = 1

    @property
    def out_path(self) -> Path:
        """``out_dir``, or the CLI's default for the size, out/mobilevit_SIZE."""
        return Path(self.out_dir if self.out_dir is not None else f"out/mobilevit_{self.size}")


@dataclass
class BuildResult:
    """What a build produced: file paths and the report written beside them."""

    out_dir: Path
    files: dict[str, Path]
    report: dict = field(default_factory=dict)

    @property
    def model_path(self) -> Path:
        return self.files["onnx"]

    @property
    def report_path(self) -> Path:
        return self.files["report"]


def build(options: BuildOptions, progress: Progress | None = None) -> BuildResult:
    """Build, validate and write the model(s); raise :class:`UserError` on bad input."""
    progress = progress or _Silent()
    options = _with_run_weights(options)
    config = _check_inputs(options)
    for setting in trained_otherwise(options):
        log.warning("The checkpoint %s was trained with %s", options.weights, setting)
    plain, weights_info = create_mobilevit(config, options.weights, options.seed,
                                           options.channel_order)
    if not options.passes:  # with passes, check_numerics runs the plain graph and checks it
        check_finite_outputs(plain)
    fp32, pass_report = compile_graph(plain, "fp32", options.passes)
    models = {"onnx": onnx_io.to_proto(fp32)}
    report: dict = {"model": _model_entry(config), "weights": asdict(weights_info),
                    "passes": pass_report}
    if options.int8:
        from mvcompile.int8_build import build_int8

        int8_proto, int8_report = build_int8(plain, models["onnx"], options, progress)
        models["int8"] = int8_proto
        report["int8"] = int8_report
    for proto in models.values():
        onnx_io.validate(proto)
    blobs = {key: proto.SerializeToString() for key, proto in models.items()}
    report["models"] = {key: _model_stats(models[key], blobs[key]) for key in models}
    report["latency"] = _measure(blobs, options, progress)
    coreml_sources = _coreml_sources(plain, models, options)
    return _write(options.out_path, blobs, report, options, coreml_sources, progress)


def _coreml_sources(plain: ir.Model, models: dict[str, onnx.ModelProto],
                    options: BuildOptions) -> dict[str, onnx.ModelProto]:
    """What Core ML lowers: the standard-ONNX ``mobile`` pipeline's graph (the ORT ``fp32``
    pipeline uses ORT contrib ops), and the INT8 model as built."""
    if "coreml" not in options.targets:
        return {}
    mobile, _ = compile_graph(plain, "mobile", options.passes)
    sources = {"onnx": onnx_io.to_proto(mobile)}
    if "int8" in models:
        sources["int8"] = models["int8"]
    return sources


def _with_run_weights(options: BuildOptions) -> BuildOptions:
    """``options`` with a ``mvcompile train`` run folder (or its last.pt) as ``weights``
    replaced by the weights file it stands for (:func:`resolve_run_weights`)."""
    if options.weights is None:
        return options
    path, note = resolve_run_weights(options.weights)
    if note:
        log.info("%s", note)
    return replace(options, weights=str(path))


# Build options that a ``mvcompile train`` checkpoint records (training_metadata's keys).
TRAINED_SETTINGS = ("size", "patch_config", "num_classes", "resolution")


def trained_otherwise(options: BuildOptions) -> list[str]:
    """The settings recorded in ``options.weights`` (a ``mvcompile train`` checkpoint) that
    differ from ``options``, e.g. "--patch-config B (building A as asked)": the model is built
    as asked, which for the patch config or the resolution is not the network that was
    trained."""
    if options.weights is None:
        return []
    trained = training_metadata(options.weights)
    return [f"--{name.replace('_', '-')} {trained[name]} (building {getattr(options, name)} "
            "as asked)" for name in TRAINED_SETTINGS
            if name in trained and trained[name] != str(getattr(options, name))]


def _check_inputs(options: BuildOptions) -> MobileViTConfig:
    """Fail on bad arguments before doing any work."""
    config = MobileViTConfig.for_size(options.size, resolution=options.resolution,
                                      patch_config=options.patch_config,
                                      num_classes=options.num_classes)
    check_writable_dir(options.out_path, "build outputs")
    if options.out_path.suffix.lower() in (".onnx", ".ort"):
        log.warning("-o names the output folder: %s will be a folder holding model.onnx and "
                    "report.json", options.out_path)
    check_choice(options.channel_order)
    if isinstance(options.targets, str):
        raise UserError(f"targets is a tuple of names, e.g. ('onnx', 'ort'), not the string "
                        f"{options.targets!r}.")
    if ("coreml" in options.targets and options.coreml_input == "image"
            and options.coreml_batch != 1):
        raise UserError(f"--coreml-input image takes one image per prediction, but "
                        f"--coreml-batch is {options.coreml_batch}. Use --coreml-batch 1 or "
                        "--coreml-input tensor.")
    if options.calib_method not in OBSERVERS:
        raise UserError(f"Unknown calibration method {options.calib_method!r}. Choose one of: "
                        f"{', '.join(OBSERVERS)}.")
    if options.calib_size < 1:
        raise UserError(f"--calib-size must be at least 1, got {options.calib_size}.")
    if options.weight_bits not in WEIGHT_BITS:
        raise UserError(f"--weight-bits must be auto, 7 or 8, got {options.weight_bits!r}.")
    unknown = set(options.targets) - set(TARGETS)
    if unknown:
        raise UserError(f"Unknown target(s) {', '.join(sorted(unknown))}. Choose from: "
                        f"{', '.join(TARGETS)}.")
    for flag, path in (("--calib-data", options.calib_data), ("--eval-data", options.eval_data)):
        if path is not None and path != "digits" and not Path(path).exists():
            raise UserError(f"{flag}: {path} does not exist.")
    return config


def compile_graph(plain: ir.Model, pipeline: str = "fp32", passes: bool = True
                  ) -> tuple[ir.Model, dict | None]:
    """Pass pipeline ``pipeline`` on a copy of ``plain``, checked against it on random inputs
    (``passes=False``: ``plain`` itself, for ``--no-passes``)."""
    if not passes:
        return plain, None
    from mvcompile.pipeline import run_pipeline

    compiled, report = run_pipeline(plain.clone(), pipeline)
    report["max_abs_diff"] = check_numerics(plain, compiled)
    return compiled, report


def check_finite_outputs(model: ir.Model) -> None:
    """:func:`raise_if_not_finite` on ``model``'s outputs for random images in [0, 1]."""
    session = latency.make_session(onnx_io.to_proto(model).SerializeToString())
    raise_if_not_finite(session.run(None, latency.random_feed(session, seed=123))[0])


def raise_if_not_finite(logits: np.ndarray) -> None:
    """UserError if the plain graph's ``logits`` hold NaN or Inf: weights that make the
    activations overflow (e.g. BatchNorm variances near 0: x/√(σ²+ε) with σ² = 0 scales by
    1/√ε) would otherwise give a model that answers NaN, or look like a bug in the passes."""
    if not np.isfinite(logits).all():
        raise UserError("The model outputs NaN or Inf on random images: its weights make the "
                        "activations overflow. Check the checkpoint (for example BatchNorm "
                        "running_var of 0 or near it). Nothing was written.")


def check_numerics(reference: ir.Model, candidate: ir.Model, batch: int = 2) -> float:
    """Max abs output difference on random inputs; UserError if above :func:`pass_limit`."""
    ref = latency.make_session(onnx_io.to_proto(reference).SerializeToString())
    cand = latency.make_session(onnx_io.to_proto(candidate).SerializeToString())
    feed = latency.random_feed(ref, batch=batch, seed=123)
    expected = ref.run(None, feed)[0]
    raise_if_not_finite(expected)
    diff = float(np.abs(expected - cand.run(None, feed)[0]).max())
    limit = pass_limit(expected)
    if not diff <= limit:
        raise UserError(f"The compiled graph differs from the plain graph by {diff:.2e} (max "
                        f"abs logit; allowed {limit:.2e}): a bug in the graph passes. Nothing "
                        "was written. `--no-passes` builds the plain graph; please report this "
                        "with the build command.")
    return diff


def pass_limit(logits: np.ndarray) -> float:
    """The largest max abs logit difference allowed between plain and compiled graphs:
    :data:`PASS_TOLERANCE` · max(1, max |logit|). Float32 rounding, which the passes reorder,
    grows with the values: logits near 400 differ by about 2e-4 with every pass exact."""
    return PASS_TOLERANCE * max(1.0, float(np.abs(logits).max(initial=0.0)))


def _model_entry(config: MobileViTConfig) -> dict:
    return {"size": config.size, "resolution": config.resolution,
            "patch_sizes": list(config.patch_sizes), "num_classes": config.num_classes}


def _model_stats(proto: onnx.ModelProto, blob: bytes) -> dict:
    summary = analysis.summarize(proto)
    return {"parameters": summary.parameters, "macs": summary.macs,
            "node_count": summary.node_count, "op_histogram": summary.op_histogram,
            "opset": summary.opsets, "ir_version": summary.ir_version, "file_bytes": len(blob)}


def _measure(blobs: dict[str, bytes], options: BuildOptions, progress: Progress) -> dict | None:
    """Median latency of each model, runs interleaved so that they share machine noise."""
    if options.latency_runs <= 0:
        return None
    sessions = {k: latency.make_session(b, threads=options.threads) for k, b in blobs.items()}
    feed = latency.random_feed(next(iter(sessions.values())))
    progress.start("Timing with ONNX Runtime", -(-options.latency_runs // latency.BLOCK))
    stats = latency.measure_interleaved(sessions, feed, options.latency_runs,
                                        on_run=progress.advance)
    progress.finish()
    result = {k: asdict(s) for k, s in stats.items()}
    result["conditions"] = {"threads": options.threads, "batch": 1,
                            "runtime": "onnxruntime CPUExecutionProvider, ORT_ENABLE_ALL",
                            "cpu": machine.cpu_summary()}
    return result


def _write(out_dir: Path, blobs: dict[str, bytes], report: dict, options: BuildOptions,
           coreml_sources: dict[str, onnx.ModelProto], progress: Progress) -> BuildResult:
    """Write every artifact into a staging folder, then move them all into ``out_dir``."""
    from mvcompile.backends._output import check_replaceable, publish, staging_dir

    earlier = _earlier_artifacts(out_dir)
    with staging_dir(out_dir / "model.onnx", "build outputs") as stage:
        staged = {key: stage / _ONNX_NAMES[key] for key in blobs}
        for key, blob in blobs.items():
            staged[key].write_bytes(blob)
        staged.update(_write_targets(stage, out_dir, blobs, report, options, coreml_sources,
                                     progress))
        report["artifacts"] = {key: path.name for key, path in staged.items()}
        staged["report"] = stage / "report.json"
        staged["report"].write_text(json.dumps(finite_json(report), indent=2, allow_nan=False)
                                    + "\n")
        for path in staged.values():
            check_replaceable(path, out_dir / path.name, "build output")
        _note_unrecorded(out_dir, [p.name for p in staged.values()], earlier)
        # Folders (.mlpackage) first: replacing one is what fails in practice (a folder without
        # write permission cannot be moved), and nothing else has been replaced by then.
        order = sorted(staged, key=lambda key: not staged[key].is_dir())
        files = {key: publish(staged[key], out_dir / staged[key].name, "build output")
                 for key in order}
    _remove_stale(out_dir, earlier - {p.name for p in files.values()})
    log.info("Wrote %s", ", ".join(str(p) for p in files.values()))
    return BuildResult(out_dir, files, report)


_ONNX_NAMES = {"onnx": "model.onnx", "int8": "model_int8.onnx"}


def _artifact_names() -> set[str]:
    """Every file or folder name a build can write (and so may find left from an older one)."""
    names = {"report.json"}
    for stem in ("model", "model_int8"):
        names |= {f"{stem}.onnx", f"{stem}.mlpackage", f"{stem}.ort",
                  f"{stem}.with_runtime_opt.ort"}
        for kind in ("required_operators", "required_operators_and_types"):
            names |= {f"{stem}.{kind}.config", f"{stem}.{kind}.with_runtime_opt.config"}
    return names


def finite_json(value: object) -> object:
    """``value`` with every infinite or NaN float replaced by None, which JSON can hold (its
    number has no infinity: Python writes ``Infinity``, which strict parsers refuse). An SQNR
    of INT8 logits equal to FP32's is infinite and is written as null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite_json(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [finite_json(item) for item in value]
    return value


def _earlier_artifacts(out_dir: Path) -> set[str]:
    """What an earlier build wrote into ``out_dir``, as its report.json lists it; nothing when
    there is no such report (the files there are then the user's, not ours)."""
    try:
        report = json.loads((out_dir / "report.json").read_text())
        listed = set(report["artifacts"].values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return set()
    return {name for name in listed if isinstance(name, str)} & _artifact_names()


def _note_unrecorded(out_dir: Path, names: list[str], earlier: set[str]) -> None:
    """Warn of the files this build replaces in ``out_dir`` that no earlier build's
    report.json lists there (``earlier``: :func:`_earlier_artifacts`; they may be the user's
    own). The report.json of a build that listed its artifacts is its own too."""
    recorded = earlier | {"report.json"} if earlier else set()
    for name in (name for name in names if name not in recorded):
        if (out_dir / name).exists():
            log.warning("Replacing %s, which no earlier build into this folder recorded",
                        out_dir / name)


def _remove_stale(out_dir: Path, stale: set[str]) -> None:
    """Delete artifacts of an earlier build that this one did not rewrite (an old
    model_int8.onnx would otherwise sit beside a new model.onnx)."""
    import shutil

    for name in sorted(stale):
        path = out_dir / name
        if path.is_symlink() or (path.is_dir() and not _is_mlpackage(path)):
            log.warning("Left %s in place: an earlier build's report.json lists it, but it is "
                        "not what a build writes there (a %s)", path,
                        "symbolic link" if path.is_symlink() else "folder")
            continue
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
        else:
            continue
        log.warning("Removed %s, left by an earlier build into this folder that this build "
                    "did not rewrite", path)


def _is_mlpackage(path: Path) -> bool:
    """Whether the folder ``path`` is a Core ML package, the one kind of folder a build
    writes."""
    return path.suffix == ".mlpackage" and (path / "Manifest.json").is_file()


def _write_targets(stage: Path, out_dir: Path, blobs: dict[str, bytes], report: dict,
                   options: BuildOptions, coreml_sources: dict[str, onnx.ModelProto],
                   progress: Progress) -> dict[str, Path]:
    """The .ort and .mlpackage artifacts in ``stage`` (each verified against ONNX Runtime
    first); ``out_dir`` is where they will be published."""
    written: dict[str, Path] = {}
    if "ort" in options.targets:
        from mvcompile.backends.ort import write_ort

        for key, blob in blobs.items():
            progress.start(f"Writing {_ONNX_NAMES[key].replace('.onnx', '.ort')}", 1)
            paths = write_ort(onnx.load_from_string(blob), stage, style=options.ort_style,
                              name=_ONNX_NAMES[key].removesuffix(".onnx"), final_dir=out_dir)
            progress.finish()
            for path in paths:
                written[f"{key}_{_ort_artifact_kind(path.name)}"] = path
    if "coreml" in options.targets:
        from mvcompile.interrupts import deferred_interrupt

        with deferred_interrupt():  # a Ctrl-C during coremltools' import would be lost
            from mvcompile.backends.coreml import write_coreml

        report["coreml"] = {}
        for key, proto in coreml_sources.items():
            name = _ONNX_NAMES[key].replace(".onnx", ".mlpackage")
            progress.start(f"Lowering to Core ML: {name}", 1)
            written[f"{key}_coreml"] = write_coreml(
                proto, stage / name, precision=options.coreml_precision,
                int8_mode=options.coreml_int8, input_type=options.coreml_input,
                batch=options.coreml_batch)
            progress.finish()
            report["coreml"][name] = _coreml_io(written[f"{key}_coreml"])
        report["coreml_sources"] = {
            _ONNX_NAMES[key].replace(".onnx", ".mlpackage"): {
                "graph": ("the mobile pipeline's (standard ONNX)" if key == "onnx"
                          and options.passes else f"{_ONNX_NAMES[key]}'s"),
                "nodes": len(proto.graph.node), "op_histogram": analysis.op_histogram(proto)}
            for key, proto in coreml_sources.items()}
    return written


def _ort_artifact_kind(name: str) -> str:
    """report.json's key for a file ``write_ort`` wrote, without its model's prefix: ``ort``
    (model.ort), ``ort_operators_config`` or ``ort_operators_and_types_config``."""
    if name.endswith(".ort"):
        return "ort"
    kind = "operators_and_types" if ".required_operators_and_types." in name else "operators"
    return f"ort_{kind}_config"


def _coreml_io(path: Path) -> list[dict]:
    import coremltools as ct

    from mvcompile.backends.coreml import describe_io

    return describe_io(ct.models.MLModel(str(path), skip_model_load=True))
