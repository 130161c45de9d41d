"""Error messages for models ONNX Runtime or onnx cannot use: short, one copy, no C++ noise."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from conftest import assert_clean_failure, run
from mvcompile.errors import first_line, out_of_memory_message


def _reshape_to_5x7(path: Path) -> Path:
    """Loads in ONNX Runtime, fails when run: [1, 64] cannot be reshaped to [5, 7]."""
    shape = numpy_helper.from_array(np.array([5, 7], np.int64), "s")
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "s"], ["y"])], "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)], [shape])
    onnx.save(helper.make_model(graph, ir_version=10,
                                opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def _matmul(ir_version: int) -> onnx.ModelProto:
    weight = numpy_helper.from_array(np.ones((64, 64), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 64])], [weight])
    return helper.make_model(graph, ir_version=ir_version,
                             opset_imports=[helper.make_opsetid("", 17)])


def test_first_line_drops_onnx_runtime_status_and_source_locations(tmp_path: Path) -> None:
    session = ort.InferenceSession(str(_reshape_to_5x7(tmp_path / "bad.onnx")),
                                   providers=["CPUExecutionProvider"])
    with pytest.raises(Exception) as caught:
        session.run(None, {"x": np.zeros((1, 64), np.float32)})
    raw, line = str(caught.value), first_line(caught.value)
    assert "[ONNXRuntimeError]" in raw and "/onnxruntime_src/" in raw  # what ORT says
    assert "[ONNXRuntimeError]" not in line and "onnxruntime_src" not in line
    assert "ReshapeHelper" not in line  # the C++ signature went with its location
    assert "requested shape:{5,7}" in line  # the part that explains the failure stays


def test_first_line_leaves_other_messages_alone() -> None:
    assert first_line(ValueError("bad value\nmore")) == "bad value"
    assert first_line(ValueError("")) == "ValueError"


def test_the_cli_prints_one_copy_of_an_onnx_runtime_error(tmp_path: Path) -> None:
    """ORT logs a coloured copy of every run error to stderr itself; only ours shows, and
    ORT's own comes back with -v. Run as a process: ORT writes to file descriptor 2."""
    model = str(_reshape_to_5x7(tmp_path / "bad.onnx"))

    def bench(*flags: str, after: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
        code = "from mvcompile.cli import main; main()"
        return subprocess.run([sys.executable, "-c", code, *flags, "bench", model, "--runs", "1",
                               *after], capture_output=True, text=True, timeout=120)

    quiet, verbose, verbose_after = bench(), bench("-v"), bench(after=("-v",))
    assert quiet.returncode == verbose.returncode == verbose_after.returncode == 1
    assert "Error: ONNX Runtime cannot run" in quiet.stderr
    assert "[E:onnxruntime" not in quiet.stderr and "Traceback" not in quiet.stderr
    assert "[E:onnxruntime" in verbose.stderr
    assert "[E:onnxruntime" in verbose_after.stderr  # -v also works after the command


def test_missing_external_data_is_named_not_called_corrupt(tmp_path: Path) -> None:
    onnx.save(_matmul(10), str(tmp_path / "m.onnx"), save_as_external_data=True,
              location="m.weights", size_threshold=0)
    code, output = run("eval", str(tmp_path / "m.onnx"), "--data", "digits")
    assert_clean_failure(code, output, "square [N, 3, R, R] image input")  # read; no image model
    (tmp_path / "m.weights").unlink()
    for command in (("eval", str(tmp_path / "m.onnx"), "--data", "digits"),
                    ("optimize", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "o.onnx"))):
        code, output = run(*command)
        assert_clean_failure(code, output, "external data files that are missing: m.weights")
        assert "corrupt" not in output
    assert not (tmp_path / "o.onnx").exists()


def test_bench_says_how_to_run_a_model_with_a_too_new_ir_version(tmp_path: Path) -> None:
    onnx.save(_matmul(99), str(tmp_path / "n.onnx"))
    code, output = run("bench", str(tmp_path / "n.onnx"), "--runs", "1")
    assert_clean_failure(code, output, "Unsupported model IR version: 99", "mvcompile optimize")


