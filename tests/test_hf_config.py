"""Hugging Face config.json settings that no weight shape shows: refused where the graph
cannot build them, LayerNorm epsilon taken over; and the build's plain-vs-compiled check,
which scales with the logits."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest

torch = pytest.importorskip("torch")

from conftest import assert_clean_failure, build_random, ort_run, random_pixels, run
from mvcompile.builder import check_numerics, pass_limit
from mvcompile.errors import UserError
from mvcompile.graphs.factory import create_mobilevit
from mvcompile.graphs.mobilevit import MobileViTConfig
from mvcompile.reference import hf_logits, hf_model

CFG = MobileViTConfig.for_size("xxs", resolution=64, num_classes=10)


def _hf_folder(folder: Path, seed: int = 31, **settings: object) -> tuple[Path, torch.nn.Module]:
    """A transformers MobileViT folder of CFG with random weights and ``settings`` written
    into its config.json (and applied to the returned model where they are LayerNorm eps)."""
    _, weights = build_random(CFG, seed=seed)
    reference = hf_model(CFG, weights)
    torch.manual_seed(seed)
    with torch.no_grad():  # norms of unit scale, so that their epsilon shows in the logits
        for module in reference.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.uniform_(0.5, 1.5)
                module.eps = settings.get("layer_norm_eps", module.eps)
    reference.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **settings}))
    return folder, reference


@pytest.mark.parametrize(("key", "value"), [("hidden_act", "gelu"), ("num_attention_heads", 8),
                                            ("output_stride", 16), ("patch_size", 4)])
def test_settings_the_graph_cannot_build_are_refused(tmp_path: Path, key: str,
                                                     value: object) -> None:
    """Each loads (no weight changes shape) but computes another function: built silently,
    the logits differed from transformers' by 0.15 to 0.74."""
    folder, _ = _hf_folder(tmp_path / "hf", **{key: value})
    with pytest.raises(UserError, match=f"cannot: {key} = {value!r}"):
        create_mobilevit(CFG, folder)
    code, output = run("build", "--weights", str(folder), "--resolution", "64",
                       "--num-classes", "10", "--latency-runs", "0", "-o", str(tmp_path / "o"))
    assert_clean_failure(code, output, f"{key} = {value!r}")
    assert not (tmp_path / "o").exists()


def test_transformers_spellings_of_the_defaults_are_accepted(tmp_path: Path) -> None:
    folder, reference = _hf_folder(tmp_path / "hf", hidden_act="swish", output_stride=32)
    model, _ = create_mobilevit(CFG, folder)
    pixels = random_pixels(2, 64)
    np.testing.assert_allclose(ort_run(model, pixels), hf_logits(reference, pixels),
                               rtol=0, atol=1e-4)


def test_layer_norm_epsilon_is_taken_from_the_config(tmp_path: Path) -> None:
    folder, reference = _hf_folder(tmp_path / "hf", layer_norm_eps=1e-2)
    pixels = random_pixels(2, 64)
    expected = hf_logits(reference, pixels)
    model, _ = create_mobilevit(CFG, folder)
    np.testing.assert_allclose(ort_run(model, pixels), expected, rtol=0, atol=1e-4)
    alone = tmp_path / "alone.safetensors"  # the weights without their config.json
    alone.write_bytes((folder / "model.safetensors").read_bytes())
    default_eps, _ = create_mobilevit(CFG, alone)
    assert np.abs(ort_run(default_eps, pixels) - expected).max() > 1e-3  # epsilon matters


def test_a_checkpoint_of_another_model_type_is_named_as_such(tmp_path: Path) -> None:
    """A MobileViTV2 folder used to fail with 555 key differences and "does not look like a
    MobileViT checkpoint"."""
    folder, _ = _hf_folder(tmp_path / "hf", model_type="mobilevitv2")
    with pytest.raises(UserError, match="is a 'mobilevitv2' checkpoint .*model_type 'mobilevit'"):
        create_mobilevit(CFG, folder)


@pytest.mark.parametrize(("settings", "named"), [
    ({"conv_kernel_size": 5}, "conv_kernel_size = 5 (MobileViT-XXS has 3)"),
    ({"qkv_bias": False}, "qkv_bias = False (MobileViT-XXS has True)"),
    ({"hidden_sizes": [64, 80, 100]}, "hidden_sizes = [64, 80, 100] (MobileViT-XXS has "
                                      "[64, 80, 96])")])
def test_a_nonstandard_architecture_is_named_by_its_config(tmp_path: Path, settings: dict,
                                                           named: str) -> None:
    """Built with those settings, the weights mismatch; the error blamed "a modified model,
    or a damaged file" rather than the setting config.json states."""
    from transformers import MobileViTConfig as HFConfig
    from transformers import MobileViTForImageClassification

    from mvcompile.graphs.hf_config import HF_SIZE_ARGS

    config = HFConfig(num_labels=10, image_size=64, **{**HF_SIZE_ARGS["xxs"], **settings})
    MobileViTForImageClassification(config).save_pretrained(tmp_path / "hf")
    with pytest.raises(UserError, match="describes another network than MobileViT-XXS") as err:
        create_mobilevit(CFG, tmp_path / "hf")
    assert named in str(err.value)


