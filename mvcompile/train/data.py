"""Training data: an image folder or scikit-learn's digits, with MobileViT's preprocessing.

Images become float32 [3,R,R] RGB scaled to [0,1] (x/255, no mean/std, the MobileViT and
ml-cvnets convention). Training augmentation is the paper's basic one: random resized crop
(area fraction s ~ U(s_min, 1), aspect ratio a with log a ~ U(log ¾, log ⁴⁄₃)) then a
horizontal flip with probability ½. Each item carries its own seed (see
:mod:`mvcompile.train.sampler`), so augmentation is reproducible whatever the workers.

Evaluation resizes the shorter side to ``eval_resize · R`` and centre-crops R (ml-cvnets uses
288 → 256, i.e. 1.125). This module uses NumPy and Pillow only, so the evaluation preprocessing
can be reused without torch.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from mvcompile.calibration.data import VAL_FOLDERS, few_names, is_train_split
from mvcompile.errors import UserError, first_line
from mvcompile.images import DECODE_ERRORS, IMAGE_SUFFIXES, find_files, mode_problem, to_rgb

log = logging.getLogger(__name__)

SPLIT_SEED = 0  # the validation split is fixed, whatever the training seed
DIGITS = "digits"
ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".7z", ".rar")


@dataclass
class ImageSource:
    """Labelled images: ``items[i]`` is a file path, or an index into ``arrays`` for digits."""

    items: list
    labels: list[int]
    classes: list[str]
    crop_scale: float = 0.08  # default s_min of the random resized crop
    flip: bool = True  # default horizontal flip
    eval_resize: float = 1.125
    arrays: np.ndarray | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.items)

    def subset(self, keep: list[int]) -> ImageSource:
        return ImageSource([self.items[i] for i in keep], [self.labels[i] for i in keep],
                           self.classes, self.crop_scale, self.flip, self.eval_resize,
                           self.arrays)

    def files(self) -> list[Path]:
        """The image files (none for in-memory images such as digits)."""
        return [] if self.arrays is not None else list(self.items)

    def image(self, i: int) -> Image.Image:
        """Image ``i`` as an RGB PIL image."""
        if self.arrays is not None:
            return Image.fromarray(self.arrays[self.items[i]]).convert("RGB")
        path = self.items[i]
        try:
            with Image.open(path) as img:
                return to_rgb(img)
        except DECODE_ERRORS as err:
            raise UserError(f"Cannot read image {path} ({err}). Remove or replace it.") from err


@dataclass
class DataSplit:
    """The training and validation images, and where they came from."""

    train: ImageSource
    val: ImageSource
    source: str  # e.g. "scikit-learn digits (8x8 upsampled)" or "photos: 5 classes"
    split: str  # how val was separated from train, e.g. "--val-split 0.2" or "val/ folder"
    subset_of: int | None = None  # the training images before --subset picked some

    @property
    def description(self) -> str:
        """One line with the image counts actually used, e.g. for run.json and the log."""
        train = f"{len(self.train)} train"
        if self.subset_of is not None:
            train += f" (--subset of {self.subset_of})"
        return f"{self.source}, {train} / {len(self.val)} val ({self.split})"


def load_data(spec: str, val_split: float | None = None) -> DataSplit:
    """``spec`` is ``digits`` or an image folder; see the CLI help for the layouts.

    ``val_split`` defaults to 0.2 for digits (1438 train / 359 val) and 0.1 for folders.
    """
    if val_split is None:
        val_split = 0.2 if spec == DIGITS else 0.1
    if not 0.0 < val_split < 1.0:
        raise UserError(f"--val-split must be between 0 and 1 (exclusive), got {val_split}.")
    if spec == DIGITS:
        return _digits(val_split)
    return _folder(Path(spec), val_split)


def _digits(val_split: float) -> DataSplit:
    from sklearn.datasets import load_digits

    digits = load_digits()
    arrays = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)  # [1797,8,8]
    source = ImageSource(list(range(len(arrays))), [int(t) for t in digits.target],
                         [str(c) for c in range(10)], crop_scale=0.6, flip=False,
                         eval_resize=1.0, arrays=arrays)
    train, val = stratified_split(source.labels, val_split)
    return DataSplit(source.subset(train), source.subset(val),
                     "scikit-learn digits (8x8 upsampled)", f"--val-split {val_split}")


def _folder(root: Path, val_split: float) -> DataSplit:
    if root.exists() and not root.is_dir():
        archive = any(root.name.lower().endswith(s) for s in ARCHIVE_SUFFIXES)
        raise UserError(f"--data {root} is a file, not a folder"
                        f"{' (an archive: unpack it first)' if archive else ''}. --data wants "
                        "a folder with one subfolder of images per class (or train/ and val/ "
                        "folders of them), or `digits` for the built-in demo.")
    if not root.is_dir():
        raise UserError(f"--data {root}: no such folder. Pass an image folder with one "
                        "subfolder per class, or `digits` for the built-in demo.")
    # train/ beside val/ is a split even when it holds images directly (an error below)
    beside_val = any((root / v).is_dir() for v in VAL_FOLDERS)
    train_root = (root / "train" if (root / "train").is_dir()
                  and (beside_val or is_train_split(root)) else root)
    val_root = next((train_root.parent / v for v in VAL_FOLDERS
                     if train_root != root and (train_root.parent / v).is_dir()), None)
    train = scan_folder(train_root)
    source = f"{root}: {len(train.classes)} classes"
    if val_root is None:
        keep, held = stratified_split(train.labels, val_split)
        return DataSplit(train.subset(keep), train.subset(held), source,
                         f"--val-split {val_split}")
    val = scan_folder(val_root, classes=train.classes)
    return DataSplit(train, val, source, f"{train_root.name}/ and {val_root.name}/ folders")


def scan_folder(root: Path, classes: list[str] | None = None) -> ImageSource:
    """Images under ``root/<class>/`` (any depth). Classes are sorted folder names."""
    found = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if classes is not None and set(found) - set(classes):
        raise UserError(f"{root} has class folders that the training set lacks: "
                        f"{', '.join(sorted(set(found) - set(classes)))}.")
    classes = classes or found
    _check_names_are_utf8(root, classes)
    items, labels = [], []
    for label, name in enumerate(classes):
        files = find_files(root / name)[0]
        items += files
        labels += [label] * len(files)
    _check_classes(root, found, classes, labels)
    loose = _loose_images(root)
    if loose:
        log.warning("Images beside the class folders of %s are in no class and are not used "
                    "(%d): %s", root, len(loose), few_names(loose))
    return ImageSource(items, labels, classes)


def _check_names_are_utf8(root: Path, classes: list[str]) -> None:
    """UserError for a class folder whose name is not valid UTF-8 (an old Latin-1 archive):
    the class names go into the weights' header as UTF-8, which failed after an epoch."""
    bad = [name for name in classes if not _is_utf8(name)]
    if bad:
        shown = ", ".join(repr(os.fsencode(name))[1:] for name in bad[:5])
        raise UserError(f"{len(bad)} class folder(s) in {root} have names that are not valid "
                        f"UTF-8: {shown}. The class names are stored as UTF-8 with the "
                        "weights; rename those folders (for example with `convmv -f latin1 "
                        "-t utf8 -r --notest DIR`).")


