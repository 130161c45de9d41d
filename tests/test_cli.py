"""The CLI end to end: outputs, summaries, and clean failures that write nothing."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import onnx
import pytest
from safetensors.numpy import save_file

from conftest import assert_clean_failure, build_random, run
from mvcompile.graphs.factory import parameter_shapes
from mvcompile.graphs.mobilevit import MobileViTConfig

BN_CHANNELS_XXS = sum(
    c for name, (c,) in ((n, s) for n, s in parameter_shapes(
        MobileViTConfig.for_size("xxs", resolution=64)).items() if n.endswith("running_mean")))


def test_build_writes_model_and_report_and_prints_summary(tmp_path: Path) -> None:
    out = tmp_path / "xxs"
    code, output = run("build", "--size", "xxs", "--resolution", "64", "-o", str(out),
                       "--latency-runs", "3")
    assert code == 0, output
    onnx.checker.check_model(str(out / "model.onnx"), full_check=True)
    report = json.loads((out / "report.json").read_text())
    stats = report["models"]["onnx"]
    # BN folded into the convs: each BN's gamma and beta (2C) became one conv bias (C). Each
    # attention is one fused Attention node whose qkv bias keeps a slot for the key and value
    # biases (zeros: the key bias drops out and the value bias joins the out bias), so the
    # attention parameter count is unchanged.
    assert stats["parameters"] == 1_272_024 - BN_CHANNELS_XXS
    assert report["model"] == {"size": "xxs", "resolution": 64, "patch_sizes": [2, 2, 2],
                               "num_classes": 1000}
    assert report["weights"]["kind"] == "random"
    assert report["latency"]["onnx"]["runs"] == 3 and report["latency"]["onnx"]["median_ms"] > 0
    assert "BatchNormalization" not in stats["op_histogram"]
    assert report["passes"]["max_abs_diff"] <= 1e-4
    assert stats["file_bytes"] == (out / "model.onnx").stat().st_size
    assert stats["macs"] == 21_179_136  # the plain graph's count: passes re-express, not remove
    for phrase in ("parameters", "MACs", "ORT median latency", "file size", "Conv", "passes"):
        assert phrase in output
    assert "random" in output
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", "report.json"]


def test_build_without_passes_writes_the_plain_graph(tmp_path: Path) -> None:
    code, output = run("build", "--resolution", "64", "--no-passes", "-o", str(tmp_path),
                       "--latency-runs", "0")
    assert code == 0, output
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["passes"] is None and report["latency"] is None
    assert report["models"]["onnx"]["parameters"] == 1_272_024
    assert report["models"]["onnx"]["op_histogram"]["BatchNormalization"] == 32


def test_build_with_weights_and_classes(tmp_path: Path) -> None:
    cfg = MobileViTConfig.for_size("xxs", resolution=64, num_classes=10)
    _, weights = build_random(cfg, seed=9)
    save_file(weights, str(tmp_path / "w.safetensors"))
    code, output = run("build", "--weights", str(tmp_path / "w.safetensors"), "--resolution",
                       "64", "--num-classes", "10", "-o", str(tmp_path / "o"),
                       "--latency-runs", "0")
    assert code == 0, output
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["weights"]["kind"] == "checkpoint"
    model = onnx.load(str(tmp_path / "o" / "model.onnx"))
    stored = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    np.testing.assert_array_equal(stored["classifier.weight"], weights["classifier.weight"])


def test_missing_weights_file(tmp_path: Path) -> None:
    code, output = run("build", "--weights", str(tmp_path / "nope.safetensors"),
                       "-o", str(tmp_path / "o"))
    assert_clean_failure(code, output, "Weights file not found")
    assert not (tmp_path / "o").exists()


def test_wrong_checkpoint_size(tmp_path: Path) -> None:
    _, weights = build_random(MobileViTConfig.for_size("s", resolution=64))
    save_file(weights, str(tmp_path / "s.safetensors"))
    code, output = run("build", "--size", "xxs", "--weights", str(tmp_path / "s.safetensors"),
                       "--resolution", "64", "-o", str(tmp_path / "o"))
    assert_clean_failure(code, output, "does not match MobileViT-XXS", "try --size s")
    assert not (tmp_path / "o").exists()


def test_not_mobilevit_checkpoint(tmp_path: Path) -> None:
    save_file({"fc.weight": np.ones((2, 2), np.float32)}, str(tmp_path / "x.safetensors"))
    code, output = run("build", "--weights", str(tmp_path / "x.safetensors"),
                       "-o", str(tmp_path / "o"))
    assert_clean_failure(code, output, "not look like a MobileViT checkpoint")
    assert not (tmp_path / "o").exists()


def test_resolution_that_does_not_divide(tmp_path: Path) -> None:
    code, output = run("build", "--resolution", "100", "-o", str(tmp_path / "o"))
    assert_clean_failure(code, output, "Resolution 100", "64 or 128")
    assert not (tmp_path / "o").exists()


def test_unknown_size(tmp_path: Path) -> None:
    code, output = run("build", "--size", "xl", "-o", str(tmp_path / "o"))
    assert_clean_failure(code, output, "xl", "xxs")
    assert not (tmp_path / "o").exists()


def test_output_under_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    code, output = run("build", "--resolution", "64", "-o", str(tmp_path / "file" / "o"))
    assert_clean_failure(code, output, "is a file")


@pytest.mark.parametrize("content", [b"", b"\x08\x07garbage\xff\xfe" * 50])
def test_info_on_corrupt_onnx(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "bad.onnx").write_bytes(content)
    code, output = run("info", str(tmp_path / "bad.onnx"))
    assert_clean_failure(code, output, "bad.onnx")


def test_info_on_missing_file(tmp_path: Path) -> None:
    code, output = run("info", str(tmp_path / "none.onnx"))
    assert_clean_failure(code, output, "not found")


def test_info_on_a_folder_or_an_ort_file(tmp_path: Path) -> None:
    code, output = run("info", str(tmp_path))
    assert_clean_failure(code, output, "is a folder")
    (tmp_path / "m.ort").write_bytes(b"ORTM")
    code, output = run("info", str(tmp_path / "m.ort"))
    assert_clean_failure(code, output, "ONNX Runtime (.ort) model", "mvcompile bench")


def test_info_reports_our_model(tmp_path: Path) -> None:
    code, _ = run("build", "--resolution", "64", "-o", str(tmp_path), "--latency-runs", "0",
                  "--no-passes")
    assert code == 0
    code, output = run("info", str(tmp_path / "model.onnx"))
    assert code == 0
    for phrase in ("1,272,024", "21.18 M", "BatchNormalization  32"):
        assert phrase in output, output
    for phrase in ("ai.onnx 24", "IR version", "[batch, 3, 64, 64]", "[batch, 1000]",
                   "valid (full check)"):
        assert phrase in output, output


def test_info_says_when_onnx_checker_refuses_the_model(tmp_path: Path) -> None:
    """A node reads a tensor nothing defines: info still describes the model, and says why
    it is invalid."""
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Relu", ["undefined"], ["y"])], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 24)])
    model.ir_version = 10
    onnx.save(model, str(tmp_path / "broken.onnx"))
    code, output = run("info", str(tmp_path / "broken.onnx"))
    assert code == 0
    assert "INVALID: " in output and "undefined" in output, output


def test_info_on_a_torch_export(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from mvcompile.reference import hf_model

    cfg = MobileViTConfig.for_size("xxs", resolution=64)
    _, weights = build_random(cfg)
    model = hf_model(cfg, weights)
    path = tmp_path / "hf.onnx"
    torch.onnx.export(model, (torch.rand(1, 3, 64, 64),), str(path), dynamo=False,
                      input_names=["pixel_values"], output_names=["logits"], opset_version=17)
    code, output = run("info", str(path))
    assert code == 0, output
    # torch folds each BN into its Conv: gamma and beta (2C) become one conv bias (C).
    assert f"{1_272_024 - BN_CHANNELS_XXS:,}" in output
    assert "21.18 M" in output  # same MACs as our graph, found by shape inference
    assert "shapes unknown" not in output
    assert "ai.onnx 17" in output and "Transpose" in output


@pytest.mark.parametrize(("dims", "label", "value"), [
    ([1, 3, 8, 8], "MACs (batch 1)", "13.82 k"),
    ([4, 3, 8, 8], "MACs (batch 4)", "55.30 k"),  # was labelled batch 1
    (["N", 3, 8, 8], "MACs (batch 1)", "13.82 k"),
    (["N", 3, "H", "W"], "MACs", "unknown: input x [N, 3, H, W] has a symbolic size"),  # was 216
])
def test_info_gives_macs_at_the_inputs_batch_or_says_why_not(tmp_path: Path, dims: list,
                                                            label: str, value: str) -> None:
    weight = onnx.numpy_helper.from_array(np.ones((8, 3, 3, 3), np.float32), "w")
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, dims)],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)], [weight])
    onnx.save(onnx.helper.make_model(graph, ir_version=10, opset_imports=[
        onnx.helper.make_opsetid("", 17)]), str(tmp_path / "m.onnx"))
    code, output = run("info", str(tmp_path / "m.onnx"))
    assert code == 0, output
    row = next(line for line in output.splitlines() if line.startswith("MACs"))
    assert row.startswith(f"{label}  ") and row.removeprefix(label).strip().startswith(value)


def test_build_and_info_leave_the_working_folder_untouched(tmp_path: Path, monkeypatch) -> None:
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    code, output = run("build", "--resolution", "64", "-o", str(tmp_path / "o"),
                       "--latency-runs", "0")
    assert code == 0, output
    code, output = run("info", str(tmp_path / "o" / "model.onnx"))
    assert code == 0, output
    assert list(cwd.iterdir()) == []  # shape inference scratch files stay out of it


def test_rebuild_removes_only_what_the_earlier_build_wrote(tmp_path: Path) -> None:
    """An earlier build's model.ort (listed in its report.json) goes when a rebuild does not
    rewrite it; the user's own files with build-like names, in a folder no build wrote, stay."""
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    fast = ("--resolution", "64", "--latency-runs", "0")
    assert run("build", *fast, "--targets", "onnx,ort", "-o", str(ours))[0] == 0
    assert (ours / "model.ort").exists()
    code, output = run("build", *fast, "-o", str(ours))
    assert code == 0, output
    assert not (ours / "model.ort").exists() and (ours / "model.onnx").exists()
    (theirs / "model.mlpackage").mkdir(parents=True)
    (theirs / "model.ort").write_text("mine")
    code, output = run("build", *fast, "-o", str(theirs))
    assert code == 0, output
    assert (theirs / "model.ort").read_text() == "mine" and (theirs / "model.mlpackage").is_dir()


