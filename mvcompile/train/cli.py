"""``mvcompile train``: the click command. Printing happens here; the loop only logs.

Registered lazily by :mod:`mvcompile.cli`, so that ``mvcompile --help`` works without torch.
"""

from __future__ import annotations

import os
import shlex
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import click
from click.core import ParameterSource

from mvcompile.click_types import FloatRange, NonEmptyPath
from mvcompile.errors import UserError, os_error_message, out_of_memory_message
from mvcompile.graphs.mobilevit import SIZES
from mvcompile.interrupts import (
    SIGINT_STATUS,
    SIGTERM_STATUS,
    Terminated,
    sigterm_as_stop_request,
)
from mvcompile.table import format_table

if TYPE_CHECKING:
    from mvcompile.train.loop import TrainResult
    from mvcompile.train.options import TrainOptions

EXAMPLES = """
\b
Examples:
  mvcompile train --data digits --resolution 64 --epochs 40 --batch-size 64
  mvcompile train --data ~/flowers --val-split 0.1 --resolution 128 --epochs 100
  mvcompile train --resume runs/digits_xxs
  mvcompile train --data ~/flowers --init-weights ~/hf/mobilevit-xx-small --epochs 20
\b
On 8 GPUs (ImageNet, the paper's recipe: 128 images per GPU at 256, 300 epochs):
  torchrun --standalone --nproc_per_node 8 -m mvcompile.train --data /data/imagenet \\
      --size s --resolution 256 --batch-size 128 --epochs 300 --ema-decay 0.9995 \\
      --workers 8 --amp --name imagenet_s
\b
--resume reuses the options saved with the run; options given on its command line override
them (e.g. --epochs 400 to train longer). SIGTERM (e.g. from a job scheduler) stops a run like
Ctrl-C does, keeping the last complete epoch, with exit status 143 (130 for Ctrl-C).
"""
CHECK_BAR_AFTER_S = 1.0  # the image check shows a progress bar once it has run this long
PROBABILITY = FloatRange(0.0, 1.0, max_open=True)
NON_NEGATIVE = FloatRange(min=0.0)
NON_EMPTY = NonEmptyPath()  # a path, or `digits` for --data: never ""


class ProgressReporter:
    """A click progress bar per epoch (loss, lr, batch resolution) and a line per epoch; a
    bar for the image check when it takes a while; notes as yellow lines."""

    def __init__(self) -> None:
        self.bar = None
        self.status = ""
        self.check_started: float | None = None

    def note(self, message: str) -> None:
        click.secho(f"Note: {message}", fg="yellow", err=True)

    def images_checked(self, done: int, total: int) -> None:
        """Progress of the image check: a bar appears once it has run CHECK_BAR_AFTER_S."""
        now = time.perf_counter()
        if self.check_started is None:
            self.check_started = now
        if self.bar is None and now - self.check_started >= CHECK_BAR_AFTER_S and done < total:
            self.bar = click.progressbar(length=total, label="checking images",
                                         file=sys.stderr, show_eta=True, width=24)
            self.bar.__enter__()
        if self.bar is not None:
            self.bar.update(done - self.bar.pos)
        if done >= total:
            self.close()
            self.check_started = None

    def epoch_start(self, epoch: int, epochs: int, batches: int) -> None:
        self.status = ""
        self.bar = click.progressbar(length=batches, label=f"epoch {epoch}/{epochs}",
                                     file=sys.stderr, item_show_func=lambda _: self.status,
                                     show_eta=True, width=24)
        self.bar.__enter__()

    def batch_end(self, loss: float, lr: float, resolution: int) -> None:
        self.status = f"loss {loss:.4f}  lr {lr:.2e}  {resolution}px"
        self.bar.update(1)

    def epoch_end(self, row: dict) -> None:
        self.close()
        ema = (f"  EMA val acc {row['ema_val_acc']:.2%}"
               if row.get("ema_val_acc") is not None else "")
        click.echo(f"epoch {row['epoch']}: train loss {row['train_loss']:.4f}  val loss "
                   f"{row['val_loss']:.4f}  val acc {row['val_acc']:.2%}{ema}  "
                   f"({row['seconds']:.0f} s)", err=True)

    def close(self) -> None:
        """End the bar showing (an epoch's or the image check's), if any; also when an epoch
        stops half-way."""
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
            self.bar = None


@click.command(epilog=EXAMPLES)
@click.option("--data", type=NON_EMPTY, default="digits", show_default=True,
              help="`digits` (built-in scikit-learn digits), or an image folder: DIR/<class>/"
                   "*.jpg, or DIR/train/<class>/ with DIR/val/<class>/. Every image file is "
                   "opened before training (Pillow's header check); if any cannot be read, "
                   "the run stops at once with a list of them.")
