"""``mvcompile eval`` on unusual models: fixed batches, no inputs or outputs, broken graphs,
.ort files, the wording of its notes for each kind of --data, and class names."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from PIL import Image

from conftest import assert_clean_failure, run
from mvcompile.calibration.data import ImageSet
from mvcompile.errors import UserError
from mvcompile.evaluate import predict
from mvcompile.graphs.checkpoints import CLASS_NAMES_KEY

COLOURS = {"0red": (255, 0, 0), "1green": (0, 255, 0), "2blue": (0, 0, 255)}


def _save(path: Path, inputs: list, outputs: list, nodes: list) -> str:
    """An ir_version 10, opset 24 model of ``nodes`` written to ``path``."""
    graph = helper.make_graph(nodes, path.stem, inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 24)])
    model.ir_version = 10
    onnx.save(model, str(path))
    return str(path)


def _channel_means(path: Path, input_shape: list, output_shape: list) -> str:
    """y[n, c] = mean of x[n, c]: 3 "logits", the largest for the image's dominant colour."""
    nodes = [helper.make_node("GlobalAveragePool", ["x"], ["p"]),
             helper.make_node("Flatten", ["p"], ["y"])]
    return _save(path, [helper.make_tensor_value_info("x", TensorProto.FLOAT, input_shape)],
                 [helper.make_tensor_value_info("y", TensorProto.FLOAT, output_shape)], nodes)


def _colour_folder(folder: Path, counts: tuple[int, ...] = (4, 3, 3)) -> Path:
    """One subfolder per colour class (sorted like the channels), ``counts`` images each."""
    for (name, rgb), count in zip(COLOURS.items(), counts, strict=True):
        (folder / name).mkdir(parents=True)
        for i in range(count):
            pixels = np.full((16, 16, 3), rgb, np.uint8) // (i + 1)  # distinct, same argmax
            Image.fromarray(pixels).save(folder / name / f"{i}.png")
    return folder


def test_fixed_batch_pads_the_last_batch_and_drops_the_padding(tmp_path: Path) -> None:
    model = _channel_means(tmp_path / "fixed4.onnx", [4, 3, 16, 16], [4, 3])
    pixels = np.random.default_rng(0).uniform(0, 1, (10, 3, 16, 16)).astype(np.float32)
    seen: list[int] = []
    logits = predict(model, ImageSet(pixels), on_batch=seen.append)
    assert seen == [4, 4, 2]  # the real images of each run, not the padded batch
    np.testing.assert_allclose(logits, pixels.mean(axis=(2, 3)), rtol=1e-5)


def test_eval_cli_scores_every_image_of_a_fixed_batch_model(tmp_path: Path) -> None:
    model = _channel_means(tmp_path / "fixed4.onnx", [4, 3, 16, 16], [4, 3])
    code, output = run("eval", model, "--data", str(_colour_folder(tmp_path / "imgs")))
    assert code == 0, output
    assert "10 images" in output and "100.00%" in output, output


def test_model_without_inputs_fails_cleanly(tmp_path: Path) -> None:
    constant = helper.make_tensor("c", TensorProto.FLOAT, [1, 3], [1.0, 2.0, 3.0])
    model = _save(tmp_path / "noinputs.onnx", [],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
                  [helper.make_node("Constant", [], ["y"], value=constant)])
    code, output = run("eval", model, "--data", str(_colour_folder(tmp_path / "imgs")))
    assert_clean_failure(code, output, "noinputs.onnx has no inputs", "[N, 3, H, W]")


def test_model_without_outputs_fails_cleanly(tmp_path: Path) -> None:
    model = _channel_means(tmp_path / "nooutputs.onnx", [1, 3, 16, 16], [1, 3])
    proto = onnx.load(model)
    del proto.graph.output[:]
    onnx.save(proto, model)
    code, output = run("eval", model, "--data", str(_colour_folder(tmp_path / "imgs")))
    assert_clean_failure(code, output, "nooutputs.onnx has no outputs", "logits")


