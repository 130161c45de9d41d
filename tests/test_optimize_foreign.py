"""`mvcompile optimize` on torch exports of other transformers vision models (small configs)."""

from __future__ import annotations

import io

import onnx
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from mvcompile.optimize import optimize_proto  # noqa: E402


def _small_models() -> dict[str, torch.nn.Module]:
    t = transformers
    return {
        "mobilevitv2": t.MobileViTV2ForImageClassification(t.MobileViTV2Config(
            image_size=64, width_multiplier=0.5, num_labels=5)),
        "deit": t.ViTForImageClassification(t.ViTConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            image_size=32, patch_size=8, num_labels=5)),
        "swin": t.SwinForImageClassification(t.SwinConfig(
            image_size=32, patch_size=2, embed_dim=16, depths=[1, 1], num_heads=[1, 2],
            window_size=4, num_labels=5)),
    }


def _export(model: torch.nn.Module, size: int) -> onnx.ModelProto:
    """TorchScript exporter (fast); the dynamo one where TorchScript cannot (Col2Im)."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # move away from HF's zero/one init
    pixels = torch.rand(1, 3, size, size)
    if isinstance(model, transformers.MobileViTV2ForImageClassification):
        return torch.onnx.export(model.eval(), (pixels,), dynamo=True, verbose=False,
                                 input_names=["pixel_values"],
                                 output_names=["logits"]).model_proto
    buffer = io.BytesIO()
    torch.onnx.export(model.eval(), (pixels,), buffer, dynamo=False,
                      opset_version=18, input_names=["pixel_values"], output_names=["logits"])
    return onnx.load_from_string(buffer.getvalue())


SIZES = {"mobilevitv2": 64, "deit": 32, "swin": 32}


@pytest.mark.parametrize("name", list(SIZES))
def test_foreign_vit_graphs_optimize_with_unchanged_outputs(name: str) -> None:
    proto = _export(_small_models()[name], SIZES[name])
    optimized, report = optimize_proto(proto, "ort")  # raises if numerics differ > 1e-4
    onnx.checker.check_model(optimized, full_check=True)
    assert report["max_abs_diff"] <= 1e-4
    assert report["nodes"]["optimized"] <= report["nodes"]["onnxsim"] <= report["nodes"]["input"]
    fired = {rule: n for stage in report["pipeline"]["stages"]
             for rule, n in stage.get("rules", {}).items() if n}
    ops = {n.op_type for n in optimized.graph.node}
    if name == "mobilevitv2":  # im2col unfold (Gather, rank-6 Transpose) and Col2Im fold
        assert fired["Im2ColUnfold"] == fired["Col2ImFold"] >= 1
        assert report["transposes"]["optimized"] == 0
        assert not {"Col2Im", "Gather"} & ops
        inferred = onnx.shape_inference.infer_shapes(optimized)
        assert max(len(v.type.tensor_type.shape.dim) for v in inferred.graph.value_info) <= 5
    if name in ("deit", "swin"):  # the TorchScript exporter writes GELU as Erf arithmetic
        assert "Gelu" in ops and "Erf" not in ops
        assert any("gelu" in rule.lower() for rule in fired), fired
        # Each layer's attention head split/merge becomes one fused Attention node, which
        # removes the head-split Transposes (Swin keeps its window-partition ones).
        layers = 2  # both small configs have two transformer layers
        assert fired["fold_head_split_ort-attention"] == layers, fired
        assert sum(n.op_type == "Attention" for n in optimized.graph.node) == layers
        assert report["transposes"]["optimized"] < report["transposes"]["onnxsim"]
    refused = {rule: why for stage in report["pipeline"]["stages"]
               for rule, why in stage.get("refused", {}).items()}
    assert all(isinstance(why, str) and why for why in refused.values())


@pytest.mark.parametrize("target", ["ort", "mobile"])
def test_optimizing_the_result_again_changes_nothing(target: str) -> None:
    """Swin's first stage has one attention head: the head split's ReduceSum then sums an
    axis of size 1, which the same run turns into a Reshape and merges with the next one."""
    proto = _export(_small_models()["swin"], SIZES["swin"])
    once, report = optimize_proto(proto, target)
    again = optimize_proto(once, target)[1]
    assert again["nodes"]["input"] == again["nodes"]["optimized"] == report["nodes"]["optimized"]
    # the one-head ReduceSum is gone, the two-head one of the second stage stays (mobile)
    assert [n.op_type for n in once.graph.node].count("ReduceSum") == (target == "mobile")
    tidy = {s["name"]: s for s in report["pipeline"]["stages"]}["tidy_reshape"]["rules"]
    assert tidy["singleton_reducesum"] == (target == "mobile")
