"""``mvcompile bench``: ORT latency on .onnx and .ort files; Core ML only on macOS."""

from __future__ import annotations

import sys

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from PIL import Image

from conftest import assert_clean_failure, build_random, run
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


def _cast_model(path, elem_type: int) -> str:
    """y = float(x) for x of ``elem_type`` (string: y = x)."""
    to = onnx.TensorProto.STRING if elem_type == onnx.TensorProto.STRING else (
        onnx.TensorProto.FLOAT)
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Cast", ["x"], ["y"], to=to)], "g",
        [onnx.helper.make_tensor_value_info("x", elem_type, [1, 4])],
        [onnx.helper.make_tensor_value_info("y", to, [1, 4])])
    onnx.save(onnx.helper.make_model(graph, ir_version=10, opset_imports=[
        onnx.helper.make_opsetid("", 21)]), str(path))
    return str(path)


def test_inputs_of_every_plain_type_are_made_and_others_refused(tmp_path) -> None:
    """uint16 and string inputs used to be fed float32 ("cannot run ... on random inputs")."""
    for name, elem_type in (("u16", onnx.TensorProto.UINT16), ("s", onnx.TensorProto.STRING),
                            ("i16", onnx.TensorProto.INT16)):
        result = bench.bench(_cast_model(tmp_path / f"{name}.onnx", elem_type), threads=1,
                             runs=2, warmup=0)
        assert result.stats.runs == 2
    code, output = run("bench", _cast_model(tmp_path / "bf16.onnx", onnx.TensorProto.BFLOAT16))
    assert_clean_failure(code, output, "Inputs of type tensor(bfloat16) cannot be generated")


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


def _pool_model(path, input_shape: list | None, output_shape: list | None = None) -> str:
    """y = GlobalAveragePool(x) flattened, x declared with ``input_shape`` (None: no shape);
    ir_version 10, opset 24."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("GlobalAveragePool", ["x"], ["p"]),
         helper.make_node("Flatten", ["p"], ["y"])], "pool",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, input_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, output_shape)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 24)])
    model.ir_version = 10
    onnx.save(model, path)
    return str(path)


def test_table_states_the_shapes_timed_the_batch_and_thread_spinning(tmp_path) -> None:
    path = _pool_model(tmp_path / "fixed4.onnx", [4, 3, 16, 16], [4, 3])
    code, output = run("bench", path, "--runs", "2", "--warmup", "0", "--threads", "1")
    assert code == 0, output
    rows = {line.split("  ")[0]: line for line in output.splitlines()}
    assert "[4, 3, 16, 16]" in rows["input x"] and rows["batch"].split()[-1] == "4", output
    assert "on (ORT default" in rows["thread spinning"] and "build" in output, output


def test_symbolic_height_and_width_need_a_resolution(tmp_path) -> None:
    path = _pool_model(tmp_path / "dyn.onnx", ["N", 3, "H", "W"], ["N", 3])
    code, output = run("bench", path, "--runs", "2")
    assert_clean_failure(code, output, "'x'", "[N, 3, H, W]", "--resolution")
    result = bench.bench(path, threads=1, runs=2, warmup=0, resolution=16)
    assert result.inputs == (("x", (1, 3, 16, 16)),) and result.batch == 1
    assert ("input x", "[1, 3, 16, 16]") in bench.format_rows(result)
    code, output = run("bench", path, "--runs", "2", "--warmup", "0", "--resolution", "16")
    assert code == 0, output
    assert "[1, 3, 16, 16]" in output


def test_resolution_on_a_fixed_size_model_is_ignored_with_a_warning(tmp_path, caplog) -> None:
    path = _pool_model(tmp_path / "fixed.onnx", [1, 3, 16, 16], [1, 3])
    result = bench.bench(path, threads=1, runs=2, warmup=0, resolution=32)
    assert result.inputs == (("x", (1, 3, 16, 16)),)
    assert "--resolution 32 ignored" in caplog.text
    with pytest.raises(UserError, match="--resolution must be at least 1"):
        bench.bench(path, runs=2, resolution=0)


def test_inputs_bench_cannot_fill_fail_cleanly(tmp_path) -> None:
    shapeless = _pool_model(tmp_path / "noshape.onnx", None)
    code, output = run("bench", shapeless, "--runs", "2")
    assert_clean_failure(code, output, "Input 'x' of noshape.onnx declares no shape")
    channels = _pool_model(tmp_path / "channels.onnx", ["N", "C", 16, 16])
    code, output = run("bench", channels, "--runs", "2")
    assert_clean_failure(code, output, "[N, C, 16, 16]", "axis 1")


def test_model_without_outputs_fails_cleanly(tmp_path) -> None:
    path = _pool_model(tmp_path / "nooutputs.onnx", [1, 3, 16, 16], [1, 3])
    proto = onnx.load(path)
    del proto.graph.output[:]
    onnx.save(proto, path)
    assert_clean_failure(*run("bench", path, "--runs", "2"), "has no outputs")


def test_more_threads_than_cores_get_a_note(onnx_path: str, monkeypatch) -> None:
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    code, output = run("bench", onnx_path, "--runs", "2", "--warmup", "0", "--threads", "3")
    assert code == 0
    assert "--threads 3 is more than this machine's 2 CPU cores" in output
    code, output = run("bench", onnx_path, "--runs", "2", "--warmup", "0", "--threads", "2")
    assert code == 0 and "CPU cores" not in output


@pytest.mark.parametrize("command", ["bench", "build"])
def test_far_more_threads_than_cores_are_refused(onnx_path: str, monkeypatch, tmp_path,
                                                 command: str) -> None:
    """--threads 100000 ran for over ten minutes on 2 cores and did not answer SIGTERM."""
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    args = ([onnx_path] if command == "bench" else ["--resolution", "64", "-o",
                                                      str(tmp_path / "o")])
    code, output = run(command, *args, "--threads", "100000")
    assert_clean_failure(code, output, "--threads 100000 is far more than this machine's 2 CPU "
                                       "cores; give at most 8")
    assert not (tmp_path / "o").exists()
    code, output = run("bench", onnx_path, "--runs", "2", "--warmup", "0", "--threads", "8")
    assert code == 0, output


def test_options_for_the_other_backend_are_named_as_ignored(onnx_path: str) -> None:
    code, output = run("bench", onnx_path, "--runs", "2", "--warmup", "0",
                       "--compute-units", "cpu_only")
    assert code == 0, output
    assert ("Note: --compute-units only applies to Core ML and is ignored for an ONNX Runtime "
            "model.") in output
    code, output = run("bench", onnx_path, "--runs", "2", "--warmup", "0")
    assert code == 0 and "Note:" not in output, output


def test_a_model_with_every_tensor_in_external_data_is_timed(onnx_path: str, tmp_path) -> None:
    """Saved with size_threshold=0, a Reshape's shape tensor is external too: ONNX Runtime
    could not load the model from its path, though eval and info read it."""
    path = tmp_path / "ext" / "model.onnx"
    path.parent.mkdir()
    onnx.save(onnx.load(onnx_path), str(path), save_as_external_data=True, location="m.data",
              size_threshold=0)
    code, output = run("bench", str(path), "--runs", "2", "--warmup", "0")
    assert code == 0, output
    (path.parent / "m.data").unlink()
    assert_clean_failure(*run("bench", str(path), "--runs", "2"),
                         "external data files that are missing: m.data")
