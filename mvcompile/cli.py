"""The ``mvcompile`` command line. Printing happens here and nowhere else."""

from __future__ import annotations

import functools
import os
import shutil
import sys
import time
from collections.abc import Callable
from typing import Any

import click

from mvcompile import analysis, onnx_io, stages
from mvcompile.calibration.observers import OBSERVERS as OBSERVER_NAMES
from mvcompile.click_types import FloatRange, NonEmptyPath
from mvcompile.errors import UserError, os_error_message, out_of_memory_message
from mvcompile.graphs.channel_order import CHOICES as CHANNEL_CHOICES
from mvcompile.graphs.mobilevit import SIZES
from mvcompile.interrupts import (
    SIGINT_STATUS,
    SIGPIPE_STATUS,
    SIGTERM_STATUS,
    Terminated,
    sigterm_as_interrupt,
)
from mvcompile.summary import build_summary
from mvcompile.table import format_table, human_count
from mvcompile.train.cli import train as train_command  # imports torch only when it runs
from mvcompile.verbosity import add_verbose_option, set_verbosity

# Options that only act under a condition: {condition: (options, what they act on, when they
# are ignored)}; build passes whether each condition holds.
_CONDITIONAL_OPTIONS = {
    "int8": (("calib_data", "calib_size", "calib_method", "accuracy_budget", "weight_bits",
              "eval_data", "coreml_int8"), "the INT8 model", "without --int8"),
    "ort": (("ort_style",), "the .ort files", "without ort in --targets"),
    "coreml": (("coreml_precision", "coreml_int8", "coreml_input", "coreml_batch"),
               "the Core ML packages", "without coreml in --targets"),
    "random_weights": (("seed",), "the random weights", "with --weights"),
    "checkpoint": (("checkpoint_channels",), "--weights", "without them"),
    "timing": (("threads",), "the latency measurement", "with --latency-runs 0"),
    # bench
    "ort_backend": (("threads", "resolution"), "ONNX Runtime", "for a Core ML model"),
    "coreml_backend": (("compute_units",), "Core ML", "for an ONNX Runtime model"),
}


def _warn_ignored_options(**holds: bool) -> None:
    """An option given where it has no effect (an INT8 option without --int8, a Core ML one
    without the coreml target) is ignored: say so rather than stay silent. ``holds`` says for
    each condition of :data:`_CONDITIONAL_OPTIONS` whether it holds."""
    from click.core import ParameterSource

    ctx = click.get_current_context()
    for condition, held in holds.items():
        names, target, ignored = _CONDITIONAL_OPTIONS[condition]
        given = [f"--{name.replace('_', '-')}" for name in names
                 if ctx.get_parameter_source(name) == ParameterSource.COMMANDLINE]
        if given and not held:
            one = len(given) == 1
            click.secho(f"Note: {', '.join(given)} only {'applies' if one else 'apply'} to "
                        f"{target} and {'is' if one else 'are'} ignored {ignored}.",
                        fg="yellow", err=True)


def _option(ctx: click.Context, name: str) -> click.Parameter:
    return next(p for p in ctx.command.params if p.name == name)


_TRAINED_SETTINGS = {"size": str, "patch_config": str, "num_classes": int, "resolution": int}


def _settings_from_checkpoint(weights: str, **given: Any) -> tuple[Any, ...]:
    """size, patch_config, num_classes, resolution for a build from ``weights``: the values
    recorded by ``mvcompile train`` in the checkpoint where the command line left an option at
    its default (said in a note), the command line's where it set one (the build warns if they
    differ: :func:`mvcompile.builder.trained_otherwise`)."""
    from click.core import ParameterSource

    from mvcompile.graphs.checkpoints import training_metadata

    trained = training_metadata(weights)
    ctx = click.get_current_context()
    adopted = []
    for name, kind in _TRAINED_SETTINGS.items():
        if name not in trained:
            continue
        try:  # the build command's own option type checks the recorded value
            value = _option(ctx, name).type.convert(kind(trained[name]), None, ctx)
        except (ValueError, click.BadParameter):
            continue
        flag = f"--{name.replace('_', '-')} {value}"
        if ctx.get_parameter_source(name) != ParameterSource.COMMANDLINE:
            adopted.append(flag)
            given[name] = value
    if adopted:
        click.secho(f"Note: from the checkpoint's training settings: {', '.join(adopted)}.",
                    fg="yellow", err=True)
    return tuple(given[name] for name in _TRAINED_SETTINGS)


