"""Hugging Face transformers' MobileViT as the independent reference, for tests and benchmarks.

Needs the ``[test]`` extra (torch + transformers); nothing in the compiler imports this module.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from mvcompile.graphs.hf_config import HF_SIZE_ARGS
from mvcompile.graphs.mobilevit import MobileViTConfig

if TYPE_CHECKING:
    import onnx
    import torch



def hf_model(cfg: MobileViTConfig, weights: dict[str, np.ndarray] | None = None
             ) -> torch.nn.Module:
    """transformers.MobileViTForImageClassification for ``cfg`` in eval mode.

    With ``weights`` (our initializer names = HF state-dict names) they are loaded strictly.
    Per-block patch sizes (Config-B) are set on each MobileViTLayer, which HF supports
    internally although its config has a single ``patch_size``.
    """
    import torch
    from transformers import MobileViTConfig as HFConfig
    from transformers import MobileViTForImageClassification

    hf_cfg = HFConfig(num_labels=cfg.num_classes, image_size=cfg.resolution,
                      patch_size=cfg.patch_sizes[0], **HF_SIZE_ARGS[cfg.size])
    model = MobileViTForImageClassification(hf_cfg).eval()
    for layer, patch in zip(model.mobilevit.encoder.layer[2:], cfg.patch_sizes, strict=True):
        layer.patch_height = layer.patch_width = patch
    if weights is not None:
        state = {k: torch.from_numpy(np.array(v)) for k, v in weights.items()}
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.endswith("num_batches_tracked")]
        if missing or unexpected:
            raise KeyError(f"HF load mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model


def hf_logits(model, pixels: np.ndarray) -> np.ndarray:
    """Logits of the HF model for a float32 NCHW batch."""
    import torch

    with torch.no_grad():
        return model(torch.from_numpy(pixels)).logits.numpy()


def export_peer(cfg: MobileViTConfig, weights: dict[str, np.ndarray] | None = None
                ) -> onnx.ModelProto:
    """What a user gets without us: HF MobileViT → torch.onnx.export (dynamo) → onnxsim.

    Returns an ``onnx.ModelProto`` with input ``pixel_values`` [1,3,R,R] and output ``logits``.
    """
    import torch

    from mvcompile.optimize import simplify

    model = hf_model(cfg, weights)
    pixels = torch.rand(1, 3, cfg.resolution, cfg.resolution)
    exported = torch.onnx.export(model, (pixels,), dynamo=True, input_names=["pixel_values"],
                                 output_names=["logits"])
    return simplify(exported.model_proto)
