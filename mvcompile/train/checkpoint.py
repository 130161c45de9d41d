"""Run-folder files: the resumable training checkpoint and the exported weights.

Every file is written to a temporary file in the same folder and renamed over the old one,
so an interrupted run (Ctrl-C, a crash, a killed job) always leaves the last complete
checkpoint intact. ``last.pt`` holds everything ``--resume`` needs; ``*.safetensors`` hold
only the weights, under the ONNX graph's initializer names.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

import torch
from safetensors.torch import save as safetensors_save

from mvcompile.errors import UserError
from mvcompile.graphs.checkpoints import torch_load, torch_load_failure
from mvcompile.onnx_io import atomic_write_bytes
from mvcompile.train.options import LAST, resolve  # torch-free, so options can use them too

log = logging.getLogger(__name__)

FORMAT = "mvcompile-train-1"
MODEL_KEYS = ("size", "patch_config", "num_classes")


def save_checkpoint(path: Path, state: dict) -> None:
    """``torch.save`` the training state atomically."""
    buffer = io.BytesIO()
    torch.save({"format": FORMAT, **state}, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def save_weights(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write weights as safetensors atomically; ``mvcompile build --weights`` reads them."""
    atomic_write_bytes(path, safetensors_save(tensors, metadata=metadata))


def load_checkpoint(path: str | Path, model_config: dict, device: torch.device) -> dict:
    """Read ``last.pt`` and check that it was trained with the same model shape."""
    state = read_checkpoint(path, device)
    check_same_model(state["model_config"], model_config, resolve(path))
    return state


def saved_options(path: str | Path) -> dict:
    """The options a run was trained with, as stored in its ``last.pt``."""
    return dict(read_checkpoint(path, torch.device("cpu")).get("options") or {})


def read_checkpoint(path: str | Path, device: torch.device) -> dict:
    """Read ``last.pt`` (a run folder or the file); UserError if missing or not ours."""
    path = resolve(path)
    if not path.is_file():
        raise UserError(f"--resume {path}: no such checkpoint. Pass a run folder "
                        f"(runs/NAME) or its {LAST}.")
    try:
        state = torch_load(path, device)
    except Exception as err:  # torch raises many types for corrupt pickles
        log.debug("torch.load(%s) failed: %s", path, err)
        reason = torch_load_failure(err) or "it may be truncated or corrupt"
        raise UserError(f"{path} is not a readable checkpoint ({reason}). Resume "
                        "from the last.pt of a run written by mvcompile train, or start a new "
                        "run.") from err
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UserError(f"{path} is not a training checkpoint written by mvcompile train "
                        f"(format {FORMAT}); to start from weights only, begin a new run.")
    return state


def check_same_model(saved: dict, wanted: dict, path: Path) -> None:
    """Raise UserError if the checkpoint's size, patch config or class count differ."""
    diffs = [k for k in MODEL_KEYS if saved.get(k) != wanted.get(k)]
    if not diffs:
        return
    def describe(c: dict) -> str:
        return (f"MobileViT-{str(c.get('size')).upper()}, patch config "
                f"{c.get('patch_config')}, {c.get('num_classes')} classes")
    raise UserError(
        f"Cannot resume from {path}: it was trained as {describe(saved)}, but this run asks "
        f"for {describe(wanted)} ({', '.join(diffs)} differ). Resume with the same "
        f"--size/--patch-config/--data (e.g. --size {saved.get('size')}), or start a new run "
        "under another --name.")
