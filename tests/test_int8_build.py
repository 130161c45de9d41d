"""`mvcompile build --int8` end to end, and its bad-input failures (which write nothing)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from PIL import Image

from conftest import assert_clean_failure, run

FAST = ("--resolution", "64", "--latency-runs", "2", "--calib-size", "6")


def _photo_folder(root: Path, classes: int = 2, per_class: int = 3) -> Path:
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"class_{c}").mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 255, (80, 100, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / f"class_{c}" / f"img_{i}.png")
    return root


def test_int8_build_writes_a_qdq_model_that_ort_runs(tmp_path: Path) -> None:
    out = tmp_path / "out"
    code, output = run("build", *FAST, "--int8", "-o", str(out), "--num-classes", "2",
                       "--eval-data", str(_photo_folder(tmp_path / "eval")))
    assert code == 0, output
    proto = onnx.load(str(out / "model_int8.onnx"))
    onnx.checker.check_model(proto, full_check=True)
    ops = {n.op_type for n in proto.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    session = ort.InferenceSession(str(out / "model_int8.onnx"),
                                   providers=["CPUExecutionProvider"])
    logits = session.run(None, {"pixel_values": np.zeros((2, 3, 64, 64), np.float32)})[0]
    assert logits.shape == (2, 2)
    report = json.loads((out / "report.json").read_text())
    assert report["artifacts"] == {"onnx": "model.onnx", "int8": "model_int8.onnx"}
    # Left in float and reported: the 3 unfold + 3 fold FusedMatMuls (transposed operands)
    # and the 9 Q·Kᵀ FusedMatMuls; every Conv, Gemm and plain MatMul is dequantized on both.
    assert report["int8"]["quantization"]["float_matrix_ops"] == {"FusedMatMul": 15}
    accuracy = report["int8"]["accuracy"]
    assert accuracy["calibration"]["images"] == 6
    # Random weights at 64x64 make near-tied logits, so agreement is not a stable measure
    # here; the SQNR of the logits is (measured 20.7 dB; garbage would be near 0).
    assert accuracy["calibration"]["sqnr_db"] > 15.0
    assert accuracy["eval"]["images"] == 6 and "top1_int8" in accuracy["eval"]
    assert "latency" in report and report["latency"]["int8"]["median_ms"] > 0
    assert "bundled" in output and "top-1 agreement" in output and "INT8" in output
    assert "matrix ops in float" in output and "FusedMatMul x15" in output
    assert "Built in" in output
    # --weight-bits auto: the range chosen for this CPU, said so, and used for every weight
    from mvcompile import machine

    bits, why = machine.auto_weight_bits(machine.cpu_summary())
    quantization = report["int8"]["quantization"]
    assert (quantization["weight_bits"], quantization["weight_bits_why"]) == (bits, why)
    assert f"{bits}-bit weights ({why})" in output
    assert _largest_int8_weight(proto) == 2 ** (bits - 1) - 1
    # Both graphs drop each layer's key bias and fold its value bias into the output bias; the
    # FP32 graph's fused Attention stores them as 2·d zeros per transformer layer, the INT8
    # graph's head-split form stores the query bias alone.
    from mvcompile.graphs.mobilevit import MobileViTConfig

    cfg = MobileViTConfig.for_size("xxs")
    fewer = 2 * sum(d * depth for d, depth in zip(cfg.dims, cfg.depths, strict=True))
    models = report["models"]
    assert models["onnx"]["parameters"] - models["int8"]["parameters"] == fewer == 1472
    assert f"FP32 counts {fewer:,} more parameters for the same function" in output
    zeros = [onnx.numpy_helper.to_array(t) for t in onnx.load(out / "model.onnx").graph.initializer
             if t.name.endswith("qkv_bias")]
    assert sum(int((a[a.size // 3:] == 0).sum()) for a in zeros) == fewer  # the k, v parts


def _largest_int8_weight(proto: onnx.ModelProto) -> int:
    """max |q| over the int8 initializers (weights); per-channel symmetric scales make each
    channel reach the range's end."""
    return max(int(np.abs(onnx.numpy_helper.to_array(t).astype(np.int32)).max())
               for t in proto.graph.initializer if t.data_type == onnx.TensorProto.INT8)


def test_weight_bits_given_are_used_whatever_the_cpu(tmp_path: Path) -> None:
    out = tmp_path / "out"
    code, output = run("build", *FAST, "--int8", "--weight-bits", "7", "-o", str(out))
    assert code == 0, output
    assert _largest_int8_weight(onnx.load(str(out / "model_int8.onnx"))) == 63
    quantization = json.loads((out / "report.json").read_text())["int8"]["quantization"]
    assert (quantization["weight_bits"], quantization["weight_bits_why"]) == (7, "as requested")
    assert "percentile, 7-bit weights" in output and "(auto:" not in output