def test_bench_says_an_unreadable_ort_file_may_be_damaged(tmp_path: Path) -> None:
    (tmp_path / "m.ort").write_bytes(b"not a flatbuffer")
    code, output = run("bench", str(tmp_path / "m.ort"), "--runs", "1")
    assert_clean_failure(code, output, f"cannot load {tmp_path / 'm.ort'}", "may be corrupt")


def test_a_core_ml_package_is_named_as_one(tmp_path: Path) -> None:
    package = tmp_path / "model.mlpackage"
    package.mkdir()
    for command in (("eval", str(package), "--data", "digits"), ("info", str(package)),
                    ("optimize", str(package), "-o", str(tmp_path / "o.onnx"))):
        code, output = run(*command)
        assert_clean_failure(code, output, "is a Core ML package", "mvcompile bench")


def _expand_to_192_tib(path: Path) -> Path:
    """Loads in ONNX Runtime; running it asks for a 192 TiB buffer, more than any x86-64
    address space holds, so the allocation fails whatever the machine's overcommit policy."""
    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["x", "axes"], ["m"]),
         helper.make_node("Expand", ["m", "shape"], ["y"])], "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.array([2, 3], np.int64), "axes"),
         numpy_helper.from_array(np.array([2**16, 3, 2**16, 2**12], np.int64), "shape")])
    onnx.save(helper.make_model(graph, ir_version=10,
                                opset_imports=[helper.make_opsetid("", 21)]), str(path))
    return path


@pytest.mark.parametrize("command", [("eval", "--data", "digits", "--limit", "2"),
                                     ("bench", "--runs", "1"),
                                     ("optimize", "-o", "OUT", "--no-measure")])
def test_running_out_of_memory_is_an_error_message_not_a_traceback(tmp_path: Path,
                                                                   command: tuple) -> None:
    """eval ended in a traceback; bench and optimize blamed the model or its input."""
    model = _expand_to_192_tib(tmp_path / "huge.onnx")
    args = [str(tmp_path / "o.onnx") if a == "OUT" else a for a in command[1:]]
    code, output = run(command[0], str(model), *args)
    assert_clean_failure(code, output, "Out of memory: 192.0 TiB were asked for by a node of "
                         "type Expand.", "A smaller input (resolution or batch)")
    assert "cannot run" not in output


def test_out_of_memory_message_recognises_only_allocation_failures(tmp_path: Path) -> None:
    session = ort.InferenceSession(str(_expand_to_192_tib(tmp_path / "m.onnx")),
                                   providers=["CPUExecutionProvider"])
    with pytest.raises(Exception) as ort_error:
        session.run(None, {"x": np.zeros((1, 3, 8, 8), np.float32)})
    assert "192.0 TiB" in out_of_memory_message(ort_error.value)
    torch_error = RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to "
                               "allocate 83886080000 bytes. Error code 12")
    assert "78.1 GiB were asked for." in out_of_memory_message(torch_error)
    cuda_error = RuntimeError("CUDA out of memory. Tried to allocate 20.00 MiB (GPU 0; 7.79 "
                              "GiB total capacity)")  # torch.OutOfMemoryError's text
    assert "on the GPU: 20.00 MiB more were asked for" in out_of_memory_message(cuda_error)
    assert out_of_memory_message(MemoryError()).startswith("Out of memory. ")
    try:  # onnx_ir's PassError wraps the MemoryError numpy raised inside a pass
        raise RuntimeError("An error occurred when running the pass") from MemoryError(
            "Unable to allocate 64.0 GiB for an array with shape (4, 2**32)")
    except RuntimeError as wrapped:
        assert "64.0 GiB were asked for" in out_of_memory_message(wrapped)
    assert out_of_memory_message(RuntimeError("shape mismatch")) is None


