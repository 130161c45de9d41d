"""Which model output each labelled class is: by name where the model records its classes."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from mvcompile.calibration.data import ImageSet, few_names

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LabelMatch:
    """The labels top-1 is scored against, as the model's class indices, or why there are none.
    """

    labels: np.ndarray | None
    note: str | None = None  # how the labels were matched, when not simply in folder order
    not_scored: str | None = None  # why labelled data gets no top-1


def match_labels(images: ImageSet, outputs: int, model_classes: list[str] | None = None,
                 source: str = "the folder") -> LabelMatch:
    """Match the classes of labelled ``images`` to a model with ``outputs`` logits.

    Labels of -1 (images outside the class folders) stay -1: they are not scored.

    Without class names in the model, folder class i is output i when the counts agree. With
    them, folder classes are matched by name: a different order (or a subset of the model's
    classes) is remapped, with a note; classes the model does not have are not scored. A folder
    that shares no name at all with the model is taken to use another naming scheme (ImageNet
    synset folders against a Hugging Face model's label text) and is scored in order, with a
    note, as without names.
    """
    if images.labels is None:
        return LabelMatch(None)
    names = _usable_names(model_classes, outputs)
    folder = images.class_names
    if names is not None and folder != names and set(folder) & set(names):
        return _match_by_name(images, names, source)
    if len(folder) == 1 and outputs != 1:
        scorer = ("which matches none of the model's class names" if names is not None else
                  "which only a model that names its classes can score (by name)")
        return LabelMatch(None, not_scored=(
            f"no labels: {source} has one subfolder ({folder[0]}), taken as one class, "
            f"{scorer}; use one subfolder per class"))
    if outputs != len(folder):
        return LabelMatch(None, not_scored=f"not scored: {source} has {len(folder)} classes, "
                                           f"the model {outputs} outputs")
    note = None
    if names is not None and folder != names:
        note = (f"the classes of {source} ({few_names(folder)}) share no name with the model's "
                f"({few_names(names)}); scored in sorted order, as if they correspond")
    return LabelMatch(images.labels, note=note)


def _usable_names(model_classes: list[str] | None, outputs: int) -> list[str] | None:
    """``model_classes`` if they name each output once; otherwise None (logged)."""
    if model_classes is None:
        return None
    if len(model_classes) != outputs or len(set(model_classes)) != len(model_classes):
        log.warning("Ignoring the model's class names: %d names (%d distinct) for %d outputs",
                    len(model_classes), len(set(model_classes)), outputs)
        return None
    return model_classes


def _match_by_name(images: ImageSet, names: list[str], source: str) -> LabelMatch:
    """Folder labels remapped to the model's class indices by name, or why they cannot be."""
    folder = images.class_names
    index = {name: i for i, name in enumerate(names)}
    unknown = [name for name in folder if name not in index]
    if unknown:
        verb = "is" if len(unknown) == 1 else "are"
        return LabelMatch(None, not_scored=(
            f"not scored: {len(unknown)} of the {len(folder)} classes of {source} {verb} not "
            f"among the model's {len(names)} classes: {few_names(unknown)}"))
    remap = np.array([index[name] for name in folder] + [-1])  # [-1]: an unlabelled image
    if len(folder) == len(names):
        note = (f"labels of {source} matched to the model's classes by name (the model orders "
                "them differently)")
    else:
        note = (f"labels of {source} matched to the model's classes by name ({len(folder)} of "
                f"its {len(names)} classes)")
    return LabelMatch(remap[images.labels], note=note)