def test_a_model_ort_cannot_load_is_named_by_its_path(tmp_path: Path) -> None:
    model = _save(tmp_path / "badop.onnx",
                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
                  [helper.make_node("NoSuchOp", ["x"], ["y"])])
    code, output = run("eval", model, "--data", str(_colour_folder(tmp_path / "imgs")))
    assert_clean_failure(code, output, f"cannot load {model}", "NoSuchOp")


def test_a_too_new_ir_version_is_named_with_the_way_out(tmp_path: Path) -> None:
    model = _colour_model(tmp_path / "new.onnx")
    proto = onnx.load(model)
    proto.ir_version = 99
    onnx.save(proto, model)
    code, output = run("eval", model, "--data", "digits")
    assert_clean_failure(code, output, "Unsupported model IR version: 99", "mvcompile optimize")


def test_notes_name_the_kind_of_data(tmp_path: Path) -> None:
    model = _channel_means(tmp_path / "m.onnx", ["N", 3, 8, 8], ["N", 3])
    code, output = run("eval", model, "--data", "digits", "--limit", "20")
    assert code == 0, output
    assert "not scored: digits has 10 classes, the model 3 outputs" in output, output
    assert "the folder has" not in output
    array = tmp_path / "pixels.npy"
    np.save(array, np.full((5, 3, 8, 8), 0.5, np.float32))
    code, output = run("eval", model, "--data", str(array))
    assert code == 0, output
    assert "a .npy array has none" in output and "subfolder per class" in output, output


def test_missing_npy_data_fails_cleanly(tmp_path: Path) -> None:
    model = _channel_means(tmp_path / "m.onnx", ["N", 3, 8, 8], ["N", 3])
    code, output = run("eval", model, "--data", str(tmp_path / "missing.npy"))
    assert_clean_failure(code, output, "not found", "missing.npy")


