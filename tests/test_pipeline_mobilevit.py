"""Whole-model: our MobileViT-XXS at 64x64 through each pipeline."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from conftest import build_random, ort_run, random_pixels
from mvcompile import analysis, onnx_io
from mvcompile.pipeline import PIPELINES, run_pipeline


def _sigmoid_mul_pairs(proto: onnx.ModelProto) -> int:
    sigmoid_outputs = {n.output[0] for n in proto.graph.node if n.op_type == "Sigmoid"}
    return sum(1 for n in proto.graph.node
               if n.op_type == "Mul" and sigmoid_outputs & set(n.input))


@pytest.mark.parametrize("name", ["fp32", "mobile"])
def test_compiled_xxs_has_no_bn_transpose_or_sigmoid_mul(xxs64, name: str) -> None:
    plain, _ = build_random(xxs64, seed=3)
    pixels = random_pixels(2, 64)
    expected = ort_run(plain, pixels)
    compiled, report = run_pipeline(build_random(xxs64, seed=3)[0], name)
    proto = onnx_io.to_proto(compiled)
    onnx.checker.check_model(proto, full_check=True)
    op_types = [n.op_type for n in proto.graph.node]
    assert "BatchNormalization" not in op_types
    assert "Transpose" not in op_types
    assert _sigmoid_mul_pairs(proto) == 0
    inferred = onnx.shape_inference.infer_shapes(proto)
    ranks = [len(v.type.tensor_type.shape.dim) for v in inferred.graph.value_info]
    assert ranks and max(ranks) <= 5
    np.testing.assert_allclose(ort_run(compiled, pixels), expected, rtol=0, atol=1e-4)
    counts = {s["name"]: s.get("rules", {}) for s in report["stages"]}
    target = "ort" if name == "fp32" else "mobile"
    assert counts["fuse_conv_bn"] == {"fold_bn_into_conv": 32}
    assert counts["fuse_swish"][f"fuse_swish_{target}"] == 34
    assert counts["unfold_fold"][f"unfold_after_conv1x1_{target}"] == 3
    assert counts["unfold_fold"][f"fold_before_conv1x1_{target}"] == 3
    heads = "ort-attention" if name == "fp32" else "mobile"
    assert counts["fold_head_split"][f"fold_head_split_{heads}"] == sum(xxs64.depths)
    if name == "fp32":  # ORT's fused attention, one node per transformer layer
        assert op_types.count("Attention") == sum(xxs64.depths)
        # named with its domain, as the op histogram names it (opset 23 has an Attention too)
        assert report["ops_after"]["com.microsoft.Attention"] == sum(xxs64.depths)
        assert "Attention" not in report["ops_after"]
    assert report["nodes_after"] < report["nodes_before"]


def test_mobile_pipeline_uses_standard_onnx_only(xxs64) -> None:
    compiled, _ = run_pipeline(build_random(xxs64)[0], "mobile")
    assert {node.domain for node in compiled.graph} <= {""}
    assert "Swish" in {node.op_type for node in compiled.graph}


def test_skipped_stage_leaves_its_pattern_and_says_so(xxs64) -> None:
    """Without fold_head_split, each attention keeps its head split/merge: 4 Transposes
    (q, kᵀ, v, merge) per transformer layer."""
    compiled, report = run_pipeline(build_random(xxs64)[0], "fp32", skip=frozenset(
        {"fold_head_split"}))
    op_types = [node.op_type for node in compiled.graph]
    assert op_types.count("Transpose") == 4 * sum(xxs64.depths)
    assert {"name": "fold_head_split", "skipped": True} in report["stages"]
    with pytest.raises(KeyError, match="no stage"):
        run_pipeline(build_random(xxs64)[0], "fp32", skip=frozenset({"nope"}))


def test_unknown_pipeline_is_a_key_error(xxs64) -> None:
    with pytest.raises(KeyError, match="fp32"):
        run_pipeline(build_random(xxs64)[0], "nope")
    assert set(PIPELINES) >= {"fp32", "mobile"}


@pytest.mark.parametrize("name, transposes, sigmoids", [("int8", 0, 34), ("fp32-transpose", 6, 0)])
def test_int8_and_one_transpose_pipelines(xxs64, name: str, transposes: int,
                                          sigmoids: int) -> None:
    """int8 keeps Swish as Sigmoid·Mul (for integer kernels); fp32-transpose has exactly one
    Transpose per unfold and per fold (3 MobileViT blocks × 2)."""
    plain, _ = build_random(xxs64, seed=4)
    pixels = random_pixels(2, 64)
    compiled, _ = run_pipeline(build_random(xxs64, seed=4)[0], name)
    proto = onnx_io.to_proto(compiled)
    onnx.checker.check_model(proto, full_check=True)
    op_types = [n.op_type for n in proto.graph.node]
    assert op_types.count("Transpose") == transposes
    assert _sigmoid_mul_pairs(proto) == sigmoids
    assert "BatchNormalization" not in op_types
    np.testing.assert_allclose(ort_run(compiled, pixels), ort_run(plain, pixels), rtol=0,
                               atol=1e-4)


def test_compiled_graphs_count_the_same_macs_as_the_plain_one(xxs64) -> None:
    """The pipelines only re-express the same products (fused attention, absorbed 1x1 convs,
    transposed matmuls, Einsums in the mobile form), so the MAC count must not move. (Einsum
    equations were parsed from their bytes' repr, "b'ij,jk->ik'", which summed over a letter
    b: the mobile form counted 29% more.)"""
    plain, _ = build_random(xxs64)
    plain_macs, unknown = analysis.count_macs(onnx_io.to_proto(plain))
    assert unknown == [] and plain_macs > 0
    for name in ("fp32", "fp32-transpose", "int8", "mobile"):
        compiled, _ = run_pipeline(build_random(xxs64)[0], name)
        assert analysis.count_macs(onnx_io.to_proto(compiled)) == (plain_macs, []), name