def test_a_listed_artifact_that_is_a_folder_or_a_link_is_left_alone(tmp_path: Path) -> None:
    """A report.json that lists model_int8.onnx where a folder of that name stands: the rebuild
    without --int8 deleted the folder, whatever it held (shutil.rmtree)."""
    out = tmp_path / "o"
    fast = ("--resolution", "64", "--latency-runs", "0")
    assert run("build", *fast, "--targets", "onnx,ort", "-o", str(out))[0] == 0
    report = json.loads((out / "report.json").read_text())
    report["artifacts"]["int8"] = "model_int8.onnx"
    (out / "report.json").write_text(json.dumps(report))
    (out / "model_int8.onnx").mkdir()
    (out / "model_int8.onnx" / "notes.txt").write_text("mine")
    (out / "model.ort").unlink()
    (out / "model.ort").symlink_to(tmp_path / "elsewhere.ort")
    (tmp_path / "elsewhere.ort").write_text("mine too")
    code, output = run("build", *fast, "-o", str(out))
    assert code == 0, output
    assert (out / "model_int8.onnx" / "notes.txt").read_text() == "mine"
    assert (tmp_path / "elsewhere.ort").read_text() == "mine too" and (out / "model.ort").exists()


def test_an_output_folder_that_is_a_dangling_link_is_refused_at_once(tmp_path: Path) -> None:
    """It failed after the whole build, with "File exists"."""
    (tmp_path / "o").symlink_to(tmp_path / "nowhere")
    code, output = run("build", "--resolution", "64", "--latency-runs", "0", "-o",
                       str(tmp_path / "o"))
    assert_clean_failure(code, output, "symbolic link to nothing")
    assert "Compiling" not in output


