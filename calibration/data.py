"""Calibration and evaluation images: folders, .npy arrays, or bundled real photos.

Preprocessing is the MobileViT convention: RGB, resize the shorter side to R·(288/256),
centre-crop R×R, scale to [0, 1] (no mean/std), NCHW float32.

A folder is searched recursively for image files. When its images sit in per-class subfolders
(the ImageNet-val layout), the sorted names of the top-level subfolders that hold images are
the class labels; images beside those folders, at the top level, are used but have no label
(-1), as ``mvcompile train`` ignores them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from mvcompile.errors import UserError, first_line
from mvcompile.images import DECODE_ERRORS, IMAGE_SUFFIXES, find_files, to_rgb

log = logging.getLogger(__name__)

RESIZE_RATIO = 288 / 256  # resize the shorter side to this multiple of the crop, as HF does
_BUNDLED_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field",
                   "immunohistochemistry", "retina", "camera", "moon", "coins", "brick", "grass",
                   "gravel")


@dataclass
class ImageSet:
    """Preprocessed images, optional labels, and what was skipped on the way."""

    pixels: np.ndarray  # [N, 3, R, R] float32 in [0, 1]
    labels: np.ndarray | None = None  # [N] int64 class indices (-1: none), when it has classes
    class_names: list[str] = field(default_factory=list)
    description: str = ""
    skipped: list[str] = field(default_factory=list)  # non-image files that were ignored
    unlabelled: list[str] = field(default_factory=list)  # images outside the class folders

    def batches(self, batch_size: int = 8) -> Iterator[np.ndarray]:
        for start in range(0, len(self.pixels), batch_size):
            yield self.pixels[start:start + batch_size]


_NAMES_SHOWN = 5  # names (of classes, of files) listed in a note before "..."


def few_names(names: list[str]) -> str:
    """The first few of ``names``, comma-separated, then "..." if there are more."""
    return ", ".join(names[:_NAMES_SHOWN]) + (", ..." if len(names) > _NAMES_SHOWN else "")


def skipped_note(skipped: list[str]) -> str:
    """What :attr:`ImageSet.skipped` lists, for a summary row."""
    files = "1 non-image file" if len(skipped) == 1 else f"{len(skipped)} non-image files"
    return f"skipped {files}: {few_names(skipped)}"


def preprocess(image: Image.Image, resolution: int) -> np.ndarray:
    """PIL image → [3, R, R] float32: upright 8-bit RGB (:func:`mvcompile.images.to_rgb`),
    shorter side to R·288/256, centre crop, /255.

    The same functions ``mvcompile train`` evaluates with, so a trained model sees identical
    inputs at calibration time.
    """
    from mvcompile.train.data import center_crop, to_array

    return to_array(center_crop(to_rgb(image), resolution, RESIZE_RATIO))


def load_images(source: str | None, resolution: int, limit: int | None = None,
                on_image: Callable[[], None] | None = None, split: str = "train") -> ImageSet:
    """A folder, a .npy file, ``digits`` (its ``split``: train or val, as ``mvcompile train``
    splits it), or (``None``) the bundled scikit-image photos."""
    if source is None:
        return bundled_photos(resolution, limit or 32, on_image)
    if source == "digits":
        if Path(source).is_dir():
            log.warning("Using scikit-learn's digits; to use the folder ./digits instead, "
                        "pass it as ./digits.")
        return digits(resolution, split, limit, on_image)
    path = Path(source)
    if is_array_file(source):
        return _load_npy(path, resolution, limit)
    return load_folder(split_folder(path, split), resolution, limit, on_image)


VAL_FOLDERS = ("val", "validation")  # the held-out folder beside train/, as train takes it


def split_folder(folder: Path, split: str) -> Path:
    """``folder``'s ``split`` ("train" or "val") when it is laid out as ``mvcompile train
    --data`` takes it (:func:`is_train_split`); otherwise ``folder`` itself (a train/ holding
    images directly, or beside other class folders, is a class called train).
    Without a val folder, "val" means train/ (with a note: those are the images training
    saw)."""
    train = folder / "train"
    if not is_train_split(folder):
        return _lone_val_folder(folder) or folder
    if split == "train":
        return train
    val = next((folder / v for v in VAL_FOLDERS if (folder / v).is_dir()), None)
    if val is None:
        log.warning("%s has train/ but no val/ folder: evaluating on train/, the images "
                    "training saw", folder)
        return train
    log.info("%s has train/ and %s/ folders: using %s/", folder, val.name, val.name)
    return val


def is_train_split(folder: Path) -> bool:
    """Whether ``folder/train`` is the training split of a train/ + val/ layout rather than a
    class called "train" (CIFAR-100 has one): it holds class folders, and beside it there is
    a val/ (or validation/) folder, or no folder other than those and test/."""
    train = folder / "train"
    if not (train.is_dir() and _has_subfolders(train)):
        return False
    splits = {"train", "test", *VAL_FOLDERS}
    others = [p for p in folder.iterdir()
              if p.is_dir() and not p.name.startswith(".") and p.name not in splits]
    return not others or any((folder / v).is_dir() for v in VAL_FOLDERS)


def _has_subfolders(folder: Path) -> bool:
    return any(p.is_dir() and not p.name.startswith(".") for p in folder.iterdir())


def _lone_val_folder(folder: Path) -> Path | None:
    """``folder``'s val/ (or validation/) when that is all it holds and it holds class
    folders: the held-out half of a train/ + val/ layout, copied alone. Taken as one class
    called "val" before."""
    if not folder.is_dir():  # a file or a missing path: load_folder names the problem
        return None
    entries = [p for p in folder.iterdir() if not p.name.startswith(".")]
    if (len(entries) == 1 and entries[0].name in VAL_FOLDERS and entries[0].is_dir()
            and _has_subfolders(entries[0])):
        log.info("%s holds only %s/: using its class folders", folder, entries[0].name)
        return entries[0]
    return None


def is_array_file(source: str) -> bool:
    """Whether ``source`` names a .npy array (the suffix in any case), not a folder."""
    path = Path(source)
    return path.suffix.lower() == ".npy" and not path.is_dir()


def load_folder(folder: Path, resolution: int, limit: int | None = None,
                on_image: Callable[[], None] | None = None) -> ImageSet:

    if folder.is_file():
        raise UserError(f"{folder} is a file; pass a folder of images (searched recursively), "
                        "a preprocessed .npy array, or digits.")
    if not folder.is_dir():
        raise UserError(f"Image folder not found: {folder}.")
    images, others = find_files(folder)
    skipped = [str(p.relative_to(folder)) for p in others]
    if not images:
        raise UserError(f"No images in {folder} (searched recursively for "
                        f"{', '.join(IMAGE_SUFFIXES)}).")
    class_names = _class_names(folder, images)  # from every image, before subsampling
    images = _subsample(images, limit)
    _check_fits_in_memory(len(images), resolution, folder)
    arrays, broken = [], []
    for p in images:
        try:
            with Image.open(p) as image:
                arrays.append(preprocess(image, resolution))
        except DECODE_ERRORS as err:
            broken.append(f"{p.relative_to(folder)} ({_decode_failure(err)})")
        if on_image is not None:
            on_image()
    if broken:
        raise UserError(f"{len(broken)} image(s) in {folder} cannot be decoded: "
                        f"{', '.join(broken[:5])}{' ...' if len(broken) > 5 else ''}. "
                        "Remove or fix them and run again.")
    labels = _labels(folder, images, class_names) if class_names else None
    unlabelled = [str(p.relative_to(folder)) for p in images if _class_of(p, folder) is None]
    return ImageSet(np.stack(arrays), labels, class_names,
                    f"{len(arrays)} images from {folder}", skipped,
                    unlabelled if class_names else [])


def _decode_failure(err: Exception) -> str:
    """A few words on why Pillow could not decode an image."""
    if isinstance(err, Image.DecompressionBombError):
        return (f"over {2 * (Image.MAX_IMAGE_PIXELS or 0):,} pixels, which Pillow refuses as "
                "a possible decompression bomb; downscale it")
    return type(err).__name__


def probe_images(source: str, resolution: int, split: str, remedy: str) -> None:
    """Fail now where ``load_images(source, resolution, split=split)`` would fail later: a
    wrong path or array, no images, or more images than memory holds (``remedy``: what to ask
    for instead, with ``{fits}`` for the count that fits). Reads one image."""
    load_images(source, resolution, limit=1, split=split)
    if source == "digits":
        return
    path = Path(source)
    if is_array_file(source):
        count = len(np.load(path, mmap_mode="r", allow_pickle=False))
    else:
        path = split_folder(path, split)
        count = len(find_files(path)[0])
    _check_fits_in_memory(count, resolution, path, remedy=remedy)


MEMINFO = Path("/proc/meminfo")  # where Linux says how much memory is available


def _check_fits_in_memory(count: int, resolution: int, folder: Path,
                          meminfo: Path | None = None,
                          remedy: str = "Ask for an evenly spread subset of at most {fits} "
                                        "(eval --limit, build --calib-size).") -> None:
    """Refuse a folder (or .npy file) whose preprocessed images (count · 3 · R² float32) would
    take more than half the memory available now: they are held in memory together."""
    per_image = 3 * resolution * resolution * np.dtype(np.float32).itemsize
    needed = count * per_image
    try:
        line = next(ln for ln in (meminfo or MEMINFO).read_text().splitlines()
                    if ln.startswith("MemAvailable:"))
        available = int(line.split()[1]) * 1024
    except (OSError, StopIteration, ValueError, IndexError):
        return  # not Linux, or no figure: nothing to check against
    if needed > available // 2:
        fits = max(1, available // 2 // per_image)
        raise UserError(
            f"{count} images from {folder} at {resolution}² need {needed / 2**30:.1f} GiB in "
            f"memory, more than half of the {available / 2**30:.1f} GiB available. "
            + remedy.format(fits=fits))


def _class_of(image: Path, folder: Path) -> str | None:
    """The top-level subfolder of ``folder`` that holds ``image``; None at the top level."""
    parts = image.relative_to(folder).parts
    return parts[0] if len(parts) > 1 else None


def _class_names(folder: Path, images: list[Path]) -> list[str]:
    """The sorted top-level subfolders that hold ``images``: the classes, when there are two or
    more, or one with no image beside it (one class of a model that names its classes)."""
    tops = {_class_of(p, folder) for p in images}
    classes = sorted(t for t in tops if t is not None)
    return classes if len(classes) >= 2 or tops == {*classes} else []


def _labels(folder: Path, images: list[Path], class_names: list[str]) -> np.ndarray:
    """Each image's index in ``class_names`` by its class folder; -1 outside them."""
    index = {name: i for i, name in enumerate(class_names)}
    classes = [_class_of(p, folder) for p in images]
    return np.array([-1 if c is None else index[c] for c in classes], dtype=np.int64)


