"""Importing Hugging Face and ml-cvnets checkpoints, strictly."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from safetensors.numpy import save_file

torch = pytest.importorskip("torch")

from conftest import assert_clean_failure, build_random, ort_run, random_pixels, run
from mvcompile.errors import UserError
from mvcompile.graphs.checkpoints import CLASS_NAMES_KEY, checkpoint_class_names
from mvcompile.graphs.cvnets_names import cvnets_key
from mvcompile.graphs.factory import create_mobilevit, parameter_shapes
from mvcompile.graphs.mobilevit import MobileViTConfig
from mvcompile.reference import hf_logits, hf_model

CFG = MobileViTConfig.for_size("xxs", resolution=64)

# Keys as they appear in Apple's published ml-cvnets mobilevit_xxs.pt (written out by hand, so
# that the name mapping is checked against the real checkpoint layout, not against itself).
REAL_CVNETS_KEYS = [
    "conv_1.block.conv.weight",
    "conv_1.block.norm.running_var",
    "layer_1.0.block.exp_1x1.block.conv.weight",
    "layer_1.0.block.conv_3x3.block.norm.weight",
    "layer_1.0.block.red_1x1.block.conv.weight",
    "layer_2.2.block.exp_1x1.block.norm.bias",
    "layer_3.0.block.exp_1x1.block.conv.weight",
    "layer_3.1.local_rep.conv_3x3.block.conv.weight",
    "layer_3.1.local_rep.conv_1x1.block.conv.weight",
    "layer_3.1.global_rep.0.pre_norm_mha.0.weight",
    "layer_3.1.global_rep.0.pre_norm_mha.1.qkv_proj.weight",
    "layer_3.1.global_rep.1.pre_norm_mha.1.out_proj.bias",
    "layer_3.1.global_rep.1.pre_norm_ffn.0.bias",
    "layer_3.1.global_rep.1.pre_norm_ffn.1.weight",
    "layer_3.1.global_rep.1.pre_norm_ffn.4.weight",
    "layer_3.1.global_rep.2.weight",
    "layer_4.1.global_rep.4.bias",
    "layer_5.1.global_rep.3.weight",
    "layer_5.1.conv_proj.block.conv.weight",
    "layer_5.1.fusion.block.norm.running_mean",
    "conv_1x1_exp.block.conv.weight",
    "classifier.fc.weight",
    "classifier.fc.bias",
]


class Payload:
    """A non-tensor object: torch.load(weights_only=True) must refuse to unpickle it."""


def _cvnets_state(weights: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Pack our weights the ml-cvnets way: renamed, with q, k, v stacked into qkv_proj."""
    state: dict[str, list] = {}
    for name, value in weights.items():
        key, chunk = cvnets_key(name)
        state.setdefault(key, [None, None, None] if chunk is not None else [value])
        if chunk is not None:
            state[key][chunk] = value
    return {k: torch.from_numpy(np.concatenate(v)) for k, v in state.items()}


def test_cvnets_mapping_produces_the_real_checkpoint_keys() -> None:
    produced = {cvnets_key(n)[0] for n in parameter_shapes(CFG)}
    assert set(REAL_CVNETS_KEYS) <= produced
    # q, k and v share one tensor; everything else maps one to one.
    assert len(produced) == len(parameter_shapes(CFG)) - 2 * (2 + 4 + 3) * 2


def test_hf_safetensors_folder_and_bin_load_with_parity(tmp_path: Path) -> None:
    _, weights = build_random(CFG, seed=21)
    reference = hf_model(CFG, weights)
    reference.save_pretrained(tmp_path / "hf")  # writes model.safetensors + config.json
    torch.save(reference.state_dict(), tmp_path / "pytorch_model.bin")
    pixels = random_pixels(2, 64)
    expected = hf_logits(reference, pixels)
    # A safetensors file under a PyTorch suffix was "truncated or corrupt" as a pickle.
    renamed = tmp_path / "renamed.bin"
    renamed.write_bytes((tmp_path / "hf" / "model.safetensors").read_bytes())
    for path in (tmp_path / "hf", tmp_path / "hf" / "model.safetensors",
                 tmp_path / "pytorch_model.bin", renamed):
        model, info = create_mobilevit(CFG, path)
        assert info.kind == "checkpoint"
        np.testing.assert_allclose(ort_run(model, pixels), expected, rtol=0, atol=1e-4)


def test_cvnets_checkpoint_loads_with_parity(tmp_path: Path) -> None:
    _, weights = build_random(CFG, seed=22)
    state = _cvnets_state(weights)
    state["conv_1.block.norm.num_batches_tracked"] = torch.tensor(5)
    torch.save(state, tmp_path / "mobilevit_xxs.pt")
    pixels = random_pixels(1, 64)
    reference = hf_model(CFG, weights)
    # ml-cvnets weights expect BGR; the model takes RGB, the flip folded into the stem conv
    model, info = create_mobilevit(CFG, tmp_path / "mobilevit_xxs.pt")
    assert info.trained_on == "bgr" and "trained on BGR" in info.description
    bgr = np.ascontiguousarray(pixels[:, ::-1])
    np.testing.assert_allclose(ort_run(model, pixels), hf_logits(reference, bgr), rtol=0,
                               atol=1e-4)
    model, info = create_mobilevit(CFG, tmp_path / "mobilevit_xxs.pt", channel_order="rgb")
    assert info.trained_on == "rgb"
    np.testing.assert_allclose(ort_run(model, pixels), hf_logits(reference, pixels),
                               rtol=0, atol=1e-4)


