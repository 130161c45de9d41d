"""`mvcompile optimize` without --batch on models with a symbolic batch: rewritten at batch 1
and 2 and generalised back to any batch where the two results allow it, as before otherwise."""

from __future__ import annotations

import collections
import logging
import re

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import run
from mvcompile.latency import LatencyStats
from mvcompile.optimize import optimize_proto, random_inputs, run_unoptimized

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from test_optimize import dynamic_batch_export  # noqa: E402, F401 (a fixture)


def _batch_dims(model: onnx.ModelProto) -> list[str]:
    """The first dimension's name of each graph input and output ("" if none)."""
    return [value.type.tensor_type.shape.dim[0].dim_param
            for value in (*model.graph.input, *model.graph.output)]


def _assert_matches(reference: onnx.ModelProto, model: onnx.ModelProto, batches=(1, 2, 3)
                    ) -> None:
    """Same output shapes as ``reference``, and values within 1e-4, at each of ``batches``."""
    for batch in batches:
        feed = random_inputs(reference, seed=1, batch=batch)
        for want, got in zip(run_unoptimized(reference, feed), run_unoptimized(model, feed),
                             strict=True):
            assert want.shape == got.shape
            assert np.max(np.abs(want - got)) <= 1e-4, batch


def test_a_symbolic_batch_is_kept_and_the_layout_rewrites_apply(
        dynamic_batch_export, tmp_path) -> None:  # noqa: F811 (the fixture)
    out = tmp_path / "o.onnx"
    code, output = run("optimize", dynamic_batch_export, "-o", str(out), "--no-measure")
    assert code == 0, output
    # as with --batch 1 (below): the last block's 6 Transposes stay at 64²
    assert re.search(r"Transpose +48 -> 6\b", output), output
    assert "symbolic (rewritten at batch 1 and generalised)" in output
    assert "--batch 1` fixes" not in output
    written, source = onnx.load(str(out)), onnx.load(dynamic_batch_export)
    assert _batch_dims(written) == ["batch", "batch"]
    assert not any(node.op_type == "Shape" for node in written.graph.node)
    _assert_matches(source, written)
    fixed, _ = optimize_proto(source, "ort", batch=1)
    assert (sorted(n.op_type for n in written.graph.node)
            == sorted(n.op_type for n in fixed.graph.node))


def test_a_stage_dropped_for_speed_at_batch_1_is_left_out_at_batch_2(
        dynamic_batch_export, monkeypatch) -> None:  # noqa: F811 (the fixture)
    """Measured slower with the head-split fold (faked), batch 1 drops it; batch 2 must leave
    it out too, or the two graphs would differ and the generalisation give up."""
    timed = []

    def fake_time_models(models, feed, runs, on_run=None):
        timed.append(feed)
        return {"with": LatencyStats(2.0, 3.0, 1.0, runs),
                "without": LatencyStats(2.0, 3.0, 0.5, runs)}

    monkeypatch.setattr("mvcompile.optimize.latency.time_models", fake_time_models)
    source = onnx.load(dynamic_batch_export)
    optimized, report = optimize_proto(source, "ort", choose_by_latency=True)
    assert len(timed) == 1 and report["batch_generalised"]
    assert report["measured_choices"][0]["kept"] is False
    assert report["transposes"]["optimized"] == 30  # 6 + the 24 of the head split/merge
    assert _batch_dims(optimized) == ["batch", "batch"]
    _assert_matches(source, optimized)


def test_a_generalisation_that_fails_its_check_is_not_used(
        dynamic_batch_export, monkeypatch, tmp_path) -> None:  # noqa: F811 (the fixture)
    """A wrong generalisation (simulated: the batch-1 graph, its batch fixed) fails at batch
    2; the result is then the one optimized with the symbolic batch, and the note says so."""
    monkeypatch.setattr("mvcompile.optimize.batch_generalize.generalize",
                        lambda one, two, original: one)
    out = tmp_path / "o.onnx"
    code, output = run("optimize", dynamic_batch_export, "-o", str(out), "--no-measure")
    assert code == 0, output
    assert re.search(r"Transpose +48 -> 48\b", output), output
    assert "`--batch 1` fixes the batch" in output and "generalised)" not in output
    assert _batch_dims(onnx.load(str(out))) == ["batch", "batch"]