def test_unreadable_npy_data_is_named_with_its_problem(tmp_path: Path) -> None:
    """An empty .npy raised EOFError, which click printed as a bare 'Aborted!'; a truncated
    one was called pickled."""
    model = _channel_means(tmp_path / "m.onnx", ["N", 3, 8, 8], ["N", 3])
    (tmp_path / "empty.npy").write_bytes(b"")
    code, output = run("eval", model, "--data", str(tmp_path / "empty.npy"))
    assert_clean_failure(code, output, "empty.npy as a .npy array: the file is empty")
    np.save(tmp_path / "full.npy", np.full((4, 3, 8, 8), 0.5, np.float32))
    data = (tmp_path / "full.npy").read_bytes()
    (tmp_path / "cut.npy").write_bytes(data[:len(data) // 2])
    code, output = run("eval", model, "--data", str(tmp_path / "cut.npy"))
    assert_clean_failure(code, output, "cut.npy as a .npy array: the file is shorter than "
                         "its header says")
    assert "pickled" not in output


def test_npy_suffixes_in_any_case_and_folders_named_npy(tmp_path: Path) -> None:
    model = _channel_means(tmp_path / "m.onnx", ["N", 3, 8, 8], ["N", 3])
    np.save(tmp_path / "a.npy", np.full((4, 3, 8, 8), 0.5, np.float32))
    (tmp_path / "a.npy").rename(tmp_path / "A.NPY")
    code, output = run("eval", model, "--data", str(tmp_path / "A.NPY"))
    assert code == 0 and "4 arrays from" in output, output
    assert "a .npy array has none" in output  # named as an array, not a folder
    folder = tmp_path / "photos.npy"
    folder.mkdir()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(folder / "red.png")
    code, output = run("eval", model, "--data", str(folder))
    assert code == 0 and f"1 images from {folder}" in output, output
    assert "a .npy array has none" not in output


def test_digits_notes_a_folder_of_that_name(tmp_path: Path, monkeypatch, caplog) -> None:
    model = _channel_means(tmp_path / "m.onnx", ["N", 3, 8, 8], ["N", 3])
    (tmp_path / "digits" / "a").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    code, output = run("eval", model, "--data", "digits", "--limit", "4")
    assert code == 0, output
    assert "to use the folder ./digits instead, pass it as ./digits" in caplog.text


def _value(output: str, label: str) -> str:
    """The value in the eval table's row ``label``."""
    row = next(ln for ln in output.splitlines() if ln.startswith(f"{label}  "))
    return row.removeprefix(label).strip()


def _colour_model(path: Path, order: tuple[int, ...] = (0, 1, 2),
                  names: list[str] | None = None) -> str:
    """Channel means with the outputs in ``order`` (output i = channel order[i]), recording
    ``names`` as the model's class names."""
    nodes = [helper.make_node("GlobalAveragePool", ["x"], ["p"]),
             helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("Gather", ["f", "order"], ["y"], axis=1)]
    return _save_image_model(path, nodes, 3, helper.make_tensor("order", TensorProto.INT64,
                                                              [3], list(order)), names)


def _save_image_model(path: Path, nodes: list[onnx.NodeProto], outputs: int,
                      initializer: onnx.TensorProto, names: list[str] | None) -> str:
    """Save ``nodes`` as a model from x [N, 3, 8, 8] to y [N, ``outputs``] at ``path``,
    recording ``names`` as its class names."""
    graph = helper.make_graph(
        nodes, path.stem, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", outputs])], [initializer])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 24)])
    model.ir_version = 10
    if names is not None:
        helper.set_model_props(model, {CLASS_NAMES_KEY: json.dumps(names)})
    onnx.save(model, str(path))
    return str(path)


def test_classes_in_another_order_are_matched_by_name(tmp_path: Path) -> None:
    folder = str(_colour_folder(tmp_path / "imgs"))
    swapped = (2, 0, 1)  # outputs: blue, red, green
    unnamed = _colour_model(tmp_path / "unnamed.onnx", swapped)
    code, output = run("eval", unnamed, "--data", folder)
    assert code == 0 and _value(output, "top-1") == "0.00%", output  # folder order as model's
    named = _colour_model(tmp_path / "named.onnx", swapped, [list(COLOURS)[i] for i in swapped])
    code, output = run("eval", named, "--data", folder)
    assert code == 0, output
    assert _value(output, "top-1") == "100.00%", output  # as the model in folder order scores
    assert "matched to the model's classes by name" in output, output
    code, output = run("eval", _colour_model(tmp_path / "m.onnx", names=list(COLOURS)),
                       "--data", folder)
    assert code == 0 and "100.00%" in output and "note" not in output, output


def test_folder_classes_the_model_lacks_are_not_scored(tmp_path: Path) -> None:
    model = _colour_model(tmp_path / "m.onnx", names=["0red", "1green", "3yellow"])
    code, output = run("eval", model, "--data", str(_colour_folder(tmp_path / "imgs")))
    assert code == 0, output
    assert ("not scored: 1 of the 3 classes of the folder is not among the model's 3 classes: "
            "2blue") in output, output
    assert "%" not in output


def _digits_model(path: Path, names: list[str] | None, always: int) -> str:
    """A 10-output model for digits whose output ``always`` wins for every image."""
    weights = np.zeros((3, 10), np.float32)
    weights[:, always] = 1.0
    nodes = [helper.make_node("GlobalAveragePool", ["x"], ["p"]),
             helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("MatMul", ["f", "w"], ["y"])]
    return _save_image_model(path, nodes, 10, onnx.numpy_helper.from_array(weights, "w"), names)


def test_digits_are_matched_by_name_too(tmp_path: Path) -> None:
    """Models that always answer "3" score the share of 3s (37 of 359) however they order
    their outputs, when they name them; the validation split has 35 2s."""
    digits = [str(i) for i in range(10)]
    swapped = [*digits[:2], "3", "2", *digits[4:]]
    models = {"plain": _digits_model(tmp_path / "plain.onnx", digits, always=3),
              "swapped": _digits_model(tmp_path / "swapped.onnx", swapped, always=2),
              "unnamed": _digits_model(tmp_path / "unnamed.onnx", None, always=2)}
    scores = {}
    for name, model in models.items():
        code, output = run("eval", model, "--data", "digits")
        assert code == 0, output
        scores[name] = _value(output, "top-1")
    assert scores == {"plain": "10.31%", "swapped": "10.31%", "unnamed": "9.75%"}


@pytest.fixture(scope="module")
def ort_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """.ort files written by the project's own writer: FP32-like and "INT8" colour models with
    swapped, named classes (as `mvcompile build --targets ort` names them)."""
    from mvcompile.backends.ort import write_ort

    root = tmp_path_factory.mktemp("ort")
    swapped = (2, 0, 1)
    source = onnx.load(_colour_model(root / "src.onnx", swapped,
                                     [list(COLOURS)[i] for i in swapped]))
    return {name: write_ort(source, root, name=name)[0] for name in ("model", "model_int8")}


def test_eval_reads_ort_files_and_their_class_names(ort_models: dict[str, Path],
                                                    tmp_path: Path) -> None:
    folder = str(_colour_folder(tmp_path / "imgs"))
    code, output = run("eval", str(ort_models["model"]), "--data", folder)
    assert code == 0, output
    assert "100.00%" in output and "matched to the model's classes by name" in output, output
    code, output = run("eval", str(ort_models["model_int8"]), "--data", folder)  # finds model.ort
    assert code == 0, output
    assert _value(output, "reference") == str(ort_models["model"]), output
    assert _value(output, "top-1 agreement") == "100.00%", output


def test_ort_session_keeps_the_metadata(ort_models: dict[str, Path]) -> None:
    from mvcompile.evaluate import open_model

    opened = open_model(str(ort_models["model"]))
    assert opened.resolution == 8 and opened.class_names == ["2blue", "0red", "1green"]


def test_onnx_model_with_an_ort_reference(ort_models: dict[str, Path], tmp_path: Path) -> None:
    model = _colour_model(tmp_path / "m.onnx", (2, 0, 1), ["2blue", "0red", "1green"])
    code, output = run("eval", model, "--data", str(_colour_folder(tmp_path / "imgs")),
                       "--reference", str(ort_models["model"]))
    assert code == 0, output
    assert _value(output, "top-1 (model)") == "100.00%", output
    other = _colour_model(tmp_path / "other.onnx", names=list(COLOURS))
    code, output = run("eval", other, "--data", "digits", "--reference", str(ort_models["model"]))
    assert_clean_failure(code, output, "name different classes")


@pytest.mark.parametrize("content", [b"", b"\x00garbage" * 8, None])
def test_missing_or_corrupt_ort_files_fail_cleanly(tmp_path: Path, content: bytes | None) -> None:
    path = tmp_path / "model.ort"
    if content is not None:
        path.write_bytes(content)
    code, output = run("eval", str(path), "--data", "digits")
    assert_clean_failure(code, output, str(path),
                         "not found" if content is None else "may be corrupt")
    good = _colour_model(tmp_path / "good.onnx")
    code, output = run("eval", good, "--data", "digits", "--reference", str(path))
    assert_clean_failure(code, output, str(path))


def test_an_onnx_file_named_ort_fails_cleanly(tmp_path: Path) -> None:
    path = _colour_model(tmp_path / "model.ort")
    code, output = run("eval", path, "--data", "digits")
    assert_clean_failure(code, output, f"cannot load {path}")


def test_other_commands_still_refuse_ort(ort_models: dict[str, Path]) -> None:
    code, output = run("info", str(ort_models["model"]))
    assert_clean_failure(code, output, "ONNX Runtime (.ort) model")


def test_a_model_of_any_image_size_is_told_how_to_fix_one(tmp_path: Path) -> None:
    model = _channel_means(tmp_path / "dyn.onnx", ["N", 3, "H", "W"], ["N", 3])
    code, output = run("eval", model, "--data", "digits")
    assert_clean_failure(code, output, "takes images of any height and width",
                         "--resolution R")
    from mvcompile.backends.ort import write_ort

    ort_file = write_ort(onnx.load(model), tmp_path / "ort")[0]
    code, output = run("eval", str(ort_file), "--data", "digits")  # optimize refuses .ort
    assert_clean_failure(code, output, "fix the .onnx that", "converted to .ort again")


def test_a_model_with_one_free_side_is_evaluated_square(tmp_path: Path) -> None:
    """[N, 3, H, 16] takes 16x16 images; it was called "not square"."""
    model = _channel_means(tmp_path / "dynh.onnx", ["N", 3, "H", 16], ["N", 3])
    code, output = run("eval", model, "--data", str(_colour_folder(tmp_path / "colours")))
    assert code == 0, output
    assert "100.00%" in output


def test_an_output_that_is_not_logits_is_named(tmp_path: Path) -> None:
    """A model whose first output is an image, not [N, classes]: named as such, rather than
    read as a model with 64 classes."""
    relu = helper.make_node("Relu", ["x"], ["y"])
    model = _save(tmp_path / "relu.onnx",
                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 64, 64])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, 64, 64])],
                  [relu])
    code, output = run("eval", model, "--data", "digits", "--limit", "4")
    assert_clean_failure(code, output, "first output has shape [4, 3, 64, 64]",
                         "not class logits [N, classes]")


