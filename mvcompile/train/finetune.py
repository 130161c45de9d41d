"""``--init-weights``: start a new training run from existing weights (fine-tuning).

The weights are read exactly as ``mvcompile build --weights`` reads them
(:mod:`mvcompile.graphs.checkpoints`): a ``mvcompile train`` run folder (its
``best.safetensors``) or one of its files, our or Hugging Face's ``.safetensors``, a Hugging
Face model folder, or a ``.bin``/``.pt`` pickle (ml-cvnets names are renamed). Every tensor must
match the model by name and shape, except the classifier: a head trained for another number
of classes (or none at all) keeps its fresh initialisation, and the caller is told so.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mvcompile.errors import UserError
from mvcompile.graphs.channel_order import stem_to_rgb, trained_channel_order
from mvcompile.graphs.checkpoints import (
    CheckpointWeights,
    checkpoint_class_names,
    checkpoint_size,
    load_state_dict,
    resolve_run_weights,
    to_hf_names,
    training_metadata,
)
from mvcompile.graphs.hf_config import check_built_as_configured
from mvcompile.graphs.mobilevit import MobileViTConfig

log = logging.getLogger(__name__)

HEAD = ("classifier.weight", "classifier.bias")
_IGNORED = "num_batches_tracked"  # BatchNorm counters: not weights, absent from our exports
_SHOW = 5  # mismatching tensors named per kind in an error


@dataclass
class InitWeights:
    """What :func:`load_init_weights` did: for run.json, and notes for the user."""

    path: str  # the file actually read
    tensors: int  # tensors loaded
    classifier: str  # "loaded", or why it keeps its fresh initialisation
    notes: list[str] = field(default_factory=list)

    def record(self) -> dict:
        """The run.json entry."""
        return {"from": self.path, "tensors": self.tensors, "classifier": self.classifier}


def load_init_weights(model: nn.Module, path: str | Path, cfg: MobileViTConfig,
                      patch_config: str | None = None, class_names: list[str] | None = None
                      ) -> InitWeights:
    """Copy the weights at ``path`` into ``model`` (built for ``cfg``: ``patch_config``, the
    data's ``class_names``); UserError on mismatch, notes where the checkpoint was trained
    otherwise (patch config, resolution, class names)."""
    if not Path(path).exists():
        raise UserError(f"--init-weights {path}: no such file or folder. Pass a run folder of "
                        "mvcompile train (or its best.safetensors), a .safetensors, .bin or .pt "
                        "checkpoint, or a Hugging Face model folder.")
    file, note = resolve_run_weights(path)
    notes = [note] if note else []
    eps = check_built_as_configured(file)
    if eps is not None and eps != cfg.ln_eps:
        notes.append(f"--init-weights: its config.json sets LayerNorm epsilon {eps:g}; training "
                     f"uses {cfg.ln_eps:g}, as the models mvcompile builds from its checkpoints "
                     "do.")
    wanted = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith(_IGNORED)}
    raw = load_state_dict(file)
    state = to_hf_names(raw, list(wanted), cfg.depths)
    state = {k: v for k, v in state.items() if not k.endswith(_IGNORED)}
    order, why = trained_channel_order(file, raw)
    if order == "bgr":  # training reads RGB images
        state = stem_to_rgb(state)
        notes.append(f"--init-weights: {Path(file).name} was trained on BGR images ({why}); "
                     "its stem convolution's input channels are reversed to take RGB.")
    classifier = _drop_other_head(state, wanted, cfg.num_classes)
    if classifier != "loaded":
        notes.append(f"--init-weights: {classifier}; the classifier is re-initialised and "
                     "trained from scratch.")
    _check_match(state, wanted, file, cfg, head_optional=classifier != "loaded")
    notes += _training_differences(file, cfg, patch_config,
                                   class_names if classifier == "loaded" else None)
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}
    model.load_state_dict(tensors, strict=False)
    log.info("--init-weights: loaded %d tensors from %s (classifier: %s)", len(tensors), file,
             classifier)
    return InitWeights(str(Path(file).resolve()), len(tensors), classifier, notes)


def _training_differences(file: Path, cfg: MobileViTConfig, patch_config: str | None,
                          class_names: list[str] | None) -> list[str]:
    """Notes on how the checkpoint's recorded training (mvcompile train's header, a Hugging
    Face id2label) differs from this run: patch config, resolution, and the class names of a
    classifier that is kept (same count, other names: the head then maps to other classes)."""
    trained = training_metadata(file)
    notes = []
    if patch_config and trained.get("patch_config") not in (None, patch_config):
        notes.append(f"--init-weights was trained with --patch-config "
                     f"{trained['patch_config']}; this run uses {patch_config}.")
    if trained.get("resolution") not in (None, str(cfg.resolution)):
        notes.append(f"--init-weights was trained at --resolution {trained['resolution']}; "
                     f"this run trains at {cfg.resolution}.")
    theirs = checkpoint_class_names(file)
    if class_names and theirs and theirs != class_names:
        notes.append(f"--init-weights names other classes ({_preview(theirs)}) than the data "
                     f"({_preview(class_names)}); its classifier is kept and retrained, "
                     "index by index.")
    return notes


def _preview(names: list[str], show: int = 3) -> str:
    return ", ".join(names[:show]) + (", ..." if len(names) > show else "")


def _drop_other_head(state: dict[str, np.ndarray], wanted: dict[str, tuple[int, ...]],
                     num_classes: int) -> str:
    """Remove a classifier trained for another class count from ``state``; say what was done.

    Only the number of outputs may differ: a head over other features is a mismatch that
    :func:`_check_match` reports.
    """
    weight, bias = (state.get(k) for k in HEAD)
    if weight is None and bias is None:
        return "the checkpoint has no classifier"
    if weight is None or bias is None or weight.ndim != 2:
        return "loaded"  # incomplete or odd: _check_match names it
    features = wanted[HEAD[0]][1]
    if weight.shape[1] != features or weight.shape[0] == num_classes:
        return "loaded"
    for k in HEAD:
        del state[k]
    return (f"its classifier has {weight.shape[0]} classes and the data "
            f"{num_classes}")


def _check_match(state: dict[str, np.ndarray], wanted: dict[str, tuple[int, ...]], file: Path,
                 cfg: MobileViTConfig, head_optional: bool) -> None:
    """UserError naming the first missing, unexpected and mis-shaped tensors, if any
    (:class:`CheckpointWeights` matches them); the classifier may be missing when
    ``head_optional`` (it keeps its initialisation)."""
    weights = CheckpointWeights(state, str(file))
    for name, shape in wanted.items():
        if not (head_optional and name in HEAD):
            weights(name, shape, "")
    missing, unexpected = weights.missing, weights.unexpected()
    shapes = [f"{name}: checkpoint {list(theirs)}, model {list(ours)}"
              for name, theirs, ours in weights.mismatched]
    if not (missing or unexpected or shapes):
        return
    lines = [f"--init-weights {file} does not match MobileViT-{cfg.size.upper()}: "
             f"{len(missing)} missing, {len(unexpected)} unexpected and {len(shapes)} "
             "mis-shaped tensors."]
    for label, items in (("missing", missing), ("unexpected", unexpected),
                         ("shape", shapes)):
        lines += [f"  {label}: {item}" for item in items[:_SHOW]]
        if len(items) > _SHOW:
            lines.append(f"  ... and {len(items) - _SHOW} more {label}")
    size = checkpoint_size(state)
    lines.append(f"It looks like MobileViT-{size.upper()} weights: pass --size {size}."
                 if size not in (None, cfg.size) else
                 "Pass weights of the same MobileViT variant (a run of mvcompile train, a "
                 "Hugging Face or ml-cvnets MobileViT checkpoint).")
    raise UserError("\n".join(lines))