@click.option("--val-split", type=float, default=None,
              help="Fraction of each class held out for validation when there is no val/ "
                   "folder [default: 0.1; digits 0.2]. The split is fixed (seed 0).")
@click.option("--size", type=click.Choice(SIZES), default="xxs", show_default=True,
              help="MobileViT variant to train.")
@click.option("--patch-config", type=click.Choice(["A", "B"]), default="A", show_default=True,
              help="A = (2,2,2), B = (8,4,2).")
@click.option("--resolution", type=int, default=256, show_default=True,
              help="Base resolution: validation size and centre of the multi-scale set "
                   "(multiple of 64).")
@click.option("--multiscale/--no-multiscale", default=True, show_default=True,
              help="Multi-scale sampler: {160..320}·R/256 snapped to multiples of 64.")
@click.option("--epochs", type=click.IntRange(min=1), default=300, show_default=True,
              help="Passes over the training set (the paper: 300 on ImageNet).")
@click.option("--batch-size", type=click.IntRange(min=1), default=128, show_default=True,
              help="Images per process at the base resolution; the multi-scale sampler scales "
                   "it by (R/r)² at resolution r.")
@click.option("--lr", type=FloatRange(min=0.0, min_open=True), default=0.002,
              show_default=True, help="Peak learning rate.")
@click.option("--lr-init", type=NON_NEGATIVE, default=0.0002, show_default=True,
              help="Learning rate at the start of the warm-up.")
@click.option("--lr-min", type=NON_NEGATIVE, default=0.0002, show_default=True,
              help="Learning rate at the end of the cosine decay.")
@click.option("--warmup-steps", type=click.IntRange(min=0), default=None,
              help="Warm-up steps [default: min(3000, 5% of all steps)].")
@click.option("--weight-decay", type=NON_NEGATIVE, default=0.01, show_default=True,
              help="AdamW weight decay.")
@click.option("--label-smoothing", type=PROBABILITY, default=0.1, show_default=True,
              help="Label smoothing of the cross-entropy loss.")
@click.option("--ema-decay", type=float, default=None,
              help="Keep an EMA of the weights with this decay (e.g. 0.9995) and export it.")
@click.option("--dropout", type=PROBABILITY, default=0.0, show_default=True,
              help="Dropout after attention and FFN.")
@click.option("--classifier-dropout", type=PROBABILITY, default=0.1, show_default=True,
              help="Dropout before the classifier.")
@click.option("--crop-scale", type=float, default=None,
              help="Smallest area fraction of the random resized crop [default: 0.08; "
                   "digits 0.6].")
@click.option("--flip/--no-flip", default=None,
              help="Random horizontal flip [default: on; digits off].")
@click.option("--subset", type=click.IntRange(min=1), default=None,
              help="Train on a random subset of this many images (quick experiments); if "
                   "there are fewer, all are used.")
@click.option("--seed", type=click.IntRange(0, 2**32 - 1), default=0, show_default=True,
              help="Seed for initialisation, sampling and augmentation.")
@click.option("--workers", type=click.IntRange(min=0), default=0, show_default=True,
              help="Data loader worker processes per training process.")
@click.option("--amp", is_flag=True, help="bfloat16 autocast on CUDA (no effect on CPU).")
@click.option("--name", default=None,
              help="Run folder RUNS_DIR/NAME [default: DATA_SIZE, e.g. digits_xxs]; a name, "
                   "not a path (use --runs-dir for the folder).")
@click.option("--runs-dir", type=NON_EMPTY, default="runs", show_default=True,
              help="Folder that holds the run folders.")
@click.option("--resume", type=NON_EMPTY, default=None,
              help="Continue a run where it stopped: a run folder or its last.pt. Its saved "
                   "options apply unless given again here.")
@click.option("--overwrite", is_flag=True, help="Start over in an existing run folder.")
@click.option("--init-weights", type=NON_EMPTY, default=None,
              help="Fine-tune: start from these weights instead of a random initialisation: "
                   "a run folder of mvcompile train (its best.safetensors) or a .safetensors, "
                   "Hugging Face folder or .bin/.pt, as `mvcompile build --weights` reads. A "
                   "classifier for another number of classes is re-initialised (with a note); "
                   "any other mismatch is an error. Not with --resume.")
