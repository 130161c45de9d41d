"""`mvcompile optimize` on models that keep their weights in external data files."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from conftest import run
from mvcompile import onnx_io

FEED = {"x": np.random.default_rng(1).normal(size=(1, 8, 6, 6)).astype(np.float32)}


def _conv_bn() -> onnx.ModelProto:
    """Conv → BatchNorm (which optimize folds, so the result's weights differ)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(a.astype(np.float32), name) for name, a in [
        ("w", rng.normal(0, 0.3, (16, 8, 3, 3))), ("b", rng.normal(0, 0.1, 16)),
        ("s", rng.uniform(0.5, 1.5, 16)), ("o", rng.normal(0, 0.1, 16)),
        ("m", rng.normal(0, 0.1, 16)), ("v", rng.uniform(0.5, 1.5, 16))]]
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
         helper.make_node("BatchNormalization", ["c", "s", "o", "m", "v"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, 6, 6])], inits)
    return helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 18)])


def _save_external(proto: onnx.ModelProto, path: Path, location: str) -> None:
    onnx.save(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location=location, size_threshold=0)


def _outputs(path: Path) -> np.ndarray:
    """``path`` passes the full checker and ONNX Runtime loads and runs it from the file."""
    onnx.checker.check_model(str(path), full_check=True)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, FEED)[0]


def test_in_place_replaces_the_model_and_removes_only_its_old_data_file(tmp_path: Path) -> None:
    model = tmp_path / "model.onnx"
    _save_external(_conv_bn(), model, "model.onnx.data")
    _save_external(_conv_bn(), tmp_path / "other.onnx", "other.onnx.data")
    (tmp_path / "notes.data").write_text("not a model's")
    expected = _outputs(model)
    code, output = run("optimize", str(model), "-o", str(model))
    assert code == 0, output
    assert "Removed the external data files that the replaced model used" in output
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "model.onnx", "notes.data", "other.onnx", "other.onnx.data"]
    assert onnx_io.external_data_files(model) == set()
    np.testing.assert_allclose(_outputs(model), expected, rtol=0, atol=1e-5)
    assert [n.op_type for n in onnx.load(str(model)).graph.node] == ["Conv"]  # BN folded
    np.testing.assert_allclose(_outputs(tmp_path / "other.onnx"), expected, rtol=0, atol=1e-5)


def test_an_input_with_external_data_optimizes_into_another_folder(tmp_path: Path) -> None:
    src, dst = tmp_path / "in" / "model.onnx", tmp_path / "out" / "model.onnx"
    src.parent.mkdir()
    _save_external(_conv_bn(), src, "weights.bin")
    before = {p.name: p.read_bytes() for p in src.parent.iterdir()}
    code, output = run("optimize", str(src), "-o", str(dst))
    assert code == 0, output
    assert {p.name: p.read_bytes() for p in src.parent.iterdir()} == before
    assert [p.name for p in dst.parent.iterdir()] == ["model.onnx"]
    np.testing.assert_allclose(_outputs(dst), _outputs(src), rtol=0, atol=1e-5)


def test_a_data_file_that_the_input_shares_with_the_replaced_model_stays(
        tmp_path: Path) -> None:
    """-o names a copy of the input's graph file (both read weights.bin): overwriting the
    copy must not delete the input's data."""
    src, copy = tmp_path / "model.onnx", tmp_path / "copy.onnx"
    _save_external(_conv_bn(), src, "weights.bin")
    shutil.copy(src, copy)
    code, output = run("optimize", str(src), "-o", str(copy))
    assert code == 0, output
    assert (tmp_path / "weights.bin").is_file()
    np.testing.assert_allclose(_outputs(copy), _outputs(src), rtol=0, atol=1e-5)


def test_a_data_file_that_another_model_beside_the_output_uses_stays(tmp_path: Path) -> None:
    """a.onnx and b.onnx share weights.bin; replacing b.onnx must leave a.onnx whole."""
    src, a, b = tmp_path / "src" / "model.onnx", tmp_path / "a.onnx", tmp_path / "b.onnx"
    src.parent.mkdir()
    onnx.save(_conv_bn(), str(src))
    _save_external(_conv_bn(), a, "weights.bin")
    shutil.copy(a, b)
    code, output = run("optimize", str(src), "-o", str(b))
    assert code == 0, output
    assert (tmp_path / "weights.bin").is_file() and onnx_io.external_data_files(b) == set()
    np.testing.assert_allclose(_outputs(a), _outputs(b), rtol=0, atol=1e-5)


def test_the_data_file_of_an_overwritten_older_result_is_removed(tmp_path: Path) -> None:
    src, dst = tmp_path / "model.onnx", tmp_path / "out.onnx"
    onnx.save(_conv_bn(), str(src))
    _save_external(_conv_bn(), dst, "out.onnx.data")
    code, output = run("optimize", str(src), "-o", str(dst))
    assert code == 0, output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "out.onnx"]
    np.testing.assert_allclose(_outputs(dst), _outputs(src), rtol=0, atol=1e-5)


def test_external_data_files_reads_locations_and_ignores_non_models(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    _save_external(_conv_bn(), tmp_path / "m.onnx", "sub/w.bin")
    assert onnx_io.external_data_files(tmp_path / "m.onnx") == {
        (tmp_path / "sub" / "w.bin").resolve()}
    (tmp_path / "junk.onnx").write_bytes(b"\x00not protobuf")
    assert onnx_io.external_data_files(tmp_path / "junk.onnx") == set()
    assert onnx_io.external_data_files(tmp_path / "missing.onnx") == set()


def test_in_place_through_a_symbolic_link_replaces_the_file_it_points_to(
        tmp_path: Path) -> None:
    """-o equal to the input, a link: the link stays a link and the model it points to (with
    its external data, which the new one does not use) is replaced."""
    target, link = tmp_path / "model.onnx", tmp_path / "link.onnx"
    _save_external(_conv_bn(), target, "model.onnx.data")
    link.symlink_to(target.name)  # relative, as the external data's location
    expected = _outputs(target)
    code, output = run("optimize", str(link), "-o", str(link))
    assert code == 0, output
    assert link.is_symlink() and link.resolve() == target.resolve()
    assert [n.op_type for n in onnx.load(str(target)).graph.node] == ["Conv"]  # BN folded
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.onnx", "model.onnx"]
    np.testing.assert_allclose(_outputs(link), expected, rtol=0, atol=1e-5)