def test_ctrl_c_gives_a_note_and_status_130(tmp_path: Path, monkeypatch) -> None:
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("mvcompile.optimize.optimize_file", interrupted)
    code, output = run("optimize", "in.onnx", "-o", str(tmp_path / "o.onnx"))
    assert code == 130
    assert "Interrupted; no output was written." in output
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args", [("eval", "model.onnx", "--data", ""),
                                  ("build", "--int8", "--calib-data", ""),
                                  ("optimize", "", "-o", "o.onnx")])
def test_an_empty_path_is_refused_rather_than_read_as_the_current_folder(args) -> None:
    code, output = run(*args)
    assert code == 2  # click's usage-error status
    assert_clean_failure(code, output, "is empty; give a file or folder path.")


def test_build_takes_unset_settings_from_the_checkpoints_training_metadata(tmp_path,
                                                                           caplog) -> None:
    """`mvcompile train` records size, patch config, classes and resolution in the
    .safetensors header: a build that does not set them uses them; one that does is told."""
    cfg = MobileViTConfig.for_size("xxs", resolution=64, patch_config="B", num_classes=10)
    _, weights = build_random(cfg, seed=3)
    path = tmp_path / "best.safetensors"
    save_file(weights, str(path), metadata={
        "mvcompile.size": "xxs", "mvcompile.patch_config": "B", "mvcompile.num_classes": "10",
        "mvcompile.resolution": "64", "mvcompile.classes": ",".join(map(str, range(10)))})
    code, output = run("build", "--weights", str(path), "-o", str(tmp_path / "o"),
                       "--latency-runs", "0")
    assert code == 0, output
    assert ("from the checkpoint's training settings: --size xxs, --patch-config B, "
            "--num-classes 10, --resolution 64") in output
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["model"] == {"size": "xxs", "resolution": 64, "patch_sizes": [8, 4, 2],
                               "num_classes": 10}
    with caplog.at_level(logging.WARNING, logger="mvcompile.builder"):
        code, output = run("build", "--weights", str(path), "--patch-config", "A",
                           "-o", str(tmp_path / "a"), "--latency-runs", "0")
    assert code == 0, output
    assert "trained with --patch-config B (building A as asked)" in caplog.text
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    assert report["model"]["patch_sizes"] == [2, 2, 2]


