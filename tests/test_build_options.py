"""Bad `build` options are refused before any work, with one-paragraph errors (Python API
values included, which the CLI's choices cannot catch)."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import assert_clean_failure, run
from mvcompile import BuildOptions, build
from mvcompile.errors import UserError


@pytest.mark.parametrize(("settings", "message"), [
    ({"targets": "onnx,ort"}, "targets is a tuple of names"),  # was split into characters
    ({"channel_order": "BGR"}, "--checkpoint-channels must be one of auto, rgb, bgr"),
    ({"targets": ("onnx", "coreml"), "coreml_batch": 2}, "takes one image per prediction"),
])
def test_api_options_that_cannot_work_are_user_errors(tmp_path: Path, settings: dict,
                                                      message: str) -> None:
    out = tmp_path / "o"
    with pytest.raises(UserError, match=message):
        build(BuildOptions(resolution=64, latency_runs=0, out_dir=str(out), **settings))
    assert not out.exists()


def test_coreml_image_input_with_batch_2_fails_before_the_build(tmp_path: Path) -> None:
    # It used to fail after compiling, calibrating and writing .ort files (40 s at S, 256²).
    code, output = run("build", "--resolution", "64", "--latency-runs", "0", "--int8",
                       "--targets", "ort,coreml", "--coreml-batch", "2", "-o", str(tmp_path / "o"))
    assert_clean_failure(code, output, "--coreml-input image takes one image per prediction")
    assert "Calibrating" not in output and "Compiling" not in output
    assert not (tmp_path / "o").exists()