def test_api_takes_weight_bits_auto_as_the_cli_does_and_refuses_other_values(
        tmp_path: Path) -> None:
    from mvcompile import BuildOptions, build, machine
    from mvcompile.errors import UserError

    fast = {"resolution": 64, "latency_runs": 0, "calib_size": 4, "int8": True}
    result = build(BuildOptions(**fast, weight_bits="auto", out_dir=str(tmp_path / "a")))
    why = result.report["int8"]["quantization"]["weight_bits_why"]
    assert why == machine.auto_weight_bits(machine.cpu_summary())[1]
    with pytest.raises(UserError, match="--weight-bits must be auto, 7 or 8, got 9"):
        build(BuildOptions(**fast, weight_bits=9, out_dir=str(tmp_path / "b")))
    assert not (tmp_path / "b").exists()


def test_missing_calibration_folder(tmp_path: Path) -> None:
    code, output = run("build", *FAST, "--int8", "--calib-data", str(tmp_path / "nope"),
                       "-o", str(tmp_path / "o"))
    assert_clean_failure(code, output, "does not exist")
    assert not (tmp_path / "o").exists()


def test_calibration_data_that_is_an_image_file(tmp_path: Path) -> None:
    folder = _photo_folder(tmp_path / "calib")
    image = next((folder / "class_0").iterdir())
    code, output = run("build", *FAST, "--int8", "--calib-data", str(image),
                       "-o", str(tmp_path / "o"))
    assert_clean_failure(code, output, "is a file; pass a folder of images")
    assert not (tmp_path / "o").exists()


