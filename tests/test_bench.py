"""``mvcompile bench``: ORT latency on .onnx and .ort files; Core ML only on macOS."""

from __future__ import annotations

import sys

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from PIL import Image

from conftest import build_random
from mvcompile import bench, onnx_io
from mvcompile.backends import coreml
from mvcompile.backends import ort as ort_backend
from mvcompile.cli import main
from mvcompile.errors import UserError
from mvcompile.graphs.mobilevit import MobileViTConfig


@pytest.fixture(scope="module")
def onnx_path(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("bench") / "model.onnx"
    onnx_io.save_model(build_random(MobileViTConfig.for_size("xxs", resolution=64))[0], path)
    return str(path)


def test_bench_onnx_and_ort(onnx_path: str, tmp_path) -> None:
    ort_file = ort_backend.write_ort(onnx.load(onnx_path), tmp_path)[0]
    runs: list[int] = []
    for path in (onnx_path, ort_file):
        runs.clear()
        result = bench.bench(path, threads=1, runs=5, warmup=1, on_run=lambda: runs.append(1))
        s = result.stats
        assert result.backend == "ort" and result.batch == 1 and s.runs == 5 == len(runs)
        assert 0 < s.min_ms <= s.median_ms <= s.p90_ms
        assert result.throughput == pytest.approx(1000 / s.median_ms)


def test_bench_cli_prints_the_table(onnx_path: str) -> None:
    result = CliRunner().invoke(main, ["bench", onnx_path, "--backend", "ort", "--runs", "3",
                                       "--warmup", "0", "--threads", "1"])
    assert result.exit_code == 0, result.output
    for phrase in ("median", "p90", "min", "throughput", "inferences/s", "ort (CPU, 1 thread"):
        assert phrase in result.output


def test_bench_bad_input_fails_cleanly(onnx_path: str, tmp_path) -> None:
    runner = CliRunner()
    for args, phrase in [(["bench", str(tmp_path / "none.onnx")], "not found"),
                         (["bench", onnx_path, "--backend", "coreml"], "--backend ort"),
                         (["bench", onnx_path, "--runs", "0"], "--runs"),
                         (["bench", str(tmp_path)], "is a folder")]:
        result = runner.invoke(main, args)
        assert result.exit_code != 0 and isinstance(result.exception, SystemExit)
        assert phrase in result.output, result.output


def _int64_input_model(path) -> str:
    """y = 2·float(x) for an int64 image-shaped input [N, 3, 8, 8]."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Cast", ["ids"], ["f"], to=TensorProto.FLOAT),
         helper.make_node("Add", ["f", "f"], ["y"])], "ids",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3, 8, 8])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    onnx.save(model, path)
    return str(path)


def test_models_with_integer_inputs_bench_and_refuse_eval_cleanly(tmp_path) -> None:
    path = _int64_input_model(tmp_path / "ids.onnx")
    result = bench.bench(path, threads=1, runs=3, warmup=0)
    assert result.stats.runs == 3 and result.batch == 1
    (tmp_path / "imgs").mkdir()
    for i in range(2):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "imgs" / f"{i}.png")
    out = CliRunner().invoke(main, ["eval", path, "--data", str(tmp_path / "imgs")])
    assert out.exit_code != 0 and isinstance(out.exception, SystemExit)
    assert "one float32 input" in out.output and "tensor(int64)" in out.output, out.output


def test_bench_coreml(onnx_path: str, tmp_path) -> None:
    """On macOS a real MLModel.predict benchmark; elsewhere a clear 'needs a Mac' error."""
    package = coreml.write_coreml(onnx.load(onnx_path), tmp_path / "m.mlpackage",
                                  precision="fp32", check=False)
    if sys.platform == "darwin":
        result = bench.bench(package, runs=3, warmup=1, compute_units="cpu_only")
        assert result.backend == "coreml" and result.stats.median_ms > 0
    else:
        with pytest.raises(UserError, match="need macOS.*Xcode"):
            bench.bench(package, runs=3)