def _is_utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # undecodable bytes, kept by Python as surrogates
        return False
    return True


def _loose_images(root: Path) -> list[str]:
    """The names of the image files directly in ``root`` (not in a class folder), sorted."""
    return sorted(p.name for p in root.iterdir() if p.is_file() and not p.name.startswith(".")
                  and p.suffix.lower() in IMAGE_SUFFIXES)


def _check_classes(root: Path, found: list[str], classes: list[str], labels: list[int]) -> None:
    layout = f"expected {root}/<class name>/<image>{IMAGE_SUFFIXES[0]}, one folder per class"
    if not labels:
        loose = _loose_images(root)
        detail = (f"it has {len(loose)} images but no class subfolders" if loose
                  else "it holds no images" if not found
                  else f"its {len(found)} subfolders hold no images")
        raise UserError(f"The data folder {root} is empty for training: {detail}; {layout} "
                        f"({', '.join(IMAGE_SUFFIXES)}).")
    if len(classes) < 2:
        raise UserError(f"The data folder {root} has only one class ({classes[0]!r}); a "
                        f"classifier needs at least two class subfolders; {layout}.")
    counts = np.bincount(labels, minlength=len(classes))
    empty = [c for c, n in zip(classes, counts, strict=True) if n == 0]
    if empty and found == classes:
        raise UserError(f"Class folders without images in {root}: {', '.join(empty[:8])}. "
                        "Remove them or add images.")