def test_a_full_disk_is_an_error_message_naming_the_file(tmp_path: Path, monkeypatch) -> None:
    """write() on a full disk raises OSError(ENOSPC) without a file name; the CLI names the
    output and leaves no temporary file behind."""
    import errno

    from mvcompile import onnx_io

    def full_disk(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    onnx.save(_matmul(10), str(tmp_path / "m.onnx"))
    monkeypatch.setattr(onnx_io.os, "fsync", full_disk)
    out = tmp_path / "out"
    code, output = run("optimize", str(tmp_path / "m.onnx"), "-o", str(out / "o.onnx"),
                       "--no-measure")
    assert_clean_failure(code, output, f"No space left on device: {out / 'o.onnx'}")
    assert not out.exists() or not list(out.iterdir())


def test_ctrl_c_after_optimize_wrote_its_output_says_so(tmp_path: Path, monkeypatch) -> None:
    """An interrupt while the summary prints: the file is in place, and the message says so
    instead of "no output was written"."""
    import mvcompile.cli

    def interrupted(*args: object) -> None:
        raise KeyboardInterrupt

    onnx.save(_matmul(10), str(tmp_path / "m.onnx"))
    monkeypatch.setattr(mvcompile.cli, "_optimize_summary", interrupted)
    code, output = run("optimize", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "o.onnx"),
                       "--no-measure")
    assert code == 130
    assert f"{tmp_path / 'o.onnx'} was already written" in output
    assert "no output was written" not in output
    assert (tmp_path / "o.onnx").is_file()


def _identity(elem_type: int, shape: list | None) -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])], "g",
        [helper.make_tensor_value_info("x", elem_type, shape)],
        [helper.make_tensor_value_info("y", elem_type, shape)])
    return helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 17)])


def test_optimize_blames_an_input_that_fails_the_checker_itself(tmp_path: Path) -> None:
    """An input without a shape field: the result fails the full check as the input does, and
    the message used to ask for a bug report."""
    onnx.save(_identity(onnx.TensorProto.FLOAT, None), str(tmp_path / "m.onnx"))
    code, output = run("optimize", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "o.onnx"),
                       "--no-measure")
    assert_clean_failure(code, output, "The input model fails onnx.checker's full check")
    assert "Please report" not in output and not (tmp_path / "o.onnx").exists()


def test_optimize_compares_nan_and_string_outputs(tmp_path: Path) -> None:
    """NaN − NaN is NaN, and strings do not subtract: both were called a difference in the
    optimized model, with a request for a bug report."""
    log_of = helper.make_graph(
        [helper.make_node("Neg", ["x"], ["n"]), helper.make_node("Log", ["n"], ["y"])], "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 8])])
    models = {"nan": helper.make_model(log_of, ir_version=10,
                                       opset_imports=[helper.make_opsetid("", 17)]),
              "text": _identity(onnx.TensorProto.STRING, [2])}
    for name, model in models.items():
        onnx.save(model, str(tmp_path / f"{name}.onnx"))
        code, output = run("optimize", str(tmp_path / f"{name}.onnx"), "-o",
                           str(tmp_path / f"{name}_o.onnx"), "--no-measure")
        assert code == 0, output
        assert (tmp_path / f"{name}_o.onnx").exists()


def test_output_difference_matches_non_finite_values_and_compares_strings() -> None:
    from mvcompile.optimize import output_difference

    inf, nan = np.inf, np.nan
    a = np.array([1.0, nan, inf, -inf], np.float32)
    assert output_difference(a, a.copy()) == 0.0
    assert output_difference(a, np.array([1.5, nan, inf, -inf], np.float32)) == 0.5
    assert output_difference(a, np.array([1.0, 2.0, inf, -inf], np.float32)) == inf
    assert output_difference(a, np.array([1.0, nan, -inf, -inf], np.float32)) == inf
    words = np.array(["a", "b"], object)
    assert output_difference(words, words.copy()) == 0.0
    assert output_difference(words, np.array(["a", "c"], object)) == inf
