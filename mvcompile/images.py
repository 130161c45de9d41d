"""Image files as every command reads them: found the same way, decoded to 8-bit RGB.

Finding: a folder is searched at any depth, following symlinked folders (each real folder
once, so a link loop ends), in sorted order: a folder reachable under two names is read under
the name that sorts first. Hidden files and folders (names starting with ".", such as macOS's
``._photo.jpg`` AppleDouble files) are not images.

Decoding: the EXIF orientation is applied first (phone photos are stored sideways with an
Orientation tag), then the pixels become 8-bit RGB. Pillow's own ``convert("RGB")`` clips
16-bit greyscale (modes ``I;16*`` and ``I``) at 255, which would turn almost every pixel white,
so those are scaled by 255/65535 first. Floating-point images (mode ``F``) have no standard
range and are refused.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError, features

from mvcompile.errors import UserError


def _avif_suffixes() -> tuple[str, ...]:
    """(".avif",) where this Pillow decodes AVIF (built in since Pillow 11.2), else ()."""
    try:
        return (".avif",) if features.check_module("avif") else ()
    except ValueError:  # an older Pillow that has no such module name
        return ()


# The formats Pillow always decodes, under each suffix it registers for them (``.pfm`` is
# left out: its float pixels have no standard range, see :func:`mode_problem`).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".apng", ".bmp", ".webp", ".ppm",
                  ".pgm", ".pbm", ".pnm", ".tif", ".tiff", ".gif", *_avif_suffixes())
# What Pillow raises for a file it cannot decode. DecompressionBombError (a header claiming
# more than twice Image.MAX_IMAGE_PIXELS) derives from Exception alone, and some plugins
# raise SyntaxError or EOFError for damaged headers.
DECODE_ERRORS = (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError,
                 Image.DecompressionBombError)
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def mode_problem(image: Image.Image) -> str | None:
    """Why :func:`to_rgb` refuses ``image``'s pixel mode, or None if it takes it."""
    if image.mode == "F":
        return "floating-point pixels, which have no standard range"
    return None


def find_files(root: Path) -> tuple[list[Path], list[Path]]:
    """(image files, other files) under ``root``, each list sorted.

    "Other" holds non-image suffixes, hidden files, files inside hidden folders and broken
    links, so that callers can say what they skipped.
    """
    images, others, seen = [], [], set()
    for folder, subfolders, names in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            subfolders[:] = []
            continue
        seen.add(real)
        subfolders.sort()  # walk in sorted order, so a folder linked twice gets one name
        hidden_folder = any(part.startswith(".") for part in Path(folder).relative_to(root).parts)
        for name in names:
            path = Path(folder, name)
            is_image = (path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()
                        and not name.startswith(".") and not hidden_folder)
            (images if is_image else others).append(path)
    return sorted(images), sorted(others)


def to_rgb(image: Image.Image) -> Image.Image:
    """An opened image, upright and as 8-bit RGB (see the module docstring)."""
    problem = mode_problem(image)
    if problem is not None:
        raise UserError(f"{_name(image)} holds {problem}; save it as an 8- or 16-bit image.")
    image = ImageOps.exif_transpose(image)  # always a new image (a copy when already upright)
    if image.mode in _SIXTEEN_BIT_MODES:
        wide = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.round(np.clip(wide, 0, 65535) * (255 / 65535))
                                .astype(np.uint8))
    if image.mode == "P" and "transparency" in image.info:
        # Through RGBA: Pillow warns on every such file converted straight to RGB (the pixels
        # are the same either way; the transparency is dropped).
        image = image.convert("RGBA")
    # convert("RGB") of an RGB image is one more full copy: skipped, this runs per image
    return image if image.mode == "RGB" else image.convert("RGB")


def _name(image: Image.Image) -> str:
    return str(getattr(image, "filename", "") or "an image")
