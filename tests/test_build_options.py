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


def test_the_apis_default_folder_is_named_after_the_size() -> None:
    """It was out/mobilevit_xxs for every size, so an S build replaced (and a later build
    deleted the INT8 model of) an XXS one there."""
    from dataclasses import replace

    assert BuildOptions(size="s").out_path == Path("out/mobilevit_s")
    assert BuildOptions().out_path == Path("out/mobilevit_xxs")
    assert replace(BuildOptions(), size="s").out_path == Path("out/mobilevit_s")
    assert BuildOptions(size="xs", out_dir="here").out_path == Path("here")


@pytest.mark.parametrize(("args", "message"), [
    (("--resolution", "99999999999999999999968"), "is above 4096"),  # OverflowError traceback
    (("--resolution", "6400000000"), "is above 4096"),  # 7.5 GB and 16 s in the check
    (("--resolution", "100"), "Nearest: 64 or 128"),
    (("--resolution", "0"), "Nearest: 64"),
    (("--num-classes", "1700000"), "between 1 and 100,000"),  # over 2 GiB: failed at the end
    (("--num-classes", "9223372036854775807"), "between 1 and 100,000"),  # traceback
    (("--num-classes", "0"), "between 1 and 100,000"),
])
def test_sizes_out_of_range_are_refused_at_once(tmp_path: Path, args: tuple[str, ...],
                                                message: str) -> None:
    code, output = run("build", "--latency-runs", "0", *args, "-o", str(tmp_path / "o"))
    assert_clean_failure(code, output, message)
    assert not (tmp_path / "o").exists()


def test_report_json_holds_no_infinity() -> None:
    """An SQNR of INT8 logits equal to FP32's is infinite; Python's json wrote Infinity, which
    strict parsers (jq, JavaScript) refuse."""
    import json
    import math

    from mvcompile.builder import finite_json

    report = {"sqnr_db": math.inf, "rows": [1.5, -math.inf, math.nan], "n": 3, "name": "x"}
    text = json.dumps(finite_json(report), allow_nan=False)
    assert json.loads(text) == {"sqnr_db": None, "rows": [1.5, None, None], "n": 3, "name": "x"}