def test_building_config_b_from_a_config_a_checkpoint_is_warned_of(tmp_path: Path,
                                                                    caplog) -> None:
    """Every weight keeps its shape under (8, 4, 2) patches, so the build used to go through
    without a word, 4% off transformers' logits."""
    folder, _ = _hf_folder(tmp_path / "hf")
    create_mobilevit(CFG, folder)
    assert "patch" not in caplog.text
    config_b = MobileViTConfig.for_size("xxs", resolution=64, num_classes=10, patch_config="B")
    create_mobilevit(config_b, folder)
    assert "2x2 patches (--patch-config A); building patch sizes (8, 4, 2)" in caplog.text


@pytest.mark.parametrize(("text", "message"), [("{not json", "Cannot read .*preprocessor"),
                                                ("[1, 2]", "is not a JSON object")])
def test_an_unreadable_preprocessor_config_is_named(tmp_path: Path, text: str,
                                                    message: str) -> None:
    """It used to be warned of as absent, and the colour order taken as RGB: wrong for a
    fine-tune of Apple's weights, which expect BGR."""
    folder, _ = _hf_folder(tmp_path / "hf")
    (folder / "preprocessor_config.json").write_text(text)
    with pytest.raises(UserError, match=message):
        create_mobilevit(CFG, folder)


def test_an_unreadable_config_is_named(tmp_path: Path) -> None:
    folder, _ = _hf_folder(tmp_path / "hf")
    (folder / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="Cannot read .*config.json"):
        create_mobilevit(CFG, folder)


def _scale_model(factor: float) -> ir.Model:
    """y = x · factor on x [N, 4] (random inputs in [0, 1): outputs up to ``factor``)."""
    text = f"""<ir_version: 10, opset_import: ["" : 24]>
        g (float[N,4] x) => (float[N,4] y) <float k = {{{factor!r}}}> {{ y = Mul(x, k) }}"""
    return ir.serde.deserialize_model(onnx.parser.parse_model(text))


def test_the_pass_check_allows_float32_rounding_of_large_logits() -> None:
    """Logits near 1000 that differ in the seventh digit (float32 rounding, as exact passes
    reorder it) pass; a difference in the fourth digit (a wrong rewrite) does not. The
    absolute 1e-4 refused the first with a traceback that blamed the passes."""
    assert pass_limit(np.array([0.5, -3.0])) == pytest.approx(3e-4)
    assert pass_limit(np.array([0.5])) == 1e-4
    diff = check_numerics(_scale_model(1000.0), _scale_model(1000.0 * (1 + 2e-7)))
    assert 1e-4 < diff < 1e-3
    with pytest.raises(UserError, match="a bug in the graph passes"):
        check_numerics(_scale_model(1000.0), _scale_model(1000.0 * (1 + 1e-3)))


def test_a_sharded_folder_loads_with_parity(tmp_path: Path) -> None:
    _, reference = _hf_folder(tmp_path / "one")
    reference.save_pretrained(tmp_path / "sharded", max_shard_size="1MB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "sharded").glob("model-*.safetensors"))) > 1
    model, _ = create_mobilevit(CFG, tmp_path / "sharded")
    pixels = random_pixels(2, 64)
    np.testing.assert_allclose(ort_run(model, pixels), hf_logits(reference, pixels),
                               rtol=0, atol=1e-4)
    next((tmp_path / "sharded").glob("model-*.safetensors")).unlink()
    with pytest.raises(UserError, match="sharded Hugging Face folder missing 1 of its"):
        create_mobilevit(CFG, tmp_path / "sharded")


def test_a_backbone_only_folder_is_named_as_such(tmp_path: Path) -> None:
    from transformers import MobileViTModel

    _, reference = _hf_folder(tmp_path / "hf")
    MobileViTModel.from_pretrained(tmp_path / "hf").save_pretrained(tmp_path / "backbone")
    with pytest.raises(UserError, match="transformers MobileViTModel, the backbone alone"):
        create_mobilevit(CFG, tmp_path / "backbone")


@pytest.mark.parametrize(("processor", "warned"), [
    ({"do_normalize": True, "image_mean": [0.5] * 3, "image_std": [0.5] * 3},
     "normalizes with mean [0.5, 0.5, 0.5] and std [0.5, 0.5, 0.5]"),
    ({"do_rescale": False}, "does not rescale"),
    ({"do_normalize": False, "image_mean": [0.5] * 3, "do_flip_channel_order": False}, None),
])
def test_other_preprocessing_is_warned_of(tmp_path: Path, caplog, processor: dict,
                                          warned: str | None) -> None:
    folder, _ = _hf_folder(tmp_path / "hf")
    (folder / "preprocessor_config.json").write_text(json.dumps(processor))
    create_mobilevit(CFG, folder)
    if warned is None:
        assert "preprocessor_config.json" not in caplog.text
    else:
        assert warned in caplog.text and "takes RGB pixels in [0, 1]" in caplog.text
