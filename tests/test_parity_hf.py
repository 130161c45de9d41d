"""Our ONNX graph in ONNX Runtime vs transformers' MobileViT with the same weights."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("transformers")

from conftest import build_random, ort_run, random_pixels
from mvcompile.graphs.mobilevit import MobileViTConfig
from mvcompile.reference import hf_logits, hf_model

TOLERANCE = 1e-4


@pytest.mark.parametrize("size", ["xxs", "xs", "s"])
@pytest.mark.parametrize("resolution", [256, 128])
def test_logits_match_transformers(size: str, resolution: int) -> None:
    cfg = MobileViTConfig.for_size(size, resolution=resolution)
    model, weights = build_random(cfg, seed=11)
    reference = hf_model(cfg, weights)
    for batch in (1, 4):
        pixels = random_pixels(batch, resolution, seed=batch)
        expected = hf_logits(reference, pixels)
        assert expected.std() > 0.3, "weights too trivial: logits collapse towards zero"
        np.testing.assert_allclose(ort_run(model, pixels), expected, rtol=0, atol=TOLERANCE)


def test_patch_config_b_matches_transformers_with_per_block_patches() -> None:
    cfg = MobileViTConfig.for_size("xxs", resolution=128, patch_config="B")
    model, weights = build_random(cfg, seed=5)
    pixels = random_pixels(2, 128)
    expected = hf_logits(hf_model(cfg, weights), pixels)
    np.testing.assert_allclose(ort_run(model, pixels), expected, rtol=0, atol=TOLERANCE)
