"""Training data: folder layouts, clear errors for bad folders, augmentation, digits."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mvcompile.errors import UserError
from mvcompile.train.data import (
    eval_item,
    load_data,
    random_resized_crop,
    stratified_split,
    train_item,
)


def make_folder(root: Path, counts: dict[str, int], size: tuple[int, int] = (24, 16)) -> Path:
    """Solid-ish images: class i has a dominant colour channel i, plus noise."""
    rng = np.random.default_rng(0)
    for c, (name, n) in enumerate(counts.items()):
        (root / name).mkdir(parents=True, exist_ok=True)
        for k in range(n):
            pixels = rng.integers(0, 60, (size[1], size[0], 3), dtype=np.uint8)
            pixels[..., c % 3] += 180
            Image.fromarray(pixels).save(root / name / f"{k}.png")
    return root


def test_folder_with_val_split_is_stratified(tmp_path: Path) -> None:
    data = load_data(str(make_folder(tmp_path, {"cat": 10, "dog": 20})), val_split=0.2)
    assert data.train.classes == ["cat", "dog"]
    assert len(data.train) == 24 and len(data.val) == 6
    assert np.bincount(data.val.labels).tolist() == [2, 4]
    assert not set(data.train.items) & set(data.val.items)


def test_train_and_val_folders_are_used_as_given(tmp_path: Path) -> None:
    make_folder(tmp_path / "train", {"a": 3, "b": 4})
    make_folder(tmp_path / "val", {"a": 1, "b": 2})
    data = load_data(str(tmp_path))
    assert (len(data.train), len(data.val)) == (7, 3)
    assert data.val.labels == [0, 1, 1]
    x = eval_item(data.val, 0, 64)
    assert x.shape == (3, 64, 64) and x.dtype == np.float32 and 0.0 <= x.min() <= x.max() <= 1.0
    assert x[0].mean() > x[1].mean()  # class "a" is red, and channels stay RGB


@pytest.mark.parametrize("nested", [False, True])
def test_a_class_called_train_beside_other_classes_is_a_class(tmp_path: Path,
                                                               nested: bool) -> None:
    """CIFAR-100 has a class "train": it was taken as the train/ split ("empty for training:
    6 images but no class subfolders"), or, with its images in subfolders, those subfolders
    became the classes. Without val/ beside it and with other class folders, it is a class."""
    make_folder(tmp_path, {"bicycle": 3, "bus": 3, **({} if nested else {"train": 3})})
    if nested:
        make_folder(tmp_path / "train", {"photos": 3})
    data = load_data(str(tmp_path), val_split=0.34)
    assert data.train.classes == ["bicycle", "bus", "train"]
    assert len(data.train) + len(data.val) == 9


@pytest.mark.parametrize(("setup", "message"), [
    (lambda p: None, "holds no images"),
    (lambda p: (p / "x").mkdir(), "subfolders hold no images"),
    (lambda p: Image.new("RGB", (4, 4)).save(p / "loose.png"), "no class subfolders"),
    (lambda p: make_folder(p, {"only": 3}), "only one class ('only')"),
    (lambda p: make_folder(p, {"a": 2}) and (p / "b").mkdir(), "without images in"),
])
def test_bad_folders_give_clear_errors(tmp_path: Path, setup, message: str) -> None:
    setup(tmp_path)
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_data(str(tmp_path))


def test_missing_folder_and_bad_split_are_user_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no such folder"):
        load_data(str(tmp_path / "nope"))
    with pytest.raises(UserError, match="between 0 and 1"):
        load_data("digits", val_split=1.0)


def test_digits_split_is_fixed_and_stratified() -> None:
    data = load_data("digits")
    assert (len(data.train), len(data.val)) == (1438, 359)
    assert load_data("digits").val.items == data.val.items
    assert set(np.bincount(data.val.labels)) <= {35, 36, 37}
    x = train_item(data.train, 0, 64, seed=3, min_scale=0.6, flip=False)
    assert x.shape == (3, 64, 64) and np.array_equal(x[0], x[2])  # grey replicated to RGB
    assert np.array_equal(x, train_item(data.train, 0, 64, seed=3, min_scale=0.6, flip=False))


def test_random_resized_crop_covers_the_area_range_and_flips() -> None:
    img = Image.fromarray(np.tile(np.arange(100, dtype=np.uint8), (100, 1)))  # ramp in x
    rng = np.random.default_rng(0)
    outs = [np.asarray(random_resized_crop(img, 32, rng, 0.5, True)) for _ in range(40)]
    assert all(o.shape == (32, 32) for o in outs)
    increasing = [o[0, -1] > o[0, 0] for o in outs]
    assert 5 < sum(increasing) < 35  # about half are mirrored
    spans = [abs(int(o[0, -1]) - int(o[0, 0])) for o in outs]
    assert min(spans) >= 40 and max(spans) <= 100  # width ≥ √(0.5·¾)·100 ≈ 61 pixels


def test_stratified_split_keeps_one_training_image_per_class() -> None:
    train, val = stratified_split([0, 0, 1, 1, 1], 0.9)
    assert sorted(train + val) == [0, 1, 2, 3, 4]
    assert {0, 1} & set(train) and {2, 3, 4} & set(train)


def test_images_beside_the_class_folders_are_named_as_unused(tmp_path: Path, caplog) -> None:
    """train takes the subfolders as classes; a photo left at the top level was dropped
    without a word (eval names such images too)."""
    make_folder(tmp_path, {"cat": 5, "dog": 5})
    Image.new("RGB", (8, 8)).save(tmp_path / "cover.jpg")
    (tmp_path / "notes.txt").write_text("not an image")
    data = load_data(str(tmp_path))
    assert len(data.train) + len(data.val) == 10
    assert "are in no class and are not used (1): cover.jpg" in caplog.text


def test_split_folder_takes_a_class_called_train_with_subfolders_as_a_class(
        tmp_path: Path) -> None:
    from mvcompile.calibration.data import split_folder

    make_folder(tmp_path, {"bicycle": 2, "bus": 2})
    make_folder(tmp_path / "train", {"photos": 2})
    assert split_folder(tmp_path, "train") == tmp_path == split_folder(tmp_path, "val")
    make_folder(tmp_path / "val", {"photos": 1})  # val/ beside train/: a split after all
    assert split_folder(tmp_path, "val") == tmp_path / "val"


def test_a_class_folder_whose_name_is_not_utf8_is_refused_before_training(
        tmp_path: Path) -> None:
    """A Latin-1 'caf\\xe9' trained a whole epoch, then writing the class names into the
    weights' header raised UnicodeEncodeError."""
    make_folder(tmp_path, {"dog": 2})
    latin1 = Path(os.fsdecode(bytes(tmp_path) + b"/caf\xe9"))
    make_folder(latin1.parent, {latin1.name: 2})
    with pytest.raises(UserError, match=r"1 class folder\(s\) .* not valid UTF-8") as error:
        load_data(str(tmp_path))
    assert "'caf\\xe9'" in str(error.value)
