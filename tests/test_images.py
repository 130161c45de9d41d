"""Image files: found the same way by calibration, eval and train; decoded upright to 8-bit RGB."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mvcompile.calibration.data import load_folder
from mvcompile.errors import UserError
from mvcompile.images import find_files, to_rgb
from mvcompile.train.data import scan_folder


def _png(path: Path, value: int = 128) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), (value, value, value)).save(path)
    return path


def test_sixteen_bit_greyscale_is_scaled_not_clipped(tmp_path: Path) -> None:
    wide = np.full((8, 8), 32768, np.uint16)  # half of the 16-bit range
    Image.fromarray(wide).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as image:
        assert image.mode.startswith("I")
        rgb = np.asarray(to_rgb(image))
    assert rgb.shape == (8, 8, 3) and np.all(rgb == 128)  # Pillow's convert gives 255


def test_palette_images_with_byte_transparency_convert_without_a_warning(tmp_path: Path
                                                                         ) -> None:
    """Pillow's "Palette images with Transparency expressed in bytes" warning reached the
    user's terminal once per run."""
    palette = Image.new("P", (4, 4), 7)
    palette.putpalette([(3 * i) % 256 for i in range(768)])
    palette.save(tmp_path / "p.png", transparency=bytes([0] * 255 + [255]))
    import warnings

    with Image.open(tmp_path / "p.png") as opened, warnings.catch_warnings():
        index, palette = opened.getpixel((0, 0)), opened.getpalette()
        warnings.simplefilter("error")
        rgb = to_rgb(opened)
    assert rgb.mode == "RGB" and rgb.getpixel((0, 0)) == tuple(palette[3 * index:3 * index + 3])


def test_floating_point_images_are_refused(tmp_path: Path) -> None:
    Image.fromarray(np.full((8, 8), 0.5, np.float32)).save(tmp_path / "f.tif")
    with Image.open(tmp_path / "f.tif") as image, pytest.raises(UserError, match="floating"):
        to_rgb(image)


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    """A 16×8 photo stored with Orientation 6 (turn 90° clockwise to view) is 8×16 upright,
    and its stored top half (red) becomes the right half."""
    stored = np.zeros((8, 16, 3), np.uint8)
    stored[:4] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(tmp_path / "rot.jpg", exif=exif, quality=100, subsampling=0)
    with Image.open(tmp_path / "rot.jpg") as image:
        upright = np.asarray(to_rgb(image))
    assert upright.shape == (16, 8, 3)
    assert upright[:, -1, 0].min() > 200 and upright[:, 0, 0].max() < 60


def test_symlinked_folders_are_followed_once_and_hidden_files_skipped(tmp_path: Path) -> None:
    real = tmp_path / "real"
    _png(real / "cat" / "a.png")
    _png(real / "dog" / "b.png")
    _png(real / "dog" / "._b.png")  # macOS AppleDouble metadata
    _png(real / ".cache" / "c.png")
    root = tmp_path / "root"
    root.mkdir()
    os.symlink(real / "cat", root / "cat")
    os.symlink(real / "dog", root / "dog")
    os.symlink(root, real / "dog" / "loop")  # a cycle must not recurse for ever
    os.symlink(tmp_path / "gone.png", root / "broken.png")
    images, others = find_files(root)
    assert [p.relative_to(root).as_posix() for p in images] == ["cat/a.png", "dog/b.png"]
    assert {p.name for p in others} == {"._b.png", "broken.png"}


def test_calibration_and_train_read_symlinked_class_folders_alike(tmp_path: Path) -> None:
    for name, value in (("cat", 40), ("dog", 200)):
        _png(tmp_path / "real" / name / "x.png", value)
        _png(tmp_path / "real" / name / "y.png", value)
        (tmp_path / "root").mkdir(exist_ok=True)
        os.symlink(tmp_path / "real" / name, tmp_path / "root" / name)
    calibration = load_folder(tmp_path / "root", resolution=8)
    assert calibration.class_names == ["cat", "dog"]
    assert calibration.labels.tolist() == [0, 0, 1, 1]
    assert np.allclose(calibration.pixels[2], 200 / 255)
    train = scan_folder(tmp_path / "root")
    assert train.classes == ["cat", "dog"] and train.labels == [0, 0, 1, 1]


@pytest.mark.parametrize("suffix", [".jfif", ".jpe", ".pgm", ".pbm", ".pnm", ".apng"])
def test_every_suffix_pillow_registers_for_its_formats_is_an_image(tmp_path: Path,
                                                                   suffix: str) -> None:
    """JPEG saved as .jfif/.jpe (Windows), greyscale .pgm: Pillow decodes them all, so they
    are read, not skipped as non-image files."""
    image = Image.new("RGB", (16, 16), (200, 100, 50))
    fmt = {".jfif": "JPEG", ".jpe": "JPEG", ".apng": "PNG"}.get(suffix, "PPM")
    (image.convert("L") if suffix in (".pgm", ".pbm") else image).save(
        tmp_path / f"a{suffix}", format=fmt)
    images, others = find_files(tmp_path)
    assert images == [tmp_path / f"a{suffix}"] and others == []
    assert load_folder(tmp_path, resolution=8).pixels.shape == (1, 3, 8, 8)


def test_a_folder_linked_twice_is_read_under_the_name_that_sorts_first(tmp_path: Path) -> None:
    _png(tmp_path / "z_real" / "a.png")
    os.symlink(tmp_path / "z_real", tmp_path / "a_link")
    images, _ = find_files(tmp_path)
    assert images == [tmp_path / "a_link" / "a.png"]
    assert load_folder(tmp_path, resolution=8).class_names == ["a_link"]


def test_an_image_over_pillows_size_limit_is_a_clean_error(tmp_path: Path, monkeypatch) -> None:
    """Pillow raises DecompressionBombError (not an OSError) for a header claiming more than
    twice MAX_IMAGE_PIXELS: 179 M pixels by default, 100 here."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50)
    _png(tmp_path / "cls" / "huge.png")  # 256 pixels
    with pytest.raises(UserError, match=r"cls/huge\.png \(over 100 pixels, which Pillow refuses"):
        load_folder(tmp_path, resolution=8)


def test_images_beside_the_class_folders_are_read_without_a_label(tmp_path: Path) -> None:
    _png(tmp_path / "cat" / "a.png")
    _png(tmp_path / "dog" / "b.png")
    _png(tmp_path / "cover.png")
    images = load_folder(tmp_path, resolution=8)
    assert images.class_names == ["cat", "dog"]
    assert images.labels.tolist() == [0, -1, 1]  # sorted: cat/a.png, cover.png, dog/b.png
    assert images.unlabelled == ["cover.png"] and len(images.pixels) == 3


def test_one_class_folder_is_a_class_unless_images_lie_beside_it(tmp_path: Path) -> None:
    _png(tmp_path / "only" / "cat" / "a.png")
    one = load_folder(tmp_path / "only", resolution=8)
    assert one.class_names == ["cat"] and one.labels.tolist() == [0]
    _png(tmp_path / "only" / "b.png")  # a folder of images with one subfolder: no classes
    mixed = load_folder(tmp_path / "only", resolution=8)
    assert mixed.labels is None and mixed.unlabelled == []