def test_nan_logits_are_refused_not_scored(tmp_path: Path) -> None:
    """log(−mean): NaN logits, whose argmax used to be scored (exit 0)."""
    nodes = [helper.make_node("GlobalAveragePool", ["x"], ["p"]),
             helper.make_node("Flatten", ["p"], ["f"]), helper.make_node("Neg", ["f"], ["n"]),
             helper.make_node("Log", ["n"], ["y"])]
    model = _save(tmp_path / "m.onnx",
                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])], nodes)
    code, output = run("eval", model, "--data", str(_colour_folder(tmp_path / "data")))
    assert_clean_failure(code, output, "gives NaN or infinite logits for 10 of the 10 images")


def test_models_that_cannot_take_rgb_images_are_named_so(tmp_path: Path) -> None:
    data = str(_colour_folder(tmp_path / "data"))
    gray = _channel_means(tmp_path / "gray.onnx", ["N", 1, 8, 8], ["N", 1])
    code, output = run("eval", gray, "--data", data)
    assert_clean_failure(code, output, "takes 1-channel inputs [N, 1, 8, 8]; eval feeds RGB")
    empty = _channel_means(tmp_path / "b0.onnx", [0, 3, 8, 8], [0, 3])
    code, output = run("eval", empty, "--data", data)  # was an ONNX Runtime traceback
    assert_clean_failure(code, output, "declares a batch size of 0")