def _shape_model(kind: str) -> onnx.ModelProto:
    """A model whose shapes follow its symbolic batch B in a way that a fixed-batch result
    cannot be generalised from: "tile" repeats x [B, 4] B times (Tile reads the batch),
    "expand" expands x [B, 1] to [B, B + 1] (not linear in B)."""
    rows = 4 if kind == "tile" else 1
    batch = helper.make_tensor("zero", TensorProto.INT64, [1], [0])
    nodes = [helper.make_node("Shape", ["x"], ["s"]),
             helper.make_node("Gather", ["s", "zero"], ["b"], axis=0)]
    inits = [batch, helper.make_tensor("one", TensorProto.INT64, [1], [1])]
    if kind == "tile":
        nodes += [helper.make_node("Concat", ["b", "one"], ["shape"], axis=0),
                  helper.make_node("Tile", ["x", "shape"], ["t"])]
    else:
        nodes += [helper.make_node("Add", ["b", "one"], ["b1"]),
                  helper.make_node("Concat", ["b", "b1"], ["shape"], axis=0),
                  helper.make_node("Expand", ["x", "shape"], ["t"])]
    nodes.append(helper.make_node("Relu", ["t"], ["y"]))
    graph = helper.make_graph(
        nodes, kind, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", rows])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 18)])


@pytest.mark.parametrize("kind, why", [("tile", "read by ['Tile']"),
                                       ("expand", "not linear in the batch")])
def test_a_batch_dependence_that_cannot_be_generalised_gives_todays_result(
        kind: str, why: str, tmp_path, caplog) -> None:
    src, out = tmp_path / f"{kind}.onnx", tmp_path / "o.onnx"
    onnx.save(_shape_model(kind), str(src))
    with caplog.at_level(logging.INFO, logger="mvcompile.optimize"):
        code, output = run("optimize", str(src), "-o", str(out), "--no-measure")
    assert code == 0, output
    assert why in caplog.text and "Could not optimize" in caplog.text
    assert "`--batch 1` fixes the batch" in output and "generalised)" not in output
    written = onnx.load(str(out))
    assert written.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    _assert_matches(_shape_model(kind), written)


def test_float16_storage_is_restored_after_the_generalisation(
        dynamic_batch_export, tmp_path) -> None:  # noqa: F811 (the fixture)
    """Weights stored as float16 (+ Cast) are stored so again once, on the generalised
    model: restored in each fixed-batch result, a batch-dependent constant (a Softmax over
    one element folded to ones) sits behind a Cast, which the generalisation cannot shrink."""
    source = onnx.load(dynamic_batch_export)
    inits, casts = [], []
    for init in source.graph.initializer:
        array = numpy_helper.to_array(init)
        if array.dtype == np.float32 and array.size >= 16:
            inits.append(numpy_helper.from_array(array.astype(np.float16), init.name + "_h"))
            casts.append(helper.make_node("Cast", [init.name + "_h"], [init.name],
                                          to=TensorProto.FLOAT))
        else:
            inits.append(init)
    del source.graph.initializer[:]
    source.graph.initializer.extend(inits)
    nodes = casts + list(source.graph.node)
    del source.graph.node[:]
    source.graph.node.extend(nodes)
    optimized, report = optimize_proto(source, "ort")
    assert report["batch_generalised"] and report["transposes"]["optimized"] == 6
    assert report["storage"]["restored"] > 0
    assert report["size"]["optimized"] == optimized.ByteSize()
    after = collections.Counter(node.op_type for node in optimized.graph.node)
    assert report["nodes"]["optimized"] == sum(after.values())
    assert after["Cast"] == report["storage"]["restored"]
    assert _batch_dims(optimized) == ["batch", "batch"]
    _assert_matches(source, optimized)


def test_an_unknown_size_past_the_batch_is_named_instead_of_the_batch(tmp_path) -> None:
    """x [batch, seq] tiled by its own seq: the Shape op stays whatever the batch, so the note
    names seq and ONNX Runtime's tool to fix it (it blamed the batch and offered --batch 1)."""
    nodes = [helper.make_node("Shape", ["x"], ["s"]),
             helper.make_node("Gather", ["s", "axis1"], ["seq"], axis=0),
             helper.make_node("Concat", ["one", "seq"], ["repeats"], axis=0),
             helper.make_node("Tile", ["x", "repeats"], ["t"]),
             helper.make_node("Relu", ["t"], ["y"])]
    graph = helper.make_graph(
        nodes, "seq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [helper.make_tensor("axis1", TensorProto.INT64, [1], [1]),
         helper.make_tensor("one", TensorProto.INT64, [1], [1])])
    model = helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 18)])
    src, out = tmp_path / "seq.onnx", tmp_path / "o.onnx"
    onnx.save(model, str(src))
    code, output = run("optimize", str(src), "-o", str(out), "--no-measure")
    assert code == 0, output
    assert "--batch 1` fixes" not in output
    assert "input 'x' has shape [batch, seq], unknown at axis 1" in output
    assert "make_dynamic_shape_fixed --dim_param seq --dim_value SIZE" in output
    _assert_matches(model, onnx.load(str(out)))


@pytest.mark.parametrize("bounds", [(0, 16), (-16, 2**63 - 1)])
def test_a_slice_of_the_symbolic_axis_is_kept(bounds: tuple[int, int], tmp_path,
                                              caplog) -> None:
    """x[:16] or x[-16:] of a [seq, 8] input: at batch 1 and 2 the Slice is a no-op, which the
    rewrites removed, and the generalised model returned every row (40 of 40, not 16), exit 0
    and "max abs diff 0"; it is now optimized with its axis as it is."""
    start, end = bounds
    inits = [numpy_helper.from_array(np.array([v], np.int64), n)
             for n, v in (("starts", start), ("ends", end), ("axes", 0))]
    inits.append(numpy_helper.from_array(np.ones((8, 4), np.float32), "w"))
    graph = helper.make_graph(
        [helper.make_node("Slice", ["x", "starts", "ends", "axes"], ["s"]),
         helper.make_node("MatMul", ["s", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["seq", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4])], inits)
    src, out = tmp_path / "slice.onnx", tmp_path / "o.onnx"
    onnx.save(helper.make_model(graph, ir_version=10, opset_imports=[
        helper.make_opsetid("", 17)]), str(src))
    with caplog.at_level(logging.INFO, logger="mvcompile.optimize"):
        code, output = run("optimize", str(src), "-o", str(out), "--no-measure")
    assert code == 0, output
    assert "keeps [" in caplog.text and "generalised)" not in output
    feed = {"x": np.arange(320, dtype=np.float32).reshape(40, 8)}
    got = run_unoptimized(onnx.load(str(out)), feed)[0]
    np.testing.assert_array_equal(got, run_unoptimized(onnx.load(str(src)), feed)[0])
    assert got.shape == (16, 4)
