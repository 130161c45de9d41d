"""The authored graph reproduces the paper's architecture figures and is valid ONNX."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import build_random, ort_run, random_pixels
from mvcompile import analysis, onnx_io
from mvcompile.errors import UserError
from mvcompile.graphs.factory import parameter_shapes
from mvcompile.graphs.mobilevit import MobileViTConfig, valid_resolutions

# DESIGN.md: parameters with 1000 classes and MACs at 256x256.
PAPER = {"xxs": (1_272_024, 0.41e9), "xs": (2_317_848, 1.03e9), "s": (5_578_632, 2.00e9)}


@pytest.mark.parametrize("size", ["xxs", "xs", "s"])
def test_parameters_and_macs_match_the_paper(size: str) -> None:
    model, _ = build_random(MobileViTConfig.for_size(size))
    proto = onnx_io.to_proto(model)
    params, macs = PAPER[size]
    assert analysis.count_parameters(proto) == params
    counted_macs, unknown = analysis.count_macs(proto)
    assert unknown == []
    assert abs(counted_macs - macs) / macs < 0.02
    trainable = sum(int(np.prod(s)) for n, s in parameter_shapes(MobileViTConfig.for_size(size))
                    .items() if not n.endswith(("running_mean", "running_var")))
    assert trainable == params


@pytest.mark.parametrize("size", ["xxs", "xs", "s"])
def test_graph_passes_full_check_and_runs_in_ort(size: str) -> None:
    model, _ = build_random(MobileViTConfig.for_size(size, resolution=64))
    onnx_io.validate(onnx_io.to_proto(model))  # check_model(full_check=True) + ORT load
    logits = ort_run(model, random_pixels(2, 64))
    assert logits.shape == (2, 1000)
    assert np.isfinite(logits).all()


def test_batch_is_dynamic_and_rows_are_independent(xxs64: MobileViTConfig) -> None:
    model, _ = build_random(xxs64)
    pixels = random_pixels(3, 64)
    batched = ort_run(model, pixels)
    single = ort_run(model, pixels[1:2])
    np.testing.assert_allclose(batched[1:2], single, atol=1e-5)
    proto = onnx_io.to_proto(model)
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"


def test_num_classes_and_patch_config_b() -> None:
    cfg = MobileViTConfig.for_size("xxs", resolution=128, patch_config="B", num_classes=7)
    assert cfg.patch_sizes == (8, 4, 2)
    model, _ = build_random(cfg)
    assert ort_run(model, random_pixels(1, 128)).shape == (1, 7)


@pytest.mark.parametrize("resolution", [100, 96, 224, 0])
def test_resolution_that_does_not_divide_names_valid_sizes(resolution: int) -> None:
    with pytest.raises(UserError) as err:
        MobileViTConfig.for_size("xxs", resolution=resolution)
    message = str(err.value)
    assert f"Resolution {resolution}" in message
    assert "positive multiple of 64 (64, 128, 192, 256, ...)" in message
    nearest = message.split("Nearest: ")[1]
    assert nearest == {100: "64 or 128.", 96: "64 or 128.", 224: "192 or 256.", 0: "64."}[
        resolution]


def test_valid_resolutions_are_multiples_of_the_patch_grid() -> None:
    assert valid_resolutions((2, 2, 2), up_to=320) == [64, 128, 192, 256, 320]
    assert valid_resolutions((8, 4, 2), up_to=256) == [64, 128, 192, 256]
    for size in valid_resolutions((8, 4, 2)):
        MobileViTConfig.for_size("xs", resolution=size, patch_config="B")


def test_unknown_size_and_bad_class_count_are_refused() -> None:
    with pytest.raises(UserError, match="Unknown MobileViT size 'm'"):
        MobileViTConfig.for_size("m")
    with pytest.raises(UserError, match="num-classes"):
        MobileViTConfig.for_size("xxs", num_classes=0)


def test_random_weights_are_non_trivial_and_seeded() -> None:
    cfg = MobileViTConfig.for_size("xxs", resolution=64)
    _, weights = build_random(cfg, seed=3)
    _, again = build_random(cfg, seed=3)
    _, other = build_random(cfg, seed=4)
    name = "mobilevit.conv_stem.convolution.weight"
    np.testing.assert_array_equal(weights[name], again[name])
    assert not np.array_equal(weights[name], other[name])
    means = np.concatenate([v for k, v in weights.items() if k.endswith("running_mean")])
    variances = np.concatenate([v for k, v in weights.items() if k.endswith("running_var")])
    assert means.std() > 0.1 and np.abs(means).max() > 0.3
    assert variances.min() > 0.4 and variances.std() > 0.2 and not np.allclose(variances, 1)
    biases = np.concatenate([v for k, v in weights.items() if k.endswith(".bias")])
    assert np.abs(biases).mean() > 0.01