@pytest.mark.parametrize(("val", "extra"), [("val", None), ("validation", "test"),
                                            ("val", ".ipynb_checkpoints")])
def test_a_train_and_val_folder_is_evaluated_on_val(tmp_path: Path, val: str,
                                                    extra: str | None) -> None:
    """The layouts `mvcompile train --data` takes: train/ and val/ were scored as two classes,
    training images included."""
    model = _channel_means(tmp_path / "m.onnx", ["N", 3, 8, 8], ["N", 3])
    _colour_folder(tmp_path / "data" / "train", (4, 4, 4))
    _colour_folder(tmp_path / "data" / val, (2, 1, 1))
    if extra:
        (tmp_path / "data" / extra).mkdir()
    code, output = run("eval", model, "--data", str(tmp_path / "data"))
    assert code == 0, output
    assert f"4 images from {tmp_path / 'data' / val}" in output, output
    assert _value(output, "top-1") == "100.00%"


def test_a_folder_holding_only_val_class_folders_is_evaluated_on_them(tmp_path: Path) -> None:
    """The held-out half of a train/ + val/ layout copied alone was one class called "val",
    with no labels."""
    model = _channel_means(tmp_path / "m.onnx", ["N", 3, 8, 8], ["N", 3])
    _colour_folder(tmp_path / "data" / "val", (2, 1, 1))
    code, output = run("eval", model, "--data", str(tmp_path / "data"))
    assert code == 0, output
    assert f"4 images from {tmp_path / 'data' / 'val'}" in output, output
    assert _value(output, "top-1") == "100.00%"


def test_classes_named_train_and_val_are_classes(tmp_path: Path) -> None:
    """train/ and val/ holding images directly are two classes, not a split."""
    for name in ("train", "val"):
        (tmp_path / "data" / name).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(tmp_path / "data" / name / f"{i}.png")
    model = _channel_means(tmp_path / "m.onnx", ["N", 3, 8, 8], ["N", 3])
    code, output = run("eval", model, "--data", str(tmp_path / "data"))
    assert code == 0, output
    assert f"4 images from {tmp_path / 'data'}" in output, output