def _run_folder(folder: Path, cfg: MobileViTConfig, seed: int) -> dict[str, np.ndarray]:
    """A mvcompile train run folder as train leaves it: best and last weights (different
    epochs) with train's header, run.json and last.pt (contents irrelevant here)."""
    folder.mkdir()
    header = {"mvcompile.size": cfg.size, "mvcompile.num_classes": str(cfg.num_classes),
              "mvcompile.resolution": str(cfg.resolution), "mvcompile.patch_config": "A"}
    best, last = build_random(cfg, seed=seed)[1], build_random(cfg, seed=seed + 1)[1]
    save_file(best, str(folder / "best.safetensors"), header)
    save_file(last, str(folder / "last.safetensors"), header)
    (folder / "run.json").write_text("{}")
    (folder / "last.pt").write_bytes(b"not read")
    return {"best": best, "last": last}


@pytest.mark.parametrize(("given", "used"), [("", "best"), ("last.pt", "last")])
def test_build_from_a_train_run_folder_or_its_last_pt(tmp_path: Path, given: str, used: str
                                                      ) -> None:
    cfg = MobileViTConfig.for_size("xxs", resolution=64, num_classes=3)
    weights = _run_folder(tmp_path / "run", cfg, seed=4)
    code, output = run("build", "--weights", str(tmp_path / "run" / given), "-o",
                       str(tmp_path / "o"), "--latency-runs", "0")
    assert code == 0, output
    assert f"using {'its ' if used == 'best' else ''}{used}.safetensors" in output
    assert "--num-classes 3" in output and "--resolution 64" in output  # from the header
    model = onnx.load(str(tmp_path / "o" / "model.onnx"))
    stored = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    np.testing.assert_array_equal(stored["classifier.weight"], weights[used]["classifier.weight"])


def test_build_from_a_run_folder_before_its_first_epoch(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "run.json").write_text("{}")
    code, output = run("build", "--weights", str(tmp_path / "run"), "-o", str(tmp_path / "o"))
    assert_clean_failure(code, output, "run folder without best.safetensors", "no epoch")
    assert not (tmp_path / "o").exists()


def test_a_run_folder_without_best_safetensors_points_to_last(tmp_path: Path) -> None:
    cfg = MobileViTConfig.for_size("xxs", resolution=64, num_classes=3)
    _run_folder(tmp_path / "run", cfg, seed=4)
    (tmp_path / "run" / "best.safetensors").unlink()
    code, output = run("build", "--weights", str(tmp_path / "run"), "-o", str(tmp_path / "o"))
    assert_clean_failure(code, output, "without best.safetensors",
                         f"pass {tmp_path / 'run' / 'last.safetensors'}")


