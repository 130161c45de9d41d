"""ONNX Runtime mobile: .ort files and operator configs, verified round trips, bad input."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.parser
import pytest

from conftest import build_random, quantized_mobile
from mvcompile import latency, onnx_io
from mvcompile.backends import ort as ort_backend
from mvcompile.errors import UserError
from mvcompile.graphs.mobilevit import MobileViTConfig
from mvcompile.pipeline import run_pipeline

CFG = MobileViTConfig.for_size("xxs", resolution=64)


@pytest.fixture(scope="module")
def fp32() -> onnx.ModelProto:
    return onnx_io.to_proto(run_pipeline(build_random(CFG)[0], "fp32")[0])


@pytest.fixture(scope="module")
def int8() -> onnx.ModelProto:
    return quantized_mobile(CFG)


def outputs(model: bytes | str, feed: dict, level=None) -> np.ndarray:
    kwargs = {} if level is None else {"level": level}
    return latency.make_session(model, threads=1, **kwargs).run(None, feed)[0]


def test_fixed_style_round_trips_fp32(fp32: onnx.ModelProto, tmp_path) -> None:
    paths = ort_backend.write_ort(fp32, tmp_path / "out")
    assert [p.name for p in paths] == ["model.ort", "model.required_operators.config",
                                       "model.required_operators_and_types.config"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(p.name for p in paths)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging folder left
    feed = {"pixel_values": np.random.default_rng(3).uniform(0, 1, (2, 3, 64, 64))
            .astype(np.float32)}  # batch 2: the .ort keeps the dynamic batch
    want = outputs(fp32.SerializeToString(), feed)
    got = outputs(str(paths[0]), feed)
    assert got.shape == (2, 1000)
    assert np.abs(got - want).max() <= 1e-5 * max(1.0, np.abs(want).max())
    ops = paths[1].read_text()
    assert "Conv" in ops and "LayerNormalization" in ops
    assert str(tmp_path / "out") in ops and ".mvcompile-stage" not in ops
    typed = paths[2].read_text()
    assert '"inputs": {"0": ["float"]}' in typed


def test_runtime_style_int8_matches_its_source(int8: onnx.ModelProto, tmp_path) -> None:
    paths = ort_backend.write_ort(int8, tmp_path, style="runtime")
    assert [p.name for p in paths] == [
        "model.with_runtime_opt.ort", "model.required_operators.with_runtime_opt.config",
        "model.required_operators_and_types.with_runtime_opt.config"]
    check = ort_backend.verify_ort(int8, paths[0], "runtime")
    assert check.max_abs_diff <= 1e-5  # float logits (no output Q/DQ), the same kernels
    feed = {"pixel_values": np.random.default_rng(4).uniform(0, 1, (1, 3, 64, 64))
            .astype(np.float32)}
    level = ort_backend.REFERENCE_LEVEL["runtime"]
    np.testing.assert_allclose(outputs(str(paths[0]), feed),
                               outputs(int8.SerializeToString(), feed, level), atol=1e-5)
    assert "QuantizeLinear" in paths[1].read_text()
    for config in paths[1:]:  # headers named the converter's deleted temporary model too
        header = [line for line in config.read_text().splitlines() if line.startswith("# - ")]
        assert header == [f"# - {tmp_path.resolve() / 'model.with_runtime_opt.ort'}"], header


def test_fixed_style_int8_is_identical(int8: onnx.ModelProto, tmp_path) -> None:
    path = ort_backend.write_ort(int8, tmp_path, style="fixed")[0]
    feed = {"pixel_values": np.random.default_rng(5).uniform(0, 1, (1, 3, 64, 64))
            .astype(np.float32)}
    np.testing.assert_array_equal(outputs(str(path), feed),
                                  outputs(int8.SerializeToString(), feed))


def test_bad_input_writes_nothing(fp32: onnx.ModelProto, tmp_path) -> None:
    with pytest.raises(UserError, match="fixed .*runtime"):
        ort_backend.write_ort(fp32, tmp_path / "a", style="fast")
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(UserError, match="is a file"):
        ort_backend.write_ort(fp32, blocker / "out")
    unknown = onnx.parser.parse_model('<ir_version: 10, opset_import: ["" : 24, "x.y" : 1]>\n'
                                      "g (float[1] x) => (float[1] y) { y = x.y.Frob(x) }")
    with pytest.raises(UserError, match="could not convert"):
        ort_backend.write_ort(unknown, tmp_path / "b")
    assert [p.name for p in tmp_path.iterdir()] == ["file"]