def test_one_class_of_a_model_that_names_its_classes_is_scored(tmp_path: Path) -> None:
    folder = tmp_path / "imgs"
    _colour_folder(folder)
    for name in ("0red", "2blue"):
        for image in (folder / name).iterdir():
            image.unlink()
        (folder / name).rmdir()
    named = _colour_model(tmp_path / "named.onnx", (2, 0, 1), ["2blue", "0red", "1green"])
    code, output = run("eval", named, "--data", str(folder))
    assert code == 0 and _value(output, "top-1") == "100.00%", output
    assert "by name (1 of its 3 classes)" in output, output
    code, output = run("eval", _colour_model(tmp_path / "unnamed.onnx"), "--data", str(folder))
    assert code == 0, output
    assert _value(output, "top-1") == (
        "no labels: the folder has one subfolder (1green), taken as one class, which only a "
        "model that names its classes can score (by name); use one subfolder per class")


def test_an_image_beside_the_class_folders_is_named_and_not_scored(tmp_path: Path) -> None:
    folder = _colour_folder(tmp_path / "imgs")
    Image.new("RGB", (16, 16), (0, 0, 255)).save(folder / "cover.png")
    (folder / "notes.txt").write_text("not an image")
    code, output = run("eval", _colour_model(tmp_path / "m.onnx"), "--data", str(folder))
    assert code == 0, output
    assert _value(output, "images").startswith("11 ") and _value(output, "top-1") == "100.00%"
    assert ("top-1 is over the 10 images in class folders; 1 beside them has no class and is "
            "not scored: cover.png") in output, output
    assert _value(output, "data") == "skipped 1 non-image file: notes.txt", output


def test_an_ort_suffix_in_capitals_is_read_as_ort(ort_models: dict[str, Path],
                                                 tmp_path: Path) -> None:
    upper = tmp_path / "MODEL.ORT"
    upper.write_bytes(ort_models["model"].read_bytes())
    code, output = run("eval", str(upper), "--data", str(_colour_folder(tmp_path / "imgs")))
    assert code == 0 and _value(output, "top-1") == "100.00%", output


def test_a_single_subfolder_the_named_model_lacks_says_so() -> None:
    from mvcompile.calibration.data import ImageSet as Images
    from mvcompile.labels import match_labels

    images = Images(np.zeros((2, 3, 8, 8), np.float32), np.array([0, 0]), ["photos"])
    match = match_labels(images, 3, ["0red", "1green", "2blue"])
    assert match.labels is None and match.not_scored == (
        "no labels: the folder has one subfolder (photos), taken as one class, which matches "
        "none of the model's class names; use one subfolder per class")


def _array(tmp_path: Path, count: int = 5, size: int = 16) -> str:
    path = tmp_path / "pixels.npy"
    np.save(path, np.random.default_rng(0).uniform(0, 1, (count, 3, size, size))
            .astype(np.float32))
    return str(path)


def test_a_model_whose_logits_are_not_one_row_per_image_is_refused(tmp_path: Path) -> None:
    """Mean over the batch: [1, 3] for any N. It gave an IndexError traceback with labels, and
    "5 images" with exit 0 for a .npy array, of which one row had been scored."""
    nodes = [helper.make_node("ReduceMean", ["x", "axes"], ["m"], keepdims=1),
             helper.make_node("Flatten", ["m"], ["y"])]
    model = helper.make_graph(
        nodes, "batchmean", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                           ["N", 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
        [onnx.numpy_helper.from_array(np.array([0, 2, 3], np.int64), "axes")])
    path = tmp_path / "batchmean.onnx"
    onnx.save(helper.make_model(model, ir_version=10,
                                opset_imports=[helper.make_opsetid("", 24)]), str(path))
    for data in (_array(tmp_path), str(_colour_folder(tmp_path / "colours"))):
        code, output = run("eval", str(path), "--data", data)
        assert_clean_failure(code, output, "first output has 1 row for a batch of")


def test_a_model_that_fails_at_the_eval_batch_is_a_clean_error(tmp_path: Path) -> None:
    """A symbolic batch declared, batch 1 hard-coded in a Reshape: a raw ORT traceback before."""
    shape = onnx.numpy_helper.from_array(np.array([1, 3, 16, 16], np.int64), "shape")
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "shape"], ["r"]),
         helper.make_node("GlobalAveragePool", ["r"], ["p"]),
         helper.make_node("Flatten", ["p"], ["y"])], "fakebatch",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])], [shape])
    path = tmp_path / "fakebatch.onnx"
    onnx.save(helper.make_model(graph, ir_version=10,
                                opset_imports=[helper.make_opsetid("", 24)]), str(path))
    code, output = run("eval", str(path), "--data", _array(tmp_path))
    assert_clean_failure(code, output, "fakebatch.onnx on a batch of 5 images")