def test_last_pt_of_a_run_without_last_safetensors_is_refused(tmp_path: Path) -> None:
    """Not read as a pickle: its raw (not EMA) weights, and no header to build from."""
    cfg = MobileViTConfig.for_size("xxs", resolution=64, num_classes=3)
    _run_folder(tmp_path / "run", cfg, seed=4)
    (tmp_path / "run" / "last.safetensors").unlink()
    code, output = run("build", "--weights", str(tmp_path / "run" / "last.pt"), "-o",
                       str(tmp_path / "o"))
    assert_clean_failure(code, output, "last.safetensors, which holds its weights, is missing")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("where", [(), ("build",), ("optimize",), ("train",)])
def test_version_before_or_after_the_command(where: tuple[str, ...]) -> None:
    from importlib.metadata import version

    code, output = run(*where, "--version")
    assert code == 0, output
    assert output.strip() == f"mvcompile, version {version('mvcompile')}"


def test_a_folder_in_the_way_of_an_output_stops_the_build_before_anything_is_moved(
        tmp_path: Path) -> None:
    """report.json as a folder: model.onnx used to be moved into place, then the build failed."""
    out = tmp_path / "o"
    (out / "report.json" / "x").mkdir(parents=True)
    code, output = run("build", "--resolution", "64", "--latency-runs", "0", "-o", str(out))
    assert_clean_failure(code, output, "a folder of that name is in the way", "Nothing was written")
    assert sorted(p.name for p in out.iterdir()) == ["report.json"]


def test_the_python_api_reads_run_folders_and_warns_of_other_training_settings(
        tmp_path, caplog) -> None:
    """build() with a train run folder used to fail ("pass ... a mvcompile train run
    folder"), and with its checkpoint built Config-A over a Config-B run without a word."""
    from mvcompile.builder import BuildOptions, build

    cfg = MobileViTConfig.for_size("xxs", resolution=64, patch_config="B", num_classes=10)
    _, weights = build_random(cfg, seed=4)
    run_dir = tmp_path / "runs" / "b"
    run_dir.mkdir(parents=True)
    save_file(weights, str(run_dir / "best.safetensors"), metadata={
        "mvcompile.size": "xxs", "mvcompile.patch_config": "B", "mvcompile.num_classes": "10",
        "mvcompile.resolution": "64"})
    (run_dir / "run.json").write_text("{}")
    with caplog.at_level(logging.WARNING, logger="mvcompile.builder"):
        result = build(BuildOptions(weights=str(run_dir), resolution=64, num_classes=10,
                                    latency_runs=0, out_dir=str(tmp_path / "o")))
    assert result.report["weights"]["description"] == str(run_dir / "best.safetensors")
    assert "was trained with --patch-config B (building A as asked)" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mvcompile.builder"):
        build(BuildOptions(weights=str(run_dir), resolution=64, num_classes=10, patch_config="B",
                           latency_runs=0, out_dir=str(tmp_path / "b")))
    assert "trained with" not in caplog.text


def test_replacing_files_no_build_recorded_is_said(tmp_path: Path, caplog) -> None:
    """A model.onnx of the user's in the folder was overwritten without a word; a rebuild's
    own files are replaced quietly."""
    out = tmp_path / "o"
    out.mkdir()
    (out / "model.onnx").write_text("mine")
    fast = ("--resolution", "64", "--latency-runs", "0")
    code, output = run("build", *fast, "-o", str(out))
    assert code == 0 and f"Replacing {out / 'model.onnx'}" in caplog.text, output
    caplog.clear()
    code, output = run("build", *fast, "-o", str(out))
    assert code == 0 and "Replacing" not in caplog.text, output


def test_an_out_dir_named_like_a_model_file_is_said_to_be_a_folder(tmp_path: Path,
                                                                   caplog) -> None:
    code, output = run("build", "--resolution", "64", "--latency-runs", "0", "-o",
                       str(tmp_path / "mine.onnx"))
    assert code == 0 and "names the output folder" in caplog.text, output
    assert (tmp_path / "mine.onnx" / "model.onnx").is_file()