def _resolved_weights(weights: str) -> str:
    """The checkpoint file behind ``--weights`` (a train run folder means its
    best.safetensors), with a note when it is another path."""
    from mvcompile.graphs.checkpoints import resolve_run_weights

    path, note = resolve_run_weights(weights)
    if note:
        click.secho(f"Note: {note}", fg="yellow", err=True)
    return str(path)


PATH = NonEmptyPath()


THREADS_PER_CORE_LIMIT = 4  # --threads above this many per core is refused


def _note_threads(threads: int) -> None:
    """A note when --threads asks for more threads than the machine has cores: the extra
    ones only take turns on the same cores, which slows ONNX Runtime down; an error past
    :data:`THREADS_PER_CORE_LIMIT` per core (100000 threads took ONNX Runtime minutes to
    start, during which it did not answer SIGTERM)."""
    cores = os.cpu_count() or 1
    if threads > THREADS_PER_CORE_LIMIT * cores:
        raise UserError(f"--threads {threads} is far more than this machine's {cores} CPU "
                        f"cores; give at most {THREADS_PER_CORE_LIMIT * cores} (the cores "
                        "themselves are the useful number).")
    if threads > cores:
        click.secho(f"Note: --threads {threads} is more than this machine's {cores} CPU "
                    "cores; the extra threads take turns on them and slow ONNX Runtime down.",
                    fg="yellow", err=True)


def _user_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Turn UserError, an OSError or running out of memory into 'Error: ...' on stderr and exit
    status 1, without a traceback; Ctrl-C and SIGTERM (a job scheduler's or `timeout`'s stop)
    into a one-line note and the shell's status for the signal, 130 or 143; and a reader that
    closed the pipe (`mvcompile info M | head`) into a quiet exit, 141. Outputs are staged and
    moved into place only when complete, so an interrupted command has written nothing."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            with sigterm_as_interrupt():
                return command(*args, **kwargs)
        except UserError as err:
            click.secho(f"Error: {err}", fg="red", err=True)
            sys.exit(1)
        except BrokenPipeError:
            _quiet_stdout()
            sys.exit(SIGPIPE_STATUS)
        except OSError as err:  # disk full, permission denied: staged outputs were removed
            click.secho(f"Error: {os_error_message(err)}", fg="red", err=True)
            sys.exit(1)
        except KeyboardInterrupt as err:
            stopped = "Terminated" if isinstance(err, Terminated) else "Interrupted"
            click.secho(f"\n{stopped}; no output was written.", fg="yellow", err=True)
            sys.exit(SIGTERM_STATUS if isinstance(err, Terminated) else SIGINT_STATUS)
        except Exception as err:  # ONNX Runtime raises its own types; only memory is ours
            message = out_of_memory_message(err)
            if message is None:
                raise
            click.secho(f"Error: {message}", fg="red", err=True)
            sys.exit(1)

    return wrapper