def _subsample(items: list, limit: int | None) -> list:
    """At most ``limit`` items, evenly spread (deterministic), so every class is represented."""
    if limit is None or len(items) <= limit:
        return items
    picks = np.linspace(0, len(items) - 1, limit).round().astype(int)
    return [items[i] for i in picks]


def _load_npy(path: Path, resolution: int, limit: int | None) -> ImageSet:
    if not path.is_file():
        raise UserError(f"Image array not found: {path}.")
    try:  # mapped, not read: only the rows used are read, after the memory check
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as err:
        raise UserError(f"Cannot read {path} as a .npy array: {_npy_problem(err)} Save "
                        "preprocessed inputs with numpy.save(path, float32_array).") from err
    except EOFError as err:  # an empty file
        raise UserError(f"Cannot read {path} as a .npy array: the file is empty.") from err
    except OSError as err:
        raise UserError(f"Cannot read {path} as a .npy array ({err}).") from err
    expected = (3, resolution, resolution)
    if array.ndim != 4 or tuple(array.shape[1:]) != expected:
        raise UserError(f"{path} has shape {list(array.shape)}; expected [N, 3, {resolution}, "
                        f"{resolution}] preprocessed inputs (RGB, [0, 1]).")
    if len(array) == 0:
        raise UserError(f"{path} holds no samples.")
    rows = _subsample(list(range(len(array))), limit)
    _check_fits_in_memory(len(rows), resolution, path)
    array = np.asarray(array[rows])  # reads those rows only
    _check_preprocessed(array, path)
    array = array.astype(np.float32, copy=False)
    return ImageSet(array, description=f"{len(array)} arrays from {path}")


