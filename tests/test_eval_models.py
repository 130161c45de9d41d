"""``mvcompile eval`` on unusual models: fixed batches, no inputs or outputs, broken graphs,
and the wording of its notes for each kind of --data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper
from PIL import Image

from conftest import assert_clean_failure, run
from mvcompile.calibration.data import ImageSet
from mvcompile.evaluate import predict

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