def train(**kwargs: object) -> None:
    """Train MobileViT with the paper's recipe; writes runs/NAME/best.safetensors."""
    try:
        import mvcompile.train.loop  # noqa: F401  (imports torch and safetensors)
    except ImportError as err:
        _fail(f"mvcompile train needs PyTorch ({err}). Install the [train] extra: "
              "pip install 'mvcompile[train]'.")
    except KeyboardInterrupt:
        _interrupted_before_start()
    try:
        try:
            options = _options(kwargs)
        except KeyboardInterrupt:  # reading --resume's checkpoint
            _interrupted_before_start()
        result = _run(options)
    except UserError as err:
        _fail(_without_worker_traceback(str(err)))
    except OSError as err:  # disk full, permission denied; files are replaced atomically
        _fail(os_error_message(err))
    except (MemoryError, RuntimeError) as err:  # torch's allocator raises RuntimeError
        message = out_of_memory_message(err)
        if message is None:
            raise
        _fail(message)
    if not _is_main_process():  # under torchrun, one note and summary, not one per process
        return
    if result.start_epoch >= options.epochs:
        done = result.start_epoch
        click.secho(f"Note: {result.run_dir} has {done} epoch{'s' if done != 1 else ''} done "
                    f"and --epochs is {options.epochs}, so nothing was trained; pass --epochs "
                    f"M (> {done}) to train longer.", fg="yellow", err=True)
    click.echo(summary(options, result))


def _options(kwargs: dict) -> TrainOptions:
    """The options of this run; with --resume, the saved ones overridden by explicit ones."""
    from mvcompile.train.checkpoint import saved_options
    from mvcompile.train.options import TrainOptions, resumed_options

    if kwargs["data"] != "digits":  # a run resumed from another folder finds the same data
        kwargs = {**kwargs, "data": os.path.abspath(os.path.expanduser(kwargs["data"]))}
    if not kwargs["resume"]:
        return TrainOptions(**kwargs)
    if kwargs["init_weights"]:
        raise UserError("--init-weights starts a new run from weights; --resume continues a "
                        "run from its own weights and training state. Drop one (to fine-tune "
                        f"from {kwargs['resume']}, pass it as --init-weights under a new --name).")
    ctx = click.get_current_context()
    explicit = {name for name in kwargs
                if ctx.get_parameter_source(name) not in (None, ParameterSource.DEFAULT)}
    return resumed_options(saved_options(kwargs["resume"]), kwargs, explicit)


def _run(options: TrainOptions) -> TrainResult:
    """Train; on Ctrl-C or SIGTERM, say what was saved and how to continue, and exit with
    the shell's status for the signal (130, 143)."""
    from mvcompile.train.loop import train as run_training

    before = _checkpoint_stamp(options.run_dir())
    reporter = ProgressReporter()
    try:
        with sigterm_as_stop_request():
            return run_training(options, reporter)
    except KeyboardInterrupt as err:
        reporter.close()
        if _is_main_process():  # under torchrun, one message rather than one per process
            click.secho(f"\n{_interrupted_message(options, before)}", fg="yellow", err=True)
            table = _interrupted_summary(options, before)
            if table:
                click.echo(table)
        sys.exit(SIGTERM_STATUS if isinstance(err, Terminated) else SIGINT_STATUS)
    finally:
        reporter.close()  # an error half-way through an epoch: its message on a line of its own


def _is_main_process() -> bool:
    """Rank 0 under torchrun, or a plain single process."""
    return os.environ.get("RANK", "0") == "0"


def summary(options: TrainOptions, result: TrainResult) -> str:
    """The closing table: run folder, epochs, best accuracy, files, the next command."""
    rows = _summary_rows(options, result.run_dir, _epochs(options, result), result.history,
                         result.best)
    return format_table(rows, header=("mvcompile train", "summary"))


def _interrupted_summary(options: TrainOptions, before: tuple[int, int] | None) -> str | None:
    """The closing table of an interrupted run, read back from its last.pt (the last complete
    epoch); None when there is none, or when --overwrite stopped before replacing it."""
    import torch

    from mvcompile.train.checkpoint import LAST, read_checkpoint

    run_dir = options.run_dir()
    if _interrupt_left(options, before) != SAVED:
        return None
    try:
        state = read_checkpoint(run_dir / LAST, torch.device("cpu"))
    except UserError:  # replaced or damaged meanwhile: the message above still holds
        return None
    if not isinstance(state.get("epoch"), int):  # not a checkpoint train wrote
        return None
    epochs = f"{state['epoch']} of {options.epochs} saved, then interrupted"
    rows = _summary_rows(options, run_dir, epochs, state.get("history") or [],
                         state.get("best") or {})
    rows.append(("resume", shlex.join(["mvcompile", "train", "--resume", str(run_dir)])))
    return format_table(rows, header=("mvcompile train", "summary"))


