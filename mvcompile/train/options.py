"""Options of ``mvcompile train`` as one dataclass (see ``mvcompile train --help``)."""

from __future__ import annotations

import logging
import os
from collections.abc import Collection, Mapping
from dataclasses import dataclass, fields
from pathlib import Path

from mvcompile.errors import UserError
from mvcompile.graphs.checkpoints import RUN_STATE

log = logging.getLogger(__name__)

# Options that change the optimisation trajectory: a resumed run that changes any of them
# still runs, but does not reproduce the uninterrupted run.
RECIPE_KEYS = ("resolution", "epochs", "batch_size", "lr", "lr_init", "lr_min", "warmup_steps",
               "weight_decay", "label_smoothing", "ema_decay", "dropout", "classifier_dropout",
               "multiscale", "crop_scale", "flip", "val_split", "subset", "seed")
# Options that locate a run rather than configure it: never taken from a resumed checkpoint.
LOCATION_KEYS = ("name", "runs_dir", "resume", "overwrite")
LAST = RUN_STATE  # last.pt, the resumable checkpoint in a run folder


def resolve(path: str | Path) -> Path:
    """A run folder means its ``last.pt``."""
    path = Path(path)
    return path / LAST if path.is_dir() else path


@dataclass(frozen=True)
class TrainOptions:
    """Defaults are the paper's ImageNet recipe, except the per-rank batch size."""

    data: str = "digits"
    size: str = "xxs"
    patch_config: str = "A"
    resolution: int = 256  # base resolution r₀ of the multi-scale sampler, and for validation
    epochs: int = 300
    batch_size: int = 128  # images per rank at r₀; paper: 128 × 8 GPUs = 1024
    lr: float = 0.002
    lr_init: float = 0.0002
    lr_min: float = 0.0002
    warmup_steps: int | None = None  # None: min(3000, 5% of all steps)
    weight_decay: float = 0.01
    label_smoothing: float = 0.1
    ema_decay: float | None = None
    dropout: float = 0.0
    classifier_dropout: float = 0.1
    multiscale: bool = True
    crop_scale: float | None = None  # None: the dataset's default (0.08; digits 0.6)
    flip: bool | None = None  # None: the dataset's default (on; digits off)
    val_split: float | None = None  # None: 0.2 for digits, 0.1 for an image folder
    subset: int | None = None  # train on a seeded random subset of this many images
    seed: int = 0
    workers: int = 0
    amp: bool = False  # bfloat16 autocast on CUDA
    name: str | None = None
    runs_dir: str = "runs"
    resume: str | None = None
    overwrite: bool = False
    init_weights: str | None = None  # start from these weights (fine-tuning); not with resume

    def run_name(self) -> str:
        data = "digits" if self.data == "digits" else Path(self.data).resolve().name
        return self.name or f"{data}_{self.size}"

    def run_dir(self) -> Path:
        """The run folder: the resumed one (unless ``--name`` is given), else runs_dir/NAME."""
        if self.resume and self.name is None:
            return resolve(self.resume).parent
        return Path(self.runs_dir) / self.run_name()


def check_run_name(name: str | None, runs_dir: str) -> None:
    """UserError unless ``name`` (``--name``) is a plain folder name, not a path."""
    if name is None:
        return
    if not name:
        raise UserError("--name is empty; give the run a name, e.g. --name flowers_xxs.")
    separators = {"/", "\\", os.sep, os.altsep} - {None}
    if name not in (".", "..") and not any(s in name for s in separators):
        return
    path = Path(name.replace("\\", "/"))
    parent = os.path.normpath(path.parent if path.is_absolute() else Path(runs_dir, path.parent))
    example = (f" (e.g. --runs-dir {parent} --name {path.name})"
               if path.name not in ("", ".", "..") else "")
    raise UserError(f"--name {name!r} is a run name, not a path: the run folder is "
                    f"{Path(runs_dir) / 'NAME'}. To put the run in another folder, pass that "
                    f"folder as --runs-dir{example}.")


def odd_option_notes(o: TrainOptions, cuda: bool) -> list[str]:
    """Notes on accepted but odd options: a learning rate that falls during the warm-up or
    rises during the decay, and --amp where it does nothing (``cuda``: the run uses a GPU)."""
    notes = []
    warmup = o.warmup_steps is None or o.warmup_steps > 0
    if warmup and o.lr_init > o.lr:
        notes.append(f"--lr-init {o.lr_init:g} is above --lr {o.lr:g}: the warm-up lowers the "
                     "learning rate instead of raising it.")
    if o.lr_min > o.lr:
        notes.append(f"--lr-min {o.lr_min:g} is above --lr {o.lr:g}: the cosine decay raises "
                     "the learning rate instead of lowering it.")
    if o.amp and not cuda:
        notes.append("--amp has no effect here: bfloat16 autocast is used only on CUDA, and "
                     "this run trains on the CPU.")
    return notes


def changed_options(saved: Mapping[str, object], options: TrainOptions
                    ) -> dict[str, list[object]]:
    """{name: [saved value, value in force]} for the options (not :data:`LOCATION_KEYS`) that a
    resumed run changed from those saved in its checkpoint."""
    return {f.name: [saved.get(f.name), getattr(options, f.name)] for f in fields(options)
            if f.name not in LOCATION_KEYS and saved.get(f.name) != getattr(options, f.name)}


def resumed_options(saved: Mapping[str, object], given: Mapping[str, object],
                    explicit: Collection[str]) -> TrainOptions:
    """The options of a resumed run: those saved with it, overridden by the ``explicit`` ones.

    ``saved`` are the options stored in the checkpoint, ``given`` all options of this
    invocation (defaults included) and ``explicit`` the names the user actually set. Options
    the checkpoint lacks (an older format) and :data:`LOCATION_KEYS` come from ``given``.
    """
    names = [f.name for f in fields(TrainOptions)]
    reused = {k: saved[k] for k in names
              if k in saved and k in given and k not in explicit and k not in LOCATION_KEYS}
    overridden = [k for k in names if k in explicit and k in saved and k not in LOCATION_KEYS
                  and saved[k] != given[k]]
    # Changes to the recipe are warned about once, where the checkpoint is restored
    # (loop._restore); here only what came from where.
    log.info("Resuming with the run's saved options%s.", "".join(
        f", except {k} {saved[k]!r} -> {given[k]!r}" for k in overridden))
    return TrainOptions(**{**given, **reused})