@pytest.mark.parametrize(("config", "trained_on"), [
    ({"image_processor_type": "MobileViTImageProcessor", "do_flip_channel_order": True}, "bgr"),
    ({"image_processor_type": "MobileViTImageProcessor"}, "bgr"),  # the processor's default
    ({"image_processor_type": "MobileViTImageProcessor", "do_flip_channel_order": False}, "rgb"),
    (None, "rgb"),
])
def test_a_hf_folder_whose_preprocessor_flips_channels_gives_an_rgb_model(
        tmp_path: Path, config: dict | None, trained_on: str) -> None:
    """Apple's Hugging Face checkpoints flip RGB to BGR in their preprocessor config; the
    built model (which takes RGB like every mvcompile model) matches transformers' pipeline:
    the model on the flipped pixels."""
    _, weights = build_random(CFG, seed=23)
    reference = hf_model(CFG, weights)
    reference.save_pretrained(tmp_path / "hf")
    if config is not None:
        (tmp_path / "hf" / "preprocessor_config.json").write_text(json.dumps(config))
    model, info = create_mobilevit(CFG, tmp_path / "hf")
    assert info.trained_on == trained_on
    pixels = random_pixels(2, 64)
    seen = np.ascontiguousarray(pixels[:, ::-1]) if trained_on == "bgr" else pixels
    np.testing.assert_allclose(ort_run(model, pixels), hf_logits(reference, seen),
                               rtol=0, atol=1e-4)


def test_checkpoint_of_another_size_lists_mismatches_and_suggests_size(tmp_path: Path) -> None:
    _, xs_weights = build_random(MobileViTConfig.for_size("xs", resolution=64))
    save_file(xs_weights, str(tmp_path / "xs.safetensors"))
    with pytest.raises(UserError) as err:
        create_mobilevit(CFG, tmp_path / "xs.safetensors")
    message = str(err.value)
    assert "shape mismatches" in message
    assert "shape mismatch: mobilevit.conv_stem" not in message  # the stem is the same
    assert "checkpoint [64, 16, 1, 1] vs model [32, 16, 1, 1]" in message
    assert "try --size xs --num-classes 1000" in message


def test_missing_and_unexpected_keys_are_listed(tmp_path: Path) -> None:
    _, weights = build_random(CFG)
    del weights["classifier.bias"]
    weights["extra.head.weight"] = np.zeros(3, np.float32)
    save_file(weights, str(tmp_path / "w.safetensors"))
    with pytest.raises(UserError) as err:
        create_mobilevit(CFG, tmp_path / "w.safetensors")
    assert "1 missing keys, 1 unexpected keys, 0 shape mismatches" in str(err.value)
    assert "missing: classifier.bias" in str(err.value)
    assert "unexpected: extra.head.weight" in str(err.value)


def test_a_checkpoint_of_the_asked_size_with_bad_shapes_suggests_nothing(tmp_path: Path
                                                                        ) -> None:
    """The hint used to suggest --size xxs --num-classes 1000, the very flags in use."""
    _, weights = build_random(CFG, seed=24)
    weights["classifier.weight"] = weights["classifier.weight"][:, :100].copy()
    save_file(weights, str(tmp_path / "cut.safetensors"))
    with pytest.raises(UserError, match="as asked: the mismatches are in the tensors") as err:
        create_mobilevit(CFG, tmp_path / "cut.safetensors")
    assert "try --size" not in str(err.value)


def test_wrong_class_count_suggests_num_classes(tmp_path: Path) -> None:
    _, weights = build_random(MobileViTConfig.for_size("xxs", resolution=64, num_classes=10))
    save_file(weights, str(tmp_path / "w.safetensors"))
    with pytest.raises(UserError, match="try --size xxs --num-classes 10"):
        create_mobilevit(CFG, tmp_path / "w.safetensors")


def test_not_a_mobilevit_checkpoint(tmp_path: Path) -> None:
    save_file({"encoder.block.0.weight": np.ones((4, 4), np.float32)},
              str(tmp_path / "bert.safetensors"))
    with pytest.raises(UserError, match="does not look like a MobileViT checkpoint"):
        create_mobilevit(CFG, tmp_path / "bert.safetensors")


@pytest.mark.parametrize("name", ["model.safetensors", "model.pt"])
def test_corrupt_or_missing_files(tmp_path: Path, name: str) -> None:
    with pytest.raises(UserError, match="not found"):
        create_mobilevit(CFG, tmp_path / name)
    (tmp_path / name).write_bytes(b"\x00garbage" * 10)
    with pytest.raises(UserError, match="Cannot read"):
        create_mobilevit(CFG, tmp_path / name)