def _summary_rows(options: TrainOptions, run_dir: Path, epochs: str, history: list[dict],
                  best: dict) -> list[tuple[str, object]]:
    """Run folder, epochs, best and last accuracy, the files, and the build command."""
    from mvcompile.train import outputs

    rows: list[tuple[str, object]] = [("run folder", run_dir), ("epochs", epochs)]
    if options.init_weights:
        rows.append(("started from", options.init_weights))
    if best.get("epoch"):
        which = " (EMA weights)" if options.ema_decay else ""
        rows.append(("best val acc", f"{best['val_acc']:.2%} at epoch {best['epoch']}{which}"))
    if history:
        last = history[-1]
        if last.get("ema_val_acc") is not None:  # the EMA weights are what the files hold
            rows.append(("last val acc", f"{last['ema_val_acc']:.2%} (EMA weights; the "
                                         f"trained weights {last['val_acc']:.2%})"))
        else:
            rows.append(("last val acc", f"{last['val_acc']:.2%}"))
    order = (outputs.BEST, outputs.LAST_WEIGHTS, outputs.LAST, outputs.RUN_INFO,
             outputs.METRICS, outputs.CURVES)
    files = [name for name in order if (run_dir / name).is_file()]
    rows.append(("files", ", ".join(files) or "none"))
    if outputs.BEST in files:
        rows.append(("next", _build_command(run_dir / outputs.BEST, run_dir.name)))
    return rows


def _epochs(options: TrainOptions, result: TrainResult) -> str:
    """'3 of 3, 42 s', or for a resumed run '3 of 3 (resumed after epoch 1: 2 now, 30 s)'."""
    now = [row for row in result.history if row["epoch"] > result.start_epoch]
    took = _duration(sum(row.get("seconds", 0.0) for row in now))
    text = f"{len(result.history)} of {options.epochs}"
    if not result.start_epoch:
        return f"{text}, {took}"
    return f"{text} (resumed after epoch {result.start_epoch}: {len(now)} now, {took})"


def _build_command(weights: Path, name: str) -> str:
    """The build of the trained weights; build reads size, patch config, class count and
    resolution from the checkpoint's header, so only the weights and an output folder."""
    return shlex.join(["mvcompile", "build", "--weights", str(weights), "-o", f"out/{name}"])


def _duration(seconds: float) -> str:
    """37 -> '37 s'; 5400 -> '1 h 30 min'."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    return f"{minutes} min" if minutes < 90 else f"{minutes // 60} h {minutes % 60} min"


def _checkpoint_stamp(run_dir: Path) -> tuple[int, int] | None:
    """Identifies the run folder's last.pt (each save replaces the file): None if absent."""
    from mvcompile.train.checkpoint import LAST

    try:
        stat = (run_dir / LAST).stat()
    except OSError:
        return None
    return stat.st_ino, stat.st_mtime_ns


NOTHING, UNTOUCHED, SAVED = "nothing", "untouched", "saved"


def _interrupt_left(options: TrainOptions, before: tuple[int, int] | None) -> str:
    """What an interrupt left in the run folder: :data:`NOTHING` (no last.pt),
    :data:`UNTOUCHED` (--overwrite stopped before replacing the earlier run's last.pt, whose
    stamp was ``before``), or :data:`SAVED` (a resumable epoch of this run)."""
    now = _checkpoint_stamp(options.run_dir())
    if now is None:
        return NOTHING
    return UNTOUCHED if options.overwrite and now == before else SAVED


def _interrupted_message(options: TrainOptions, before: tuple[int, int] | None) -> str:
    """What an interrupt left, in words (see :func:`_interrupt_left`)."""
    run_dir = options.run_dir()
    left = _interrupt_left(options, before)
    if left == NOTHING:
        return (f"Interrupted before the first epoch ended; no epoch was saved, so there is "
                f"nothing to resume in {run_dir}.")
    if left == UNTOUCHED:
        return (f"Interrupted before the new run started; {run_dir} still holds the earlier "
                f"run, unchanged (continue it with --resume {run_dir}).")
    return f"Interrupted. The last complete epoch is saved; continue with --resume {run_dir}"


_WORKER_PREFIX = "Caught UserError in DataLoader worker"
_ERROR_LINE = "UserError: "


def _without_worker_traceback(message: str) -> str:
    """The message of a UserError raised in a DataLoader worker (an image that fails to
    decode mid-epoch): torch re-raises it in the main process as "Caught UserError in
    DataLoader worker process N. Original Traceback ...", the message at the end."""
    if message.startswith(_WORKER_PREFIX) and _ERROR_LINE in message:
        return message[message.rfind(_ERROR_LINE) + len(_ERROR_LINE):].strip()
    return message


def _interrupted_before_start() -> None:
    """Ctrl-C while torch is imported or a --resume checkpoint read: nothing has been written
    (without this, click says only 'Aborted!' and exits 1)."""
    click.secho("\nInterrupted before training started; nothing was written.", fg="yellow",
                err=True)
    sys.exit(SIGINT_STATUS)


def _fail(message: str) -> None:
    click.secho(f"Error: {message}", fg="red", err=True)
    sys.exit(1)