def image_problem(path: Path) -> str | None:
    """Why ``path`` cannot be used as an image, or None when it can.

    A cheap check: Pillow opens the file and verifies its header and structure without
    decoding the pixels, so it finds files that are not images, empty or cut short in their
    header, and PNGs with damaged chunks; a JPEG cut short in its pixel data passes.
    """
    try:
        with Image.open(path) as img:
            problem = mode_problem(img)
            if problem is not None:
                return problem
            img.verify()
    except UnidentifiedImageError:
        return "not an image Pillow can read"
    except Exception as err:  # Pillow raises many types (OSError, SyntaxError, struct.error)
        return first_line(err)
    return None


def unreadable_images(paths: Sequence[Path], on_progress: Callable[[int], None] | None = None,
                      every: int = 200) -> list[tuple[str, str]]:
    """[(path, reason)] for the ``paths`` that :func:`image_problem` rejects, in order.

    ``on_progress(done)`` is called every ``every`` images and at the end.
    """
    bad = []
    for done, path in enumerate(paths, 1):
        problem = image_problem(path)
        if problem is not None:
            bad.append((str(path), problem))
        if on_progress is not None and (done % every == 0 or done == len(paths)):
            on_progress(done)
    return bad


def unreadable_images_message(bad: Sequence[tuple[str, str]], total: int, show: int = 10) -> str:
    """One paragraph naming the first ``show`` unreadable images and how many there are."""
    lines = [f"{len(bad)} of the {total} images cannot be read; training has not started:"]
    lines += [f"  {path}: {reason}" for path, reason in bad[:show]]
    if len(bad) > show:
        lines.append(f"  ... and {len(bad) - show} more")
    lines.append("Remove or replace them, then run again.")
    return "\n".join(lines)


def stratified_split(labels: list[int], fraction: float) -> tuple[list[int], list[int]]:
    """Per class, a seeded random ⌊fraction·n_c⌉ of the items (≥1 if n_c ≥ 2) go to val."""
    rng = np.random.default_rng(SPLIT_SEED)
    labels_arr = np.asarray(labels)
    train, val = [], []
    for c in np.unique(labels_arr):
        members = rng.permutation(np.flatnonzero(labels_arr == c)).tolist()
        k = min(len(members) - 1, max(1, round(fraction * len(members))))
        val += members[:k]
        train += members[k:]
    if not val:
        raise UserError("The validation split is empty: every class has a single image. "
                        "Add images or provide a val/ folder.")
    return sorted(train), sorted(val)


def random_resized_crop(img: Image.Image, size: int, rng: np.random.Generator,
                        min_scale: float, flip: bool) -> Image.Image:
    """Crop a box of area s·A and aspect a (see module doc), resize to size², maybe flip."""
    w, h = img.size
    box = (0.0, 0.0, float(w), float(h))
    for _ in range(10):
        area = w * h * rng.uniform(min_scale, 1.0)
        aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        cw, ch = math.sqrt(area * aspect), math.sqrt(area / aspect)
        if cw <= w and ch <= h:
            x0, y0 = rng.uniform(0, w - cw), rng.uniform(0, h - ch)
            box = (x0, y0, x0 + cw, y0 + ch)
            break
    out = img.resize((size, size), Image.Resampling.BILINEAR, box=box)
    if flip and rng.random() < 0.5:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return out


def center_crop(img: Image.Image, size: int, resize: float) -> Image.Image:
    """Resize the shorter side to resize·size, then take the centre size×size."""
    w, h = img.size
    scale = resize * size / min(w, h)
    crop = size / scale  # side of the crop in source pixels
    x0, y0 = (w - crop) / 2, (h - crop) / 2
    return img.resize((size, size), Image.Resampling.BILINEAR, box=(x0, y0, x0 + crop, y0 + crop))


def to_array(img: Image.Image) -> np.ndarray:
    """RGB PIL image -> float32 [3,H,W] in [0,1]."""
    return np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 255.0


def train_item(source: ImageSource, i: int, size: int, seed: int, min_scale: float,
               flip: bool) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return to_array(random_resized_crop(source.image(i), size, rng, min_scale, flip))


def eval_item(source: ImageSource, i: int, size: int) -> np.ndarray:
    """The evaluation preprocessing; the ONNX model expects exactly this input."""
    return to_array(center_crop(source.image(i), size, source.eval_resize))