def test_empty_calibration_folder(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    code, output = run("build", *FAST, "--int8", "--calib-data", str(tmp_path / "empty"),
                       "-o", str(tmp_path / "o"))
    assert_clean_failure(code, output, "No images in")
    assert not (tmp_path / "o").exists()


def test_non_image_files_are_skipped_and_reported(tmp_path: Path) -> None:
    folder = _photo_folder(tmp_path / "calib")
    (folder / "notes.txt").write_text("not an image")
    (folder / "class_0" / "labels.csv").write_text("a,b")
    code, output = run("build", *FAST, "--int8", "--calib-data", str(folder),
                       "-o", str(tmp_path / "o"))
    assert code == 0, output
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert sorted(report["int8"]["calibration_skipped"]) == ["class_0/labels.csv", "notes.txt"]
    assert "skipped 2 non-image files: class_0/labels.csv, notes.txt" in output


def test_undecodable_image(tmp_path: Path) -> None:
    folder = _photo_folder(tmp_path / "calib")
    (folder / "class_1" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    code, output = run("build", *FAST, "--calib-size", "7", "--int8", "--calib-data", str(folder),
                       "-o", str(tmp_path / "o"))
    assert_clean_failure(code, output, "cannot be decoded", "broken.jpg")
    assert not (tmp_path / "o").exists()


def test_folder_too_large_for_memory_is_refused_before_decoding(tmp_path: Path) -> None:
    from mvcompile.calibration.data import _check_fits_in_memory
    from mvcompile.errors import UserError

    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal: 25165824 kB\nMemAvailable: 1048576 kB\n")  # 1 GiB free
    _check_fits_in_memory(600, 256, tmp_path, meminfo)  # 0.44 GiB: fits in half
    with pytest.raises(UserError, match=r"2000 images .* need 1\.5 GiB .* at most 682"):
        _check_fits_in_memory(2000, 256, tmp_path, meminfo)


@pytest.mark.parametrize("value", ["-1", "nan"])
def test_accuracy_budget_outside_0_100_is_a_usage_error(tmp_path: Path, value: str) -> None:
    code, output = run("build", *FAST, "--int8", "--accuracy-budget", value,
                       "-o", str(tmp_path / "o"))
    assert_clean_failure(code, output, "--accuracy-budget")
    assert not (tmp_path / "o").exists()


def test_int8_options_without_int8_are_named_as_ignored(tmp_path: Path) -> None:
    code, output = run("build", *FAST, "--calib-data", "digits", "--accuracy-budget", "1",
                       "--weight-bits", "auto",  # given, though it is the default
                       "-o", str(tmp_path / "o"))  # FAST's --calib-size counts too
    assert code == 0, output
    assert ("--calib-data, --calib-size, --accuracy-budget, --weight-bits only apply to the INT8 "
            "model and are ignored without --int8") in output
    assert not (tmp_path / "o" / "model_int8.onnx").exists()


def test_target_and_timing_options_that_do_not_apply_are_named_as_ignored(tmp_path: Path
                                                                          ) -> None:
    code, output = run("build", "--resolution", "64", "--latency-runs", "0", "--threads", "4",
                       "--ort-style", "runtime", "--coreml-batch", "2", "-o", str(tmp_path / "o"))
    assert code == 0, output
    assert ("--ort-style only applies to the .ort files and is ignored without ort in "
            "--targets") in output
    assert ("--coreml-batch only applies to the Core ML packages and is ignored without "
            "coreml in --targets") in output
    assert ("--threads only applies to the latency measurement and is ignored with "
            "--latency-runs 0") in output
    assert "--weight-bits" not in output  # a default is not named
    code, output = run("build", "--resolution", "64", "--latency-runs", "0", "--targets",
                       "onnx,ort", "--ort-style", "runtime", "-o", str(tmp_path / "o"))
    assert code == 0 and "Note: --ort-style" not in output, output


def test_unknown_calibration_method(tmp_path: Path) -> None:
    code, output = run("build", *FAST, "--int8", "--calib-method", "magic",
                       "-o", str(tmp_path / "o"))
    assert_clean_failure(code, output, "magic", "percentile")
    assert not (tmp_path / "o").exists()


def test_npy_that_is_not_a_numeric_array_gets_no_unpickling_advice(tmp_path: Path) -> None:
    (tmp_path / "calib.npy").write_text("not an array")
    code, output = run("build", *FAST, "--int8", "--calib-data", str(tmp_path / "calib.npy"),
                       "-o", str(tmp_path / "o"))
    assert_clean_failure(code, output, "not a plain numeric NumPy file")
    assert "allow_pickle" not in output and not (tmp_path / "o").exists()


def test_npy_calibration_array_with_wrong_shape(tmp_path: Path) -> None:
    np.save(tmp_path / "calib.npy", np.zeros((4, 3, 32, 32), np.float32))
    code, output = run("build", *FAST, "--int8", "--calib-data", str(tmp_path / "calib.npy"),
                       "-o", str(tmp_path / "o"))
    assert_clean_failure(code, output, "expected [N, 3, 64, 64]")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("array, phrase", [
    (np.full((2, 3, 64, 64), 200, np.uint8), "uint8 values"),
    (np.full((2, 3, 64, 64), np.nan, np.float32), "NaN or infinite"),
    (np.full((2, 3, 64, 64), 2.5, np.float32), "values in [2.5, 2.5]"),
])
def test_npy_calibration_array_that_is_not_preprocessed(tmp_path: Path, array: np.ndarray,
                                                        phrase: str) -> None:
    np.save(tmp_path / "calib.npy", array)
    code, output = run("build", *FAST, "--int8", "--calib-data", str(tmp_path / "calib.npy"),
                       "-o", str(tmp_path / "o"))
    assert_clean_failure(code, output, phrase)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("method", ["minmax", "mse"])
def test_npy_calibration_and_methods(tmp_path: Path, method: str) -> None:
    np.save(tmp_path / "calib.npy", np.random.default_rng(0).uniform(0, 1, (4, 3, 64, 64))
            .astype(np.float32))
    code, output = run("build", *FAST, "--int8", "--calib-data", str(tmp_path / "calib.npy"),
                       "--calib-method", method, "-o", str(tmp_path / "o"))
    assert code == 0, output
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["int8"]["quantization"]["method"] == method
    assert report["int8"]["accuracy"]["calibration"]["images"] == 4


def test_eval_command_on_a_labelled_folder(tmp_path: Path) -> None:
    code, _ = run("build", *FAST, "--int8", "-o", str(tmp_path / "o"))
    assert code == 0
    folder = _photo_folder(tmp_path / "eval")
    code, output = run("eval", str(tmp_path / "o" / "model_int8.onnx"), "--data", str(folder))
    assert code == 0, output
    assert "top-1 agreement" in output and "model.onnx" in output
    assert "not scored: the folder has 2 classes, the model 1000 outputs" in output
    code, output = run("eval", str(tmp_path / "o" / "model_int8.onnx"), "--data", str(folder),
                       "--reference", str(tmp_path / "missing.onnx"))
    assert_clean_failure(code, output, "not found")
    code, output = run("eval", str(tmp_path / "o" / "model.onnx"), "--data", str(folder),
                       "--limit", "0")
    assert_clean_failure(code, output, "--limit")
    code, output = run("eval", str(tmp_path / "o" / "model.onnx"), "--data",
                       str(tmp_path / "missing"))
    assert_clean_failure(code, output, "not found")


def test_eval_fixed_batch_model_and_mismatched_reference(tmp_path: Path) -> None:
    assert run("build", *FAST, "-o", str(tmp_path / "a"))[0] == 0
    assert run("build", *FAST, "--num-classes", "2", "-o", str(tmp_path / "b"))[0] == 0
    folder = _photo_folder(tmp_path / "eval")
    fixed = onnx.load(str(tmp_path / "b" / "model.onnx"))
    for value in (fixed.graph.input[0], fixed.graph.output[0]):
        value.type.tensor_type.shape.dim[0].dim_value = 1  # exported for batch 1 only
    onnx.save(fixed, str(tmp_path / "fixed.onnx"))
    code, output = run("eval", str(tmp_path / "fixed.onnx"), "--data", str(folder))
    assert code == 0, output
    assert "top-1" in output  # 2 classes, 2 class folders: scored, one image per run
    code, output = run("eval", str(tmp_path / "b" / "model.onnx"), "--data", str(folder),
                       "--reference", str(tmp_path / "a" / "model.onnx"))
    assert_clean_failure(code, output, "gives 1000 outputs per image", "same classes")


def test_targets_write_ort_and_coreml_for_fp32_and_int8(tmp_path: Path) -> None:
    out = tmp_path / "o"
    code, output = run("build", *FAST, "--int8", "--targets", "onnx,ort,coreml", "-o", str(out))
    assert code == 0, output
    names = {p.name for p in out.iterdir()}
    assert {"model.onnx", "model_int8.onnx", "model.ort", "model_int8.ort",
            "model.required_operators.config", "model.mlpackage",
            "model_int8.mlpackage", "report.json"} <= names
    assert not [n for n in names if n.startswith(".")]  # no staging leftovers
    assert "Running MIL" not in output  # coremltools' own pass bars stay hidden
    assert "model.mlpackage" in next(ln for ln in output.splitlines() if ln.startswith("Core ML"))
    header = (out / "model_int8.required_operators.config").read_text()
    assert str((out / "model_int8.ort").resolve()) in header  # names the published model
    assert ".mvcompile-stage" not in header
    report = json.loads((out / "report.json").read_text())
    assert set(report["artifacts"].values()) <= names
    assert report["artifacts"] == {
        "onnx": "model.onnx", "int8": "model_int8.onnx",
        "onnx_ort": "model.ort", "int8_ort": "model_int8.ort",
        "onnx_ort_operators_config": "model.required_operators.config",
        "int8_ort_operators_config": "model_int8.required_operators.config",
        "onnx_ort_operators_and_types_config": "model.required_operators_and_types.config",
        "int8_ort_operators_and_types_config": "model_int8.required_operators_and_types.config",
        "onnx_coreml": "model.mlpackage", "int8_coreml": "model_int8.mlpackage"}
    io = {row["name"]: row for row in report["coreml"]["model.mlpackage"]}
    assert io["pixel_values"]["kind"] == "image" and io["pixel_values"]["shape"] == [1, 3, 64, 64]
    assert io["logits"]["role"] == "output"
    # the FP32 package comes from the mobile pipeline's graph, not the ORT one the column shows
    sources = report["coreml_sources"]
    assert "Swish" in sources["model.mlpackage"]["op_histogram"]
    assert "com.microsoft.QuickGelu" in report["models"]["onnx"]["op_histogram"]
    assert sources["model_int8.mlpackage"]["graph"] == "model_int8.onnx's"
    assert "model.mlpackage is lowered from the mobile pipeline's graph" in output
    session = ort.InferenceSession(str(out / "model_int8.ort"), providers=["CPUExecutionProvider"])
    assert session.run(None, {"pixel_values": np.zeros((1, 3, 64, 64), np.float32)})[0].shape \
        == (1, 1000)


def test_unknown_target(tmp_path: Path) -> None:
    code, output = run("build", *FAST, "--targets", "onnx,tflite", "-o", str(tmp_path / "o"))
    assert_clean_failure(code, output, "Unknown target(s) tflite")
    assert not (tmp_path / "o").exists()


def test_digits_calibrates_on_the_train_split_and_evaluates_on_val(tmp_path: Path) -> None:
    code, output = run("build", *FAST, "--num-classes", "10", "--int8", "--calib-data", "digits",
                       "--eval-data", "digits", "-o", str(tmp_path / "o"))
    assert code == 0, output
    accuracy = json.loads((tmp_path / "o" / "report.json").read_text())["int8"]["accuracy"]
    assert "train images of scikit-learn digits" in accuracy["calibration"]["source"]
    assert accuracy["eval"]["images"] == 359  # the fixed 20% validation split of train
    assert {"top1_fp32", "top1_int8", "top1_agreement"} <= set(accuracy["eval"])
    code, output = run("eval", str(tmp_path / "o" / "model_int8.onnx"), "--data", "digits")
    assert code == 0, output
    assert "359 val images" in output and "top-1 (model)" in output


def test_rebuilding_without_int8_removes_the_old_int8_model(tmp_path: Path) -> None:
    out = tmp_path / "o"
    assert run("build", *FAST, "--int8", "-o", str(out))[0] == 0
    (out / "notes.txt").write_text("mine")
    assert run("build", *FAST, "-o", str(out))[0] == 0
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", "notes.txt", "report.json"]


def test_build_names_digits_as_the_label_source_of_an_unscored_eval(tmp_path: Path) -> None:
    code, output = run("build", *FAST, "--int8", "--calib-data", "digits", "--eval-data",
                       "digits", "-o", str(tmp_path / "o"))
    assert code == 0, output
    accuracy = json.loads((tmp_path / "o" / "report.json").read_text())["int8"]["accuracy"]
    assert accuracy["eval"]["labels"] == "not scored: digits has 10 classes, the model 1000 outputs"
    assert re.search(r"eval labels +not scored: digits has 10 classes", output)  # summary


@pytest.mark.parametrize("source", [None, "digits"])
def test_bundled_and_digits_loading_advance_the_progress_bar(source: str | None) -> None:
    from mvcompile.calibration.data import load_images

    ticks = []
    images = load_images(source, 64, limit=5, on_image=lambda: ticks.append(1))
    assert len(images.pixels) == 5
    assert len(ticks) == 5


def test_unusable_eval_data_fails_the_build_before_calibration(tmp_path: Path,
                                                               monkeypatch) -> None:
    import mvcompile.int8_build

    def calibrate(*args: object, **kwargs: object) -> None:
        raise AssertionError("calibrated before reading --eval-data")

    monkeypatch.setattr(mvcompile.int8_build, "quantize", calibrate)
    np.save(tmp_path / "u8.npy", np.zeros((2, 3, 64, 64), np.uint8))
    code, output = run("build", *FAST, "--int8", "--eval-data", str(tmp_path / "u8.npy"),
                       "-o", str(tmp_path / "o"))
    assert_clean_failure(code, output, "u8.npy holds uint8 values")
    assert not (tmp_path / "o").exists()


def test_eval_data_too_large_for_memory_fails_the_build_before_calibration(
        tmp_path: Path, monkeypatch) -> None:
    """The memory check of --eval-data ran only after calibration, and advised `eval --limit,
    build --calib-size`, neither of which limits --eval-data in build."""
    import mvcompile.calibration.data
    import mvcompile.int8_build

    def calibrate(*args: object, **kwargs: object) -> None:
        raise AssertionError("calibrated before checking --eval-data's size")

    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal: 25165824 kB\nMemAvailable: 100 kB\n")
    monkeypatch.setattr(mvcompile.calibration.data, "MEMINFO", meminfo)
    monkeypatch.setattr(mvcompile.int8_build, "quantize", calibrate)
    folder = _photo_folder(tmp_path / "eval")
    code, output = run("build", *FAST, "--int8", "--calib-data", "digits", "--eval-data",
                       str(folder), "-o", str(tmp_path / "o"))
    assert_clean_failure(code, output, "6 images from", "Build without --eval-data",
                         "mvcompile eval MODEL --data DATA --limit 1")
    assert not (tmp_path / "o").exists()


def test_build_says_why_an_unlabelled_eval_folder_has_no_top1(tmp_path: Path) -> None:
    folder = _photo_folder(tmp_path / "flat", classes=1)
    for image in (folder / "class_0").iterdir():
        image.rename(folder / image.name)
    code, output = run("build", *FAST, "--int8", "--eval-data", str(folder),
                       "-o", str(tmp_path / "o"))
    assert code == 0, output
    accuracy = json.loads((tmp_path / "o" / "report.json").read_text())["int8"]["accuracy"]
    assert accuracy["eval"]["labels"] == "no labels (use one subfolder per class)"
    assert re.search(r"eval labels +no labels \(use one subfolder per class\)", output), output