def test_empty_pickle_is_a_clean_error(tmp_path: Path) -> None:
    (tmp_path / "empty.pt").write_bytes(b"")  # torch.load raises with an empty message
    with pytest.raises(UserError, match="Cannot read .*empty.pt"):
        create_mobilevit(CFG, tmp_path / "empty.pt")


def test_non_finite_weights_are_refused_before_building(tmp_path: Path) -> None:
    _, weights = build_random(CFG, seed=1)
    name = next(iter(weights))
    weights[name] = np.full_like(weights[name], np.nan)
    save_file(weights, str(tmp_path / "nan.safetensors"))
    with pytest.raises(UserError, match=f"NaN or infinite values in 1 tensor.*{name}"):
        create_mobilevit(CFG, tmp_path / "nan.safetensors")


def test_pickles_with_arbitrary_objects_are_refused(tmp_path: Path) -> None:
    torch.save({"model": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(UserError, match="holds Python objects other than tensors") as err:
        create_mobilevit(CFG, tmp_path / "evil.pt")
    assert "weights_only=False" not in str(err.value)  # torch's unsafe advice is not passed on


def test_hf_labels_reach_the_models_metadata_and_placeholders_do_not(tmp_path: Path) -> None:
    _, weights = build_random(CFG, seed=23)
    reference = hf_model(CFG, weights)
    reference.save_pretrained(tmp_path / "default")  # id2label LABEL_0 ... LABEL_999
    reference.config.id2label = {i: f"class {i}, kind {i % 7}" for i in range(1000)}
    reference.config.label2id = {v: k for k, v in reference.config.id2label.items()}
    reference.save_pretrained(tmp_path / "named")
    model, _ = create_mobilevit(CFG, tmp_path / "named")
    assert json.loads(model.metadata_props[CLASS_NAMES_KEY])[:2] == ["class 0, kind 0",
                                                                    "class 1, kind 1"]
    model, _ = create_mobilevit(CFG, tmp_path / "default")
    assert CLASS_NAMES_KEY not in model.metadata_props


def test_train_writes_class_names_that_build_reads_back(tmp_path: Path) -> None:
    from mvcompile.train.loop import _metadata

    classes = ["cat, domestic", "dog", "émeu"]
    run = SimpleNamespace(cfg=MobileViTConfig.for_size("xxs", num_classes=3),
                          options=SimpleNamespace(patch_config="A"),
                          data=SimpleNamespace(train=SimpleNamespace(classes=classes)))
    save_file({"w": np.zeros(1, np.float32)}, str(tmp_path / "best.safetensors"),
              metadata=_metadata(run))
    assert checkpoint_class_names(tmp_path / "best.safetensors") == classes


def test_negative_batchnorm_variances_are_named(tmp_path: Path) -> None:
    """sqrt(var + ε) of a negative variance is NaN: the checkpoint is refused, not built
    into a model that answers NaN."""
    _, weights = build_random(CFG, seed=1)
    name = next(k for k in weights if k.endswith("running_var"))
    weights[name] = -np.ones_like(weights[name])
    save_file(weights, str(tmp_path / "negvar.safetensors"))
    with pytest.raises(UserError, match=f"(?s)may be damaged.*{name}: .* negative variances"):
        create_mobilevit(CFG, tmp_path / "negvar.safetensors")


def test_only_unexpected_keys_say_to_remove_them_not_to_change_size(tmp_path: Path) -> None:
    _, weights = build_random(CFG)
    weights["extra.head.weight"] = np.zeros(3, np.float32)
    save_file(weights, str(tmp_path / "extra.safetensors"))
    with pytest.raises(UserError, match="Only unexpected keys: remove them") as err:
        create_mobilevit(CFG, tmp_path / "extra.safetensors")
    assert "try --size" not in str(err.value)


def test_weights_that_overflow_are_an_error_before_anything_is_written(tmp_path: Path) -> None:
    """BatchNorm variances of 0 scale by 1/√ε ≈ 316 per layer: the activations overflow to
    Inf and NaN; build says so instead of writing a model that answers NaN."""
    _, weights = build_random(CFG, seed=1)
    for name in [k for k in weights if k.endswith("running_var")]:
        weights[name] = np.zeros_like(weights[name])
    for name in [k for k in weights if k.endswith("normalization.weight")]:
        weights[name] = np.full_like(weights[name], 1e4)
    save_file(weights, str(tmp_path / "zerovar.safetensors"))
    for flags in ((), ("--no-passes",)):
        code, output = run("build", "--resolution", "64", "--latency-runs", "0", "--weights",
                           str(tmp_path / "zerovar.safetensors"), "-o", str(tmp_path / "out"),
                           *flags)
        assert_clean_failure(code, output, "outputs NaN or Inf", "running_var")
        assert not (tmp_path / "out").exists()