def _npy_problem(err: ValueError) -> str:
    """numpy's reason for refusing a .npy, without its advice to allow pickles."""
    if "allow_pickle" in str(err):  # not a .npy header, or an object array
        return ("it is not a plain numeric NumPy file (mvcompile does not load pickled "
                "objects).")
    if "mmap length is greater than file size" in str(err):
        return "the file is shorter than its header says: it was cut short."
    return f"{first_line(err).rstrip('.')}."


def _check_preprocessed(array: np.ndarray, path: Path) -> None:
    """Refuse arrays that are not preprocessed pixels: floats, finite, within [0, 1]."""
    if not np.issubdtype(array.dtype, np.floating):
        raise UserError(f"{path} holds {array.dtype} values; expected float32 pixels scaled to "
                        "[0, 1] (divide 8-bit images by 255).")
    if not np.isfinite(array).all():
        raise UserError(f"{path} holds NaN or infinite values.")
    low, high = float(array.min()), float(array.max())
    if low < -1e-3 or high > 1 + 1e-3:
        raise UserError(f"{path} holds values in [{low:.3g}, {high:.3g}]; the models take RGB "
                        "pixels scaled to [0, 1] with no mean/std normalization.")


_ZOOMS = (1.0, 0.75, 0.5)  # central crops of the bundled photos
BUNDLED_CROPS = len(_BUNDLED_PHOTOS) * len(_ZOOMS)