def _quiet_stdout() -> None:
    """Point stdout at /dev/null: its reader has gone, and Python's flush of it at exit would
    raise BrokenPipeError again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
@click.version_option(package_name="mvcompile", prog_name="mvcompile")
def main(verbose: int) -> None:
    """mvcompile: compile and quantize MobileViT for ONNX Runtime and Core ML."""
    set_verbosity(verbose)


BAR_FIXED = 20  # what click draws around the bar: "  [", "]  100%  00:01:02"
BAR_WIDTH, MIN_BAR_WIDTH = 36, 10  # click's default bar width, and the narrowest we draw


def fit_bar(label: str, columns: int | None = None) -> tuple[str, int]:
    """(label, bar width) that fit on one terminal line: a line that wraps is redrawn as a
    new line at every update. The bar narrows first (from 36 to 10 columns); only then is
    the label cut, with '…'."""
    columns = columns or shutil.get_terminal_size().columns
    width = min(BAR_WIDTH, columns - BAR_FIXED - len(label))
    if width >= MIN_BAR_WIDTH:
        return label, width
    room = max(columns - BAR_FIXED - MIN_BAR_WIDTH, 10)
    return (label if len(label) <= room else label[:room - 1] + "…"), MIN_BAR_WIDTH


class _ProgressBars:
    """The builder's Progress protocol drawn as click progress bars on stderr."""

    def __init__(self) -> None:
        self._bar = None

    def start(self, label: str, total: int) -> None:
        self.finish()
        label, width = fit_bar(label)
        self._bar = click.progressbar(length=max(total, 1), label=label, width=width,
                                      file=sys.stderr)
        self._bar.__enter__()

    def advance(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def finish(self) -> None:
        if self._bar is not None:
            self._bar.__exit__(None, None, None)
            self._bar = None


@main.command()
@click.option("--size", type=click.Choice(SIZES), default="xxs", show_default=True,
              help="MobileViT variant: xxs (1.3 M params), xs (2.3 M) or s (5.6 M). With "
                   "--weights from `mvcompile train`, this and --resolution, --patch-config and "
                   "--num-classes default to the values it was trained with.")
@click.option("--weights", type=PATH, default=None,
              help="Checkpoint to load: Hugging Face folder, .safetensors, .bin, an ml-cvnets "
                   ".pt, or a mvcompile train run folder (its best.safetensors; its last.pt "
                   "means last.safetensors). Size, patch config, classes and resolution "
                   "recorded by mvcompile train apply unless given. Without it the weights "
                   "are seeded random (not trained).")
@click.option("--checkpoint-channels", type=click.Choice(CHANNEL_CHOICES), default="auto",
              show_default=True,
              help="The colour order the --weights were trained on. auto: BGR for a Hugging "
                   "Face folder whose preprocessor_config.json flips channels (Apple's "
                   "checkpoints do) and for ml-cvnets checkpoints, else RGB. The built model "
                   "takes RGB either way: for BGR weights the stem convolution's input "
                   "channels are reversed (exact).")
@click.option("--resolution", type=int, default=256, show_default=True,
              help="Square input size; must be a multiple of 64 (stride 32 and the patches).")
@click.option("--patch-config", type=click.Choice(["A", "B"]), default="A", show_default=True,
              help="Patch sizes of the three MobileViT blocks: A = (2,2,2), B = (8,4,2), "
                   "faster and slightly less accurate.")
@click.option("--num-classes", type=int, default=1000, show_default=True,
              help="Classifier outputs; must match the checkpoint when --weights is given.")
@click.option("-o", "--out-dir", type=PATH, default=None,
              help="Output folder for model.onnx, model_int8.onnx, report.json and the "
                   "--targets artifacts (.ort, .mlpackage) [default: out/mobilevit_SIZE].")
@click.option("--no-passes", is_flag=True,
              help="Skip the graph passes and write the plain authored graph (for "
                   "comparison); --int8 then quantizes, and --targets then lower, that plain "
                   "graph too.")
@click.option("--int8", is_flag=True,
              help="Also calibrate and write an INT8 (QDQ) model, model_int8.onnx.")
@click.option("--calib-data", type=PATH, default=None,
              help="Calibration images: a folder (searched recursively), a preprocessed .npy "
                   "[N,3,R,R] array, or `digits` (scikit-learn's, its training split). "
                   "Default: bundled scikit-image photos.")
@click.option("--calib-size", type=click.IntRange(min=1), default=32, show_default=True,
              help="How many calibration images to use.")
@click.option("--calib-method", type=click.Choice(list(OBSERVER_NAMES)), default="percentile",
              show_default=True, help="How activation ranges are chosen from calibration data.")
@click.option("--accuracy-budget", type=FloatRange(0, 100), default=None,
              help="Max top-1 disagreement with FP32 on the calibration images, in percent; "
                   "the most sensitive layers stay in float until it is met (at most a "
                   "quarter of them; if it cannot be met, the build fails and writes nothing).")
@click.option("--weight-bits", type=click.Choice(["auto", "7", "8"]), default="auto",
              show_default=True,
              help="INT8 weight range. 7 bits avoid the int16 saturation of the u8*s8 kernels "
                   "of x86 CPUs without VNNI (measured accuracy loss there); 8 use the full "
                   "range (VNNI x86, ARM phones). auto: 7 on an x86 CPU without VNNI (or "
                   "whose flags cannot be read), else 8, judged on the building machine; "
                   "give 7 for a model that will run on such a CPU elsewhere, 8 for one built "
                   "there for a phone or Core ML.")
@click.option("--eval-data", type=PATH, default=None,
              help="With --int8: images to report FP32 and INT8 accuracy on: a folder (one "
                   "subfolder per class gives labels), a preprocessed .npy array, or `digits` "
                   "(its validation split).")
@click.option("--targets", default="onnx", show_default=True,
              help="Comma-separated artifacts to write: onnx (always), ort (ONNX Runtime mobile "
                   ".ort + operator configs), coreml (.mlpackage ML Program).")
@click.option("--ort-style", type=click.Choice(["fixed", "runtime"]), default="fixed",
              show_default=True, help=".ort optimization style: fixed for the CPU/XNNPACK "
                                      "execution providers, runtime for NNAPI/Core ML.")
@click.option("--coreml-precision", type=click.Choice(["fp16", "fp32"]), default="fp16",
              show_default=True, help="Core ML compute precision (Apple ships fp16).")
@click.option("--coreml-int8", type=click.Choice(["w8a8", "weight-only"]), default="w8a8",
              show_default=True, help="Core ML form of the INT8 model: W8A8 (iOS17) or int8 "
                                      "weights only (iOS16, for devices without int8 compute).")
@click.option("--coreml-input", type=click.Choice(["image", "tensor"]), default="image",
              show_default=True, help="Core ML input: an RGB image (scaled by 1/255 inside) or "
                                      "a float32 [B,3,H,W] tensor in [0,1].")
@click.option("--coreml-batch", type=click.IntRange(min=1), default=1, show_default=True,
              help="Fixed batch size of the Core ML model (Core ML needs static shapes).")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Seed for the random weights used without --weights.")
@click.option("--latency-runs", type=click.IntRange(min=0), default=20, show_default=True,
              help="Timed ONNX Runtime runs for the latency in the summary (0 skips timing).")
@click.option("--threads", type=click.IntRange(min=1), default=2, show_default=True,
              help="ONNX Runtime intra-op threads for the latency measurement.")
@_user_errors
def build(size: str, weights: str | None, checkpoint_channels: str, resolution: int,
          patch_config: str, num_classes: int, out_dir: str | None, no_passes: bool,
          int8: bool, calib_data: str | None, calib_size: int, calib_method: str,
          accuracy_budget: float | None, weight_bits: str, eval_data: str | None,
          targets: str, ort_style: str, coreml_precision: str, coreml_int8: str,
          coreml_input: str, coreml_batch: int, seed: int, latency_runs: int,
          threads: int) -> None:
    """Build MobileViT as an ONNX graph, compile it (and quantize it with --int8), write the
    models and report.json, and print a summary."""
    from mvcompile.builder import BuildOptions
    from mvcompile.builder import build as run_build

    target_names = tuple(t.strip() for t in targets.split(",") if t.strip())
    _note_threads(threads)
    _warn_ignored_options(int8=int8, ort="ort" in target_names,
                          coreml="coreml" in target_names, random_weights=not weights,
                          checkpoint=bool(weights),
                          timing=latency_runs > 0)
    if weights:
        weights = _resolved_weights(weights)
        size, patch_config, num_classes, resolution = _settings_from_checkpoint(
            weights, size=size, patch_config=patch_config, num_classes=num_classes,
            resolution=resolution)
    options = BuildOptions(size=size, weights=weights, channel_order=checkpoint_channels,
                           resolution=resolution,
                           patch_config=patch_config, num_classes=num_classes,
                           out_dir=out_dir or f"out/mobilevit_{size}", seed=seed,
                           latency_runs=latency_runs, threads=threads, passes=not no_passes,
                           int8=int8, calib_data=calib_data, calib_size=calib_size,
                           calib_method=calib_method, accuracy_budget=accuracy_budget,
                           weight_bits=None if weight_bits == "auto" else int(weight_bits),
                           eval_data=eval_data, targets=target_names,
                           ort_style=ort_style, coreml_precision=coreml_precision,
                           coreml_int8=coreml_int8, coreml_input=coreml_input,
                           coreml_batch=coreml_batch)
    if weights is None:
        click.secho(f"Note: no --weights given, so the weights are random (seed {seed}); "
                    "the model is not trained.", fg="yellow", err=True)
    if int8 and calib_data is None:
        click.secho("Note: no --calib-data given; calibrating on the bundled scikit-image "
                    "sample photos.", fg="yellow", err=True)
    progress = _ProgressBars()
    started = time.perf_counter()
    try:
        result = run_build(options, progress)
    finally:
        progress.finish()
    click.echo(build_summary(result.report, result.files))
    click.echo(f"\nBuilt in {time.perf_counter() - started:.1f} s.")


@main.command()
@click.argument("model", type=PATH)
@_user_errors
def info(model: str) -> None:
    """Print parameters, MACs, op histogram, I/O shapes and opset of any ONNX MODEL."""
    proto = onnx_io.load_model(model)
    s = analysis.summarize(proto)
    rows: list[tuple[str, object]] = [
        ("parameters", f"{s.parameters:,} ({human_count(s.parameters)})"),
        _macs_row(s),
        ("nodes", s.node_count),
        ("opsets", ", ".join(f"{d} {v}" for d, v in s.opsets.items())),
        ("IR version", s.ir_version),
        ("onnx.checker", _checker_verdict(model)),
    ]
    rows += [(f"input {name}", analysis.format_shape(dims)) for name, dims in s.inputs]
    rows += [(f"output {name}", analysis.format_shape(dims)) for name, dims in s.outputs]
    click.echo(format_table(rows, header=(model, "")))
    click.echo()
    click.echo(format_table(list(s.op_histogram.items()), header=("op", "count")))


def _macs_row(s: analysis.ModelSummary) -> tuple[str, str]:
    """info's MACs row: at the inputs' own batch (1 if symbolic), or why there is no count
    (an input size past the batch is symbolic: it was counted at 1)."""
    for name, dims in s.inputs:
        if any(not isinstance(d, int) for d in dims[1:]):
            fix = " (`mvcompile optimize --resolution R` fixes it)" if len(dims) == 4 else ""
            return ("MACs", f"unknown: input {name} {analysis.format_shape(dims)} has a "
                            f"symbolic size{fix}")
    batches = {dims[0] for _, dims in s.inputs if dims and isinstance(dims[0], int)}
    if len(batches) > 1:
        return ("MACs (inputs' own batches)", human_count(s.macs))
    batch = batches.pop() if batches else 1
    count = len(s.macs_unknown_nodes)
    unknown = (f" (and {count} matrix node{'s' * (count != 1)} not counted: shapes unknown, "
               f"or an op with no MAC rule: {', '.join(s.macs_unknown_nodes[:3])}"
               f"{', ...' if len(s.macs_unknown_nodes) > 3 else ''})"
               if s.macs_unknown_nodes else "")
    return (f"MACs (batch {batch})", human_count(s.macs) + unknown)


def _checker_verdict(path: str) -> str:
    """'valid (full check)', or why onnx.checker.check_model(full_check=True) refuses the
    model at ``path`` (read from the path, so that external data and > 2 GiB models work)."""
    import onnx

    from mvcompile.errors import first_line

    try:
        onnx.checker.check_model(path, full_check=True)
    except Exception as err:  # onnx raises ValidationError, InferenceError and others
        return f"INVALID: {first_line(err)}"
    return "valid (full check)"


@main.command(name="eval")
@click.argument("model", type=PATH)
@click.option("--data", required=True, type=PATH,
              help="Image folder (one subfolder per class gives labels), a preprocessed .npy "
                   "array, or `digits` (its validation split).")
@click.option("--reference", type=PATH, default=None,
              help="FP32 model (.onnx or .ort) to compare with (top-1 agreement, SQNR). "
                   "Default: model.onnx (model.ort) beside a model_int8.onnx (model_int8.ort) "
                   "written by `mvcompile build`.")
@click.option("--limit", type=click.IntRange(min=1), default=None,
              help="Use at most this many images.")
@_user_errors
def evaluate(model: str, data: str, reference: str | None, limit: int | None) -> None:
    """Report top-1 accuracy of MODEL (an .onnx or ONNX Runtime .ort file) on --data and,
    against an FP32 reference, top-1 agreement and output SQNR. A model built from a checkpoint
    that names its classes has their names recorded: a labelled folder is matched to them by
    name, and one with classes the model lacks is not scored."""
    from mvcompile.calibration.data import skipped_note
    from mvcompile.evaluate import evaluate_file, find_reference

    reference = reference or find_reference(model)
    with stages.reporting_to(_ProgressBars()):
        report = evaluate_file(model, data, reference, limit)
    rows: list[tuple[str, object]] = [("images", f"{report['images']} ({report['source']})")]
    if report.get("skipped"):
        rows.append(("data", skipped_note(report["skipped"])))
    if reference:
        rows.append(("reference", reference))
        rows.append(("top-1 agreement", f"{100 * report['top1_agreement']:.2f}%"))
        rows.append(("output SQNR", f"{report['sqnr_db']:.1f} dB"))
    if "top1_int8" in report:
        rows.append(("top-1 (reference)", f"{100 * report['top1_fp32']:.2f}%"))
        rows.append(("top-1 (model)", f"{100 * report['top1_int8']:.2f}%"))
    elif "top1_fp32" in report:
        rows.append(("top-1", f"{100 * report['top1_fp32']:.2f}%"))
    else:
        rows.append(("top-1", report["labels"]))
    rows += [("note", note) for note in report.get("notes", [])]
    click.echo(format_table(rows, header=(model, "")))


main.add_command(train_command, name="train")


_WHY_WIDTH = 90  # characters of a refusal reason in optimize's table
# What optimize's table says of the rules it leaves out (optimize.rule_rows)
RULES_HIDDEN = "no full pattern in this model, or nothing to clean up"


@main.command()
@click.argument("model", type=PATH)
@click.option("-o", "--output", required=True, type=PATH,
              help="Where to write the result, one .onnx file (weights inline); it may be the "
                   "input. A model it replaces loses the external data files that only it used.")
@click.option("--target", type=click.Choice(["ort", "mobile"]), default="ort", show_default=True,
              help="ort: ONNX Runtime contrib ops where faster; mobile: standard ONNX only.")
@click.option("--tolerance", type=FloatRange(min=0), default=1e-4, show_default=True,
              help="Largest difference of each output element from the input model's on "
                   "random inputs, relative to the element's magnitude where that is above "
                   "1 (and never below float rounding at the output's scale).")
@click.option("--measure/--no-measure", default=True, show_default=True,
              help="--target ort: time the result with and without the attention head-split "
                   "fold on this machine's ONNX Runtime and keep it unless the model runs "
                   "at least 3% faster without it (timings: when the two are close, "
                   "runs can choose differently). --no-measure applies every rewrite that "
                   "matches, the same each run.")
@click.option("--batch", type=click.IntRange(min=1), default=None,
              help="Fix a symbolic batch dimension of the inputs to this size (the result then "
                   "takes only it). Dynamic-batch torch exports compute their reshapes from "
                   "the batch at run time, which blocks the unfold/fold rewrites; mobile apps "
                   "run batch 1. [default: keep the model's batch; a symbolic one is "
                   "rewritten at batch 1 and 2 and the result generalised to any batch, "
                   "checked at batch 1, 2 and 3, where it can be]")
@click.option("--resolution", type=click.IntRange(min=1), default=None, metavar="R",
              help="Fix a symbolic height and width of [N, C, H, W] (or [N, H, W, C]) inputs "
                   "to R; the result then takes only R×R images. Without it, the "
                   "check fills them like the batch (1×1 images), which a ViT cannot run, and "
                   "the layout rewrites need static shapes.")
@_user_errors
def optimize(model: str, output: str, target: str, tolerance: float, measure: bool,
             batch: int | None, resolution: int | None) -> None:
    """Run onnxsim and the mvcompile passes on any ONNX MODEL; check numerics against it and
    write the result to -o OUTPUT."""
    from mvcompile.optimize import optimize_file

    with stages.reporting_to(_ProgressBars()):
        report = optimize_file(model, output, target=target, tolerance=tolerance,
                               choose_by_latency=measure, batch=batch, resolution=resolution)
    try:  # the output is in place: an interrupt now must not say that nothing was written
        _optimize_summary(model, output, report)
    except KeyboardInterrupt:
        click.secho(f"\nInterrupted; {output} was already written.", fg="yellow", err=True)
        sys.exit(130)


def _optimize_summary(model: str, output: str, report: dict) -> None:
    """optimize's tables and notes for the written ``output``."""
    from mvcompile.optimize import rule_rows, storage_note
    from mvcompile.table import human_bytes

    nodes, transposes, size = report["nodes"], report["transposes"], report["size"]
    storage = report.get("storage") or {}
    casts = (f" ({storage['restored']} of them Casts of {'/'.join(storage['types'])} weights)"
             if storage.get("restored") else "")
    rows: list[tuple[str, object]] = [
        ("nodes", f"{nodes['input']} -> onnxsim {nodes['onnxsim']} -> {nodes['optimized']}"
                  + casts),
        ("Transpose", f"{transposes['input']} -> {transposes['optimized']}"),
        ("size", f"{human_bytes(size['input'])} -> {human_bytes(size['optimized'])}"),
        ("max abs diff", f"{report['max_abs_diff']:.3g}"),
        *((c["stage"], f"{'kept' if c['kept'] else 'dropped'}: fastest ORT run "
                       f"{c['min_ms_with']:.2f} ms with, {c['min_ms_without']:.2f} ms without")
          for c in report["measured_choices"]),
        *((("batch", f"fixed to {report['batch']}"),) if report["batch"] else ()),
        *((("batch", "symbolic (rewritten at batch 1 and generalised)"),)
          if report.get("batch_generalised") else ()),
        *((("height, width", f"fixed to {report['resolution']}"),)
          if report.get("resolution") else ()),
        ("written", output),
    ]
    click.echo(format_table(rows, header=(model, "")))
    passes, hidden, shortened = rule_rows(report["pipeline"], _WHY_WIDTH)
    click.echo()
    if passes:
        click.echo(format_table(passes, header=("rule", "matches", "why not")))
    if hidden:
        click.echo(f"{hidden} {'other ' if passes else ''}rule{'s' * (hidden != 1)}: "
                   f"{RULES_HIDDEN}")
    if shortened or hidden:
        click.echo("(`mvcompile -v optimize ...` logs in full why each rule did not apply"
                   + ("; the reasons above are cut at the table's width)" if shortened else ")"))
    if report.get("removed_data_files"):
        click.echo("Removed the external data files that the replaced model used: "
                   + ", ".join(report["removed_data_files"]))
    note = storage_note(report)
    if note:
        click.secho(f"Note: {note}", fg="yellow", err=True)
    if report["symbolic_batch_blocked"]:
        click.secho("Note: the model's batch is symbolic, and the layout rewrites "
                    "(unfold/fold, attention head split) need static shapes; rewriting at a "
                    "fixed batch and generalising the result failed (`mvcompile -v optimize "
                    "...` logs why). `--batch 1` fixes the batch so that they can apply.",
                    fg="yellow", err=True)
    if report.get("overridable_inputs"):
        count = len(report["overridable_inputs"])
        click.secho(f"Note: {count} initializer{'s are' if count > 1 else ' is'} also graph "
                    "input(s), a default the caller may override (torch.onnx.export's "
                    "keep_initializers_as_inputs=True does this to every weight); they stay "
                    "inputs, so rewrites that need constant weights (BatchNorm and attention "
                    "folds) leave their nodes alone. Export without it to let them apply.",
                    fg="yellow", err=True)
    if report.get("unknown_dims_blocked"):
        click.secho("Note: some rewrites need static shapes and found sizes computed at run "
                    f"time: {report['unknown_dims_blocked']}.", fg="yellow", err=True)


@main.command()
@click.argument("model", type=PATH)
@click.option("--backend", type=click.Choice(["ort", "coreml"]), default=None,
              help="ort: ONNX Runtime CPU (.onnx, .ort); coreml: MLModel.predict (.mlpackage, "
                   "macOS only) [default: from the file suffix].")
@click.option("--threads", type=click.IntRange(min=1), default=2, show_default=True,
              help="ONNX Runtime intra-op threads.")
@click.option("--runs", type=click.IntRange(min=1), default=100, show_default=True,
              help="Timed runs.")
@click.option("--warmup", type=click.IntRange(min=0), default=10, show_default=True,
              help="Untimed runs first.")
@click.option("--compute-units", type=click.Choice(["all", "cpu_and_ne", "cpu_only",
                                                    "cpu_and_gpu"]),
              default="all", show_default=True, help="Core ML compute units.")
@click.option("--resolution", type=click.IntRange(min=1), default=None,
              help="Size for symbolic H and W of [N, C, H, W] inputs (required when they are "
                   "symbolic; a symbolic batch is timed as 1).")
@_user_errors
def bench(model: str, backend: str | None, threads: int, runs: int, warmup: int,
          compute_units: str, resolution: int | None) -> None:
    """Time MODEL: median, p90 and min latency and throughput at the model's batch (1 when
    the batch is symbolic); the table lists the input shapes timed. ONNX Runtime runs this one
    session alone with thread spinning on (its default), whereas `mvcompile build` times its
    models interleaved with spinning off, so the two commands' latencies differ and should
    not be compared with each other."""
    from mvcompile import bench as bench_module

    _note_threads(threads)
    with click.progressbar(length=runs, label="Timing", file=sys.stderr) as bar:
        result = bench_module.bench(model, backend, threads=threads, runs=runs, warmup=warmup,
                                    compute_units=compute_units, on_run=lambda: bar.update(1),
                                    resolution=resolution)
    _warn_ignored_options(ort_backend=result.backend == "ort",
                          coreml_backend=result.backend == "coreml")
    click.echo(format_table(bench_module.format_rows(result), header=(model, "")))


for _command in main.commands.values():  # every subcommand, train included, also takes -v
    add_verbose_option(_command)  # and --version
    click.version_option(package_name="mvcompile", prog_name="mvcompile")(_command)


if __name__ == "__main__":
    main()
