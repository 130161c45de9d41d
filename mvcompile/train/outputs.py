"""The files of a run folder ``runs/NAME/`` other than ``last.pt``.

- ``run.json``: the options, the model configuration, the classes and the validation split
  (digit indices into ``sklearn.datasets.load_digits``, or image paths), so that evaluation
  elsewhere (``mvcompile eval``) uses exactly the same validation images;
- ``best.safetensors`` / ``last.safetensors``: weights under the ONNX initializer names,
  loadable by ``mvcompile build --weights``;
- ``metrics.csv``: one row per epoch (train loss, val loss, val accuracy, lr, seconds);
- ``curves.png``: loss and accuracy curves.

Only the files named in :data:`RUN_FILES` belong to ``mvcompile train``; ``--overwrite``
deletes those and nothing else.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

from torch import nn

from mvcompile.errors import UserError, first_line
from mvcompile.graphs.checkpoints import RUN_BEST as BEST
from mvcompile.graphs.checkpoints import RUN_INFO
from mvcompile.graphs.checkpoints import RUN_LAST_WEIGHTS as LAST_WEIGHTS
from mvcompile.graphs.mobilevit import MobileViTConfig
from mvcompile.onnx_io import atomic_write_bytes, atomic_write_text
from mvcompile.train.checkpoint import save_weights
from mvcompile.train.data import DataSplit
from mvcompile.train.model import export_state_dict
from mvcompile.train.options import LAST, TrainOptions
from mvcompile.train.plot import write_curves

log = logging.getLogger(__name__)

# best.safetensors, last.safetensors and run.json are named in graphs.checkpoints, which
# reads them for `mvcompile build --weights RUN_FOLDER`.
METRICS, CURVES = "metrics.csv", "curves.png"
# Everything train writes in a run folder; last.pt first, so that a run folder being cleared
# stops being resumable before anything else goes.
RUN_FILES = (LAST, BEST, LAST_WEIGHTS, METRICS, CURVES, RUN_INFO)
COLUMNS = ("epoch", "train_loss", "val_loss", "val_acc", "ema_val_acc", "lr", "seconds")


@contextlib.contextmanager
def writing(run_dir: Path) -> Iterator[None]:
    """Turn an OSError raised while writing into ``run_dir`` into a UserError paragraph."""
    try:
        yield
    except OSError as err:
        raise UserError(f"Cannot write the run folder {run_dir}: {_reason(err, run_dir)}. "
                        "Fix its path or permissions, or choose another folder with "
                        "--runs-dir or --name.") from err


def _reason(err: OSError, run_dir: Path) -> str:
    """What went wrong, in words: "Permission denied", "runs is a file, not a folder"..."""
    if isinstance(err, (NotADirectoryError, FileExistsError)):
        blocking = next((p for p in reversed([run_dir, *run_dir.parents])
                         if p.exists() and not p.is_dir()), None)
        if blocking is not None:
            return f"{blocking} is a file, not a folder"
    reason = err.strerror or first_line(err)
    failed = Path(err.filename) if isinstance(err.filename, str) else None
    return f"{reason} ({failed})" if failed in run_dir.parents else reason


def check_writable(run_dir: Path) -> None:
    """Create ``run_dir`` and write and delete a probe file in it, so that a run folder that
    cannot be written fails at once (UserError) rather than after an epoch of training.

    Folders created here are removed again: until the run writes its files, a failed start
    (bad data, say) leaves no trace.
    """
    created = [p for p in [run_dir, *run_dir.parents] if not p.exists()]  # deepest first
    try:
        with writing(run_dir):
            run_dir.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(dir=run_dir, prefix=".write-test.", suffix=".tmp")
            os.close(fd)
            os.unlink(probe)
    finally:
        for path in created:
            with contextlib.suppress(OSError):
                path.rmdir()


def earlier_outputs(run_dir: Path) -> list[str]:
    """The files of an earlier run's epochs in ``run_dir`` (run.json alone is not one)."""
    return [name for name in RUN_FILES if name != RUN_INFO and (run_dir / name).exists()]


def clear_run_files(run_dir: Path) -> None:
    """Delete what an earlier run wrote in ``run_dir`` (and its leftover temporary files);
    other files, the user's own, stay."""
    removed = []
    with writing(run_dir):
        for name in RUN_FILES:
            for path in [run_dir / name, *run_dir.glob(f".{name}.*.tmp")]:
                if path.is_file():
                    path.unlink()
                    removed.append(path.name)
    if removed:
        log.info("--overwrite: deleted the earlier run's %s from %s.", ", ".join(removed),
                 run_dir)


def _read_run_info(run_dir: Path, key: str) -> object:
    """Entry ``key`` of an earlier run.json in ``run_dir``; None if there is none."""
    try:
        return json.loads((run_dir / RUN_INFO).read_text(encoding="utf-8")).get(key)
    except (OSError, ValueError, AttributeError):
        return None


def read_resumes(run_dir: Path) -> list[dict]:
    """The resumes an earlier run.json in ``run_dir`` records; [] if there is none."""
    resumes = _read_run_info(run_dir, "resumes")
    return resumes if isinstance(resumes, list) else []


def read_init_weights(run_dir: Path) -> dict | None:
    """The --init-weights record of an earlier run.json in ``run_dir``, or None."""
    init = _read_run_info(run_dir, "init_weights")
    return init if isinstance(init, dict) else None


def copy_best(source: Path, run_dir: Path) -> None:
    """Copy the best weights of the run in ``source`` into ``run_dir``, where the resumed
    run continues under another name: its best epoch so far is the earlier run's."""
    best = source / BEST
    if best.is_file():
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(run_dir / BEST, best.read_bytes())


def write_run_info(run_dir: Path, options: TrainOptions, cfg: MobileViTConfig,
                   data: DataSplit, resumes: list[dict] | None = None,
                   init_weights: dict | None = None) -> None:
    """run.json: the options in force and the data actually used (after --subset), the
    weights the run started from (--init-weights: file, tensors, whether the classifier was
    kept), and for a resumed run one entry per resume (after which epoch, which options
    changed)."""
    info = {
        "options": asdict(options),
        "init_weights": init_weights,
        "model": {"size": cfg.size, "patch_sizes": list(cfg.patch_sizes),
                  "num_classes": cfg.num_classes, "resolution": cfg.resolution},
        "data": data.description,
        "train_images": len(data.train),
        "val_images": len(data.val),
        "classes": data.train.classes,
        "preprocessing": "RGB, x/255 in [0,1], no mean/std; eval: shorter side to "
                         f"{data.val.eval_resize}·R, centre crop R",
        "resumes": resumes or [],
        "val_items": [str(item) for item in data.val.items],
    }
    with writing(run_dir):
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
