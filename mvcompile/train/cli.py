"""``mvcompile train``: the click command. Printing happens here; the loop only logs.

Registered lazily by :mod:`mvcompile.cli`, so that ``mvcompile --help`` works without torch.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click
from click.core import ParameterSource

from mvcompile.click_types import FloatRange
from mvcompile.errors import UserError
from mvcompile.graphs.mobilevit import SIZES

if TYPE_CHECKING:
    from mvcompile.train.loop import TrainResult
    from mvcompile.train.options import TrainOptions

EXAMPLES = """
\b
Examples:
  mvcompile train --data digits --resolution 64 --epochs 40 --batch-size 64
  mvcompile train --data ~/flowers --val-split 0.1 --resolution 128 --epochs 100
  mvcompile train --resume runs/digits_xxs
\b
On 8 GPUs (ImageNet, the paper's recipe: 128 images per GPU at 256, 300 epochs):
  torchrun --standalone --nproc_per_node 8 -m mvcompile.train --data /data/imagenet \\
      --size s --resolution 256 --batch-size 128 --epochs 300 --ema-decay 0.9995 \\
      --workers 8 --amp --name imagenet_s
\b
--resume reuses the options saved with the run; options given on its command line override
them (e.g. --epochs 400 to train longer).
"""
PROBABILITY = FloatRange(0.0, 1.0, max_open=True)
NON_NEGATIVE = FloatRange(min=0.0)


class ProgressReporter:
    """A click progress bar per epoch (loss, lr, batch resolution) and a line per epoch."""

    def __init__(self) -> None:
        self.bar = None
        self.status = ""

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
        """End the epoch's bar, if one is showing (also when an epoch stops half-way)."""
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
            self.bar = None


@click.command(epilog=EXAMPLES)
@click.option("--data", default="digits", show_default=True,
              help="`digits` (built-in scikit-learn digits), or an image folder: DIR/<class>/"
                   "*.jpg, or DIR/train/<class>/ with DIR/val/<class>/.")
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
              help="Train on a random subset of this many images (quick experiments).")
@click.option("--seed", type=click.IntRange(0, 2**32 - 1), default=0, show_default=True,
              help="Seed for initialisation, sampling and augmentation.")
@click.option("--workers", type=click.IntRange(min=0), default=0, show_default=True,
              help="Data loader worker processes per training process.")
@click.option("--amp", is_flag=True, help="bfloat16 autocast on CUDA.")
@click.option("--name", default=None,
              help="Run folder runs/NAME [default: DATA_SIZE, e.g. digits_xxs].")
@click.option("--runs-dir", default="runs", show_default=True,
              help="Folder that holds the run folders.")
@click.option("--resume", default=None,
              help="Continue a run where it stopped: a run folder or its last.pt. Its saved "
                   "options apply unless given again here.")
@click.option("--overwrite", is_flag=True, help="Start over in an existing run folder.")
def train(**kwargs: object) -> None:
    """Train MobileViT with the paper's recipe; writes runs/NAME/best.safetensors."""
    try:
        import mvcompile.train.loop  # noqa: F401  (imports torch and safetensors)
    except ImportError as err:
        _fail(f"mvcompile train needs PyTorch ({err}). Install the [train] extra: "
              "pip install 'mvcompile[train]'.")
    try:
        options = _options(kwargs)
        result = _run(options)
    except UserError as err:
        _fail(str(err))
    if result.start_epoch >= options.epochs:
        done = result.start_epoch
        click.secho(f"Note: {result.run_dir} already finished its {done} "
                    f"epoch{'s' if done != 1 else ''}; pass --epochs M (> {done}) to train "
                    "longer.", fg="yellow", err=True)
    best = result.best
    click.echo(f"best val accuracy {best['val_acc']:.2%} at epoch {best['epoch']}: "
               f"{result.run_dir / 'best.safetensors'}")


def _options(kwargs: dict) -> TrainOptions:
    """The options of this run; with --resume, the saved ones overridden by explicit ones."""
    from mvcompile.train.checkpoint import saved_options
    from mvcompile.train.options import TrainOptions, resumed_options

    if not kwargs["resume"]:
        return TrainOptions(**kwargs)
    ctx = click.get_current_context()
    explicit = {name for name in kwargs
                if ctx.get_parameter_source(name) not in (None, ParameterSource.DEFAULT)}
    return resumed_options(saved_options(kwargs["resume"]), kwargs, explicit)


def _run(options: TrainOptions) -> TrainResult:
    """Train; on Ctrl-C, say how to continue and exit with status 130."""
    from mvcompile.train.loop import train as run_training

    before = _checkpoint_stamp(options.run_dir())
    reporter = ProgressReporter()
    try:
        return run_training(options, reporter)
    except KeyboardInterrupt:
        reporter.close()
        click.secho(f"\n{_interrupted_message(options, before)}", fg="yellow", err=True)
        sys.exit(130)
    finally:
        reporter.close()  # an error half-way through an epoch: its message on a line of its own


def _checkpoint_stamp(run_dir: Path) -> tuple[int, int] | None:
    """Identifies the run folder's last.pt (each save replaces the file): None if absent."""
    from mvcompile.train.checkpoint import LAST

    try:
        stat = (run_dir / LAST).stat()
    except OSError:
        return None
    return stat.st_ino, stat.st_mtime_ns


def _interrupted_message(options: TrainOptions, before: tuple[int, int] | None) -> str:
    """What an interrupt left: a resumable epoch, nothing, or (--overwrite interrupted before
    it deleted anything) the earlier run untouched."""
    run_dir = options.run_dir()
    now = _checkpoint_stamp(run_dir)
    if now is None:
        return (f"Interrupted before the first epoch ended; nothing was saved, so there is "
                f"nothing to resume in {run_dir}.")
    if options.overwrite and now == before:
        return (f"Interrupted before the new run started; {run_dir} still holds the earlier "
                f"run, unchanged (continue it with --resume {run_dir}).")
    return f"Interrupted. The last complete epoch is saved; continue with --resume {run_dir}"


def _fail(message: str) -> None:
    click.secho(f"Error: {message}", fg="red", err=True)
    sys.exit(1)