def test_weights_listed_before_the_image_input_do_not_set_the_resolution(tmp_path: Path
                                                                           ) -> None:
    """model_resolution read graph.input[0], here a [2, 2] weight: images were prepared at
    2x2 and refused."""
    weight = onnx.numpy_helper.from_array(np.eye(3, dtype=np.float32)[:, :3], "w")
    graph = helper.make_graph(
        [helper.make_node("GlobalAveragePool", ["x"], ["p"]),
         helper.make_node("Flatten", ["p"], ["f"]), helper.make_node("MatMul", ["f", "w"], ["y"])],
        "weights_first",
        [helper.make_tensor_value_info("w", TensorProto.FLOAT, [3, 3]),
         helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])], [weight])
    path = tmp_path / "weights_first.onnx"
    onnx.save(helper.make_model(graph, ir_version=10,
                                opset_imports=[helper.make_opsetid("", 24)]), str(path))
    code, output = run("eval", str(path), "--data", str(_colour_folder(tmp_path / "colours")))
    assert code == 0, output
    assert "100.00%" in output  # identity weights: the channel means pick each colour


class _Recorder:
    """A StageListener that keeps each stage's (label, total, steps advanced)."""

    def __init__(self) -> None:
        self.stages: list[list] = []

    def start(self, label: str, total: int) -> None:
        self.stages.append([label, total, 0])

    def advance(self, n: int = 1) -> None:
        self.stages[-1][2] += n

    def finish(self) -> None:
        """Nothing to close: the stages stay recorded."""


def test_eval_progress_counts_every_image_of_both_models(tmp_path: Path) -> None:
    """The bar had one step in all and stood at 100% after the first batch."""
    from mvcompile import stages
    from mvcompile.evaluate import evaluate_file

    model = _channel_means(tmp_path / "m.onnx", ["N", 3, 16, 16], ["N", 3])
    recorder = _Recorder()
    with stages.reporting_to(recorder):
        evaluate_file(model, str(_colour_folder(tmp_path / "colours")), reference=model)
    assert recorder.stages[-1] == ["Evaluating", 20, 20]  # 10 images, model and reference
    assert recorder.stages[0][0].startswith("Loading images") and recorder.stages[0][2] == 10


def test_a_npy_larger_than_memory_is_read_only_for_the_rows_asked_for(tmp_path: Path) -> None:
    """The whole array was read even for --calib-size 8: a 27 GiB file failed with an
    out-of-memory error about resolution and attention. It is mapped, and only the rows used
    are read; all of them is refused by the memory check, with the subset that fits."""
    from mvcompile.calibration.data import load_images

    shape = (6_000_000, 3, 64, 64)  # 275 GiB of zeros, a sparse file
    path = tmp_path / "huge.npy"
    with path.open("wb") as f:
        np.lib.format.write_array_header_1_0(
            f, {"descr": "<f4", "fortran_order": False, "shape": shape})
        header = f.tell()
    os.truncate(path, header + int(np.prod(shape)) * 4)
    images = load_images(str(path), 64, limit=8)
    assert images.pixels.shape == (8, 3, 64, 64)
    with pytest.raises(UserError, match="6000000 images .* need 274.7 GiB .* at most"):
        load_images(str(path), 64)
