"""The files of a run folder ``runs/NAME/`` other than ``last.pt``.

- ``run.json``: the options, the model configuration, the classes and the validation split
  (digit indices into ``sklearn.datasets.load_digits``, or image paths), so that evaluation
  elsewhere (``mvcompile eval``) uses exactly the same validation images;
- ``best.safetensors`` / ``last.safetensors``: weights under the ONNX initializer names,
  loadable by ``mvcompile build --weights``;
- ``metrics.csv``: one row per epoch (train loss, val loss, val accuracy, lr, seconds);
- ``curves.png``: loss and accuracy curves.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict
from pathlib import Path

from torch import nn

from mvcompile.graphs.mobilevit import MobileViTConfig
from mvcompile.onnx_io import atomic_write_text
from mvcompile.train.checkpoint import save_weights
from mvcompile.train.data import DataSplit
from mvcompile.train.model import export_state_dict
from mvcompile.train.options import TrainOptions
from mvcompile.train.plot import write_curves

BEST, LAST_WEIGHTS = "best.safetensors", "last.safetensors"
METRICS, CURVES, RUN_INFO = "metrics.csv", "curves.png", "run.json"
COLUMNS = ("epoch", "train_loss", "val_loss", "val_acc", "ema_val_acc", "lr", "seconds")


def write_run_info(run_dir: Path, options: TrainOptions, cfg: MobileViTConfig,
                   data: DataSplit) -> None:
    info = {
        "options": asdict(options),
        "model": {"size": cfg.size, "patch_sizes": list(cfg.patch_sizes),
                  "num_classes": cfg.num_classes, "resolution": cfg.resolution},
        "data": data.description,
        "classes": data.train.classes,
        "preprocessing": "RGB, x/255 in [0,1], no mean/std; eval: shorter side to "
                         f"{data.val.eval_resize}·R, centre crop R",
        "val_items": [str(item) for item in data.val.items],
    }
    atomic_write_text(run_dir / RUN_INFO, json.dumps(info, indent=1) + "\n")


def write_epoch(run_dir: Path, model: nn.Module, metadata: dict[str, str], improved: bool,
                history: list[dict]) -> None:
    weights = export_state_dict(model)
    save_weights(run_dir / LAST_WEIGHTS, weights, metadata)
    if improved:
        save_weights(run_dir / BEST, weights, metadata)
    write_metrics(run_dir / METRICS, history)
    write_curves(run_dir / CURVES, history)


def write_metrics(path: Path, history: list[dict]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, extrasaction="ignore",
                            lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({k: _fmt(row.get(k)) for k in COLUMNS})
    atomic_write_text(path, buffer.getvalue())


def _fmt(value: object) -> str:
    if value is None:
        return ""
    return f"{value:.6g}" if isinstance(value, float) else str(value)
