"""Options of ``mvcompile train`` as one dataclass (see ``mvcompile train --help``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# Options that change the optimisation trajectory: a resumed run that changes any of them
# still runs, but does not reproduce the uninterrupted run.
RECIPE_KEYS = ("resolution", "epochs", "batch_size", "lr", "lr_init", "lr_min", "warmup_steps",
               "weight_decay", "label_smoothing", "ema_decay", "dropout", "classifier_dropout",
               "multiscale", "crop_scale", "flip", "val_split", "subset", "seed")


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

    def run_name(self) -> str:
        data = "digits" if self.data == "digits" else Path(self.data).resolve().name
        return self.name or f"{data}_{self.size}"