def bundled_photos(resolution: int, count: int = 32,
                   on_image: Callable[[], None] | None = None) -> ImageSet:
    """Real photos shipped with scikit-image, with deterministic crops to reach ``count``: each
    photo whole, then their 75% and then 50% central crops, so at most
    :data:`BUNDLED_CROPS` different images (fewer than ``count`` where it asks for more)."""
    import skimage.data

    photos = []
    for name in _BUNDLED_PHOTOS:
        array = getattr(skimage.data, name)()
        photos.append(Image.fromarray(array if array.ndim == 3 else np.stack([array] * 3, -1)))
    samples = []
    count = min(count, BUNDLED_CROPS)
    for i in range(count):
        photo = photos[i % len(photos)]
        zoom = _ZOOMS[i // len(photos)]
        w, h = photo.size
        cw, ch = int(w * zoom), int(h * zoom)
        crop = photo.crop(((w - cw) // 2, (h - ch) // 2, (w + cw) // 2, (h + ch) // 2))
        samples.append(_counted(preprocess(crop, resolution), on_image))
    return ImageSet(np.stack(samples),
                    description=f"{count} crops of {len(photos)} scikit-image sample photos "
                                "(bundled default; pass --calib-data for your own images)")


def _counted(item: np.ndarray, on_image: Callable[[], None] | None) -> np.ndarray:
    """``item``, after telling ``on_image`` (a progress bar) that one more image is ready."""
    if on_image is not None:
        on_image()
    return item


def digits(resolution: int, split: str = "val", limit: int | None = None,
           on_image: Callable[[], None] | None = None) -> ImageSet:
    """scikit-learn's digits with the split and preprocessing of ``mvcompile train``."""
    from mvcompile.train.data import eval_item, load_data

    data = load_data("digits")
    source = data.val if split == "val" else data.train
    indices = _subsample(list(range(len(source))), limit)
    pixels = np.stack([_counted(eval_item(source, i, resolution), on_image) for i in indices])
    labels = np.array([source.labels[i] for i in indices])
    return ImageSet(pixels, labels, source.classes,
                    f"{len(indices)} {split} images of scikit-learn digits")
