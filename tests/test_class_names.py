"""Class names: read from checkpoints, recorded in built models, matched against labelled data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from PIL import Image
from safetensors.numpy import save_file

from conftest import build_random, run
from mvcompile.calibration.data import ImageSet
from mvcompile.graphs.checkpoints import CLASS_NAMES_KEY, checkpoint_class_names
from mvcompile.graphs.factory import record_class_names
from mvcompile.graphs.mobilevit import MobileViTConfig
from mvcompile.labels import match_labels

TENSORS = {"w": np.zeros(2, np.float32)}


def _safetensors(path: Path, metadata: dict[str, str] | None = None) -> Path:
    save_file(TENSORS, str(path), metadata=metadata)
    return path


def _hf_folder(folder: Path, id2label: dict[str, str] | None) -> Path:
    folder.mkdir()
    _safetensors(folder / "model.safetensors", {"format": "pt"})
    config = {"model_type": "mobilevit"} | ({"id2label": id2label} if id2label else {})
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_train_checkpoints_name_their_classes_as_json_or_the_older_comma_form(tmp_path: Path
                                                                              ) -> None:
    new = _safetensors(tmp_path / "new.safetensors",
                       {CLASS_NAMES_KEY: json.dumps(["cat, domestic", "dog"])})
    assert checkpoint_class_names(new) == ["cat, domestic", "dog"]  # commas survive
    old = _safetensors(tmp_path / "old.safetensors", {"mvcompile.classes": "0,1,2"})
    assert checkpoint_class_names(old) == ["0", "1", "2"]
    both = _safetensors(tmp_path / "both.safetensors",
                        {CLASS_NAMES_KEY: '["a,b"]', "mvcompile.classes": "a,b"})
    assert checkpoint_class_names(both) == ["a,b"]


@pytest.mark.parametrize("metadata", [None, {CLASS_NAMES_KEY: "not json"},
                                      {CLASS_NAMES_KEY: '{"0": "a"}'},
                                      {CLASS_NAMES_KEY: "[1, 2]"}])
def test_checkpoints_without_usable_names_give_none(tmp_path: Path, metadata: dict | None
                                                    ) -> None:
    assert checkpoint_class_names(_safetensors(tmp_path / "w.safetensors", metadata)) is None


def test_other_files_give_none(tmp_path: Path) -> None:
    (tmp_path / "model.pt").write_bytes(b"")
    assert checkpoint_class_names(tmp_path / "model.pt") is None
    assert checkpoint_class_names(tmp_path / "missing.safetensors") is None


def test_hugging_face_id2label_is_ordered_by_id(tmp_path: Path) -> None:
    folder = _hf_folder(tmp_path / "hf", {"1": "dog", "0": "cat", "2": "bird, small"})
    assert checkpoint_class_names(folder) == ["cat", "dog", "bird, small"]
    assert checkpoint_class_names(folder / "model.safetensors") == ["cat", "dog", "bird, small"]


@pytest.mark.parametrize("id2label", [{"0": "LABEL_0", "1": "LABEL_1"},  # transformers' default
                                      {"0": "cat", "2": "dog"},  # ids are not 0..N-1
                                      None])
def test_hugging_face_folders_without_real_labels_give_none(tmp_path: Path,
                                                            id2label: dict | None) -> None:
    assert checkpoint_class_names(_hf_folder(tmp_path / "hf", id2label)) is None


def test_unreadable_hf_config_gives_none(tmp_path: Path) -> None:
    folder = _hf_folder(tmp_path / "hf", None)
    (folder / "config.json").write_text("{broken")
    assert checkpoint_class_names(folder) is None


def test_names_are_recorded_only_with_one_per_class() -> None:
    model = ir.Model(ir.Graph([], [], nodes=[]), ir_version=10)
    record_class_names(model, ["a", "b"], num_classes=3)
    assert CLASS_NAMES_KEY not in model.metadata_props
    record_class_names(model, None, num_classes=2)
    assert CLASS_NAMES_KEY not in model.metadata_props
    record_class_names(model, ["a", "b"], num_classes=2)
    assert json.loads(model.metadata_props[CLASS_NAMES_KEY]) == ["a", "b"]


def _labelled(names: list[str], labels: list[int]) -> ImageSet:
    return ImageSet(np.zeros((len(labels), 3, 4, 4), np.float32), np.array(labels), names)


def test_matching_labels_by_name() -> None:
    images = _labelled(["a", "b", "c"], [0, 1, 2, 2])
    same = match_labels(images, 3, ["a", "b", "c"])
    assert same.labels.tolist() == [0, 1, 2, 2] and same.note is None
    swapped = match_labels(images, 3, ["c", "a", "b"])
    assert swapped.labels.tolist() == [1, 2, 0, 0] and "by name" in swapped.note
    subset = match_labels(_labelled(["b", "d"], [0, 1]), 4, ["a", "b", "c", "d"])
    assert subset.labels.tolist() == [1, 3] and "2 of its 4 classes" in subset.note
    other = match_labels(images, 3, ["a", "b", "x"], source="the folder")
    assert other.labels is None
    assert other.not_scored == ("not scored: 1 of the 3 classes of the folder is not among "
                                "the model's 3 classes: c")


def test_names_that_cannot_identify_classes_are_ignored() -> None:
    images = _labelled(["a", "b"], [0, 1])
    # ImageNet's id2label names two classes "crane": names cannot tell them apart.
    assert match_labels(images, 2, ["crane", "crane"]).labels.tolist() == [0, 1]
    assert match_labels(images, 2, ["a", "b", "c"]).labels.tolist() == [0, 1]  # not 1 per output


def test_a_folder_with_another_naming_scheme_is_scored_in_order_with_a_note() -> None:
    """ImageNet val folders are synset ids; Hugging Face labels are words."""
    images = _labelled(["n01440764", "n01443537"], [0, 1, 1])
    match = match_labels(images, 2, ["tench, Tinca tinca", "goldfish"])
    assert match.labels.tolist() == [0, 1, 1]
    assert "share no name" in match.note and "n01440764" in match.note


def _photo_folder(root: Path, classes: tuple[str, ...]) -> Path:
    rng = np.random.default_rng(0)
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(
                root / name / f"{i}.png")
    return root


def test_built_models_carry_the_checkpoints_class_names(tmp_path: Path) -> None:
    """Both model.onnx and model_int8.onnx record them; build --eval-data and eval use them."""
    names = ["zebra", "yak", "ant"]
    cfg = MobileViTConfig.for_size("xxs", resolution=64, num_classes=3)
    weights = tmp_path / "w.safetensors"
    save_file(build_random(cfg)[1], str(weights), metadata={CLASS_NAMES_KEY: json.dumps(names)})
    folder = _photo_folder(tmp_path / "eval", ("ant", "zebra"))
    out = tmp_path / "o"
    code, output = run("build", "--weights", str(weights), "--resolution", "64",
                       "--num-classes", "3", "--latency-runs", "0", "--int8", "--calib-size", "2",
                       "--calib-data", str(folder), "--eval-data", str(folder), "-o", str(out))
    assert code == 0, output
    for name in ("model.onnx", "model_int8.onnx"):
        metadata = {p.key: p.value for p in onnx.load(str(out / name)).metadata_props}
        assert json.loads(metadata[CLASS_NAMES_KEY]) == names, name
    accuracy = json.loads((out / "report.json").read_text())["int8"]["accuracy"]["eval"]
    assert "top1_fp32" in accuracy and "2 of its 3 classes" in accuracy["notes"][0]
    code, output = run("eval", str(out / "model_int8.onnx"), "--data", str(folder))
    assert code == 0, output
    assert "top-1 (model)" in output and "2 of its 3 classes" in output, output
    code, output = run("eval", str(out / "model.onnx"), "--data",
                       str(_photo_folder(tmp_path / "other", ("ant", "bee", "wasp"))))
    assert code == 0, output
    assert ("not scored: 2 of the 3 classes of the folder are not among the model's 3 classes: "
            "bee, wasp") in output
