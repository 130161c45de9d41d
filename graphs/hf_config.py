"""Settings in a Hugging Face MobileViT ``config.json`` that change the network while every
weight keeps its shape.

The strict weight match (:class:`.checkpoints.CheckpointWeights`) already refuses settings
that change a tensor's shape (``conv_kernel_size``, ``expand_ratio``, ``mlp_ratio``,
``qkv_bias``, the hidden sizes). These it cannot see:

- ``hidden_act``: the activation of every conv and MLP; ours is SiLU (x·σ(x), also "swish");
- ``num_attention_heads``: the split of d into heads, softmax(QKᵀ/√(d/h))·V per head; ours, 4;
- ``output_stride``: 16 or 8 dilate the last stages instead of striding them; ours, 32;
- ``patch_size``: the h = w of every MobileViT block's unfold; ours, 2 (Config-A);
- ``layer_norm_eps``: ε in (x − μ)/√(σ² + ε); any value is built as given.

A checkpoint folder whose config sets one of the first four otherwise is refused, naming
each setting, since the built model would compute another function than the one it was
trained as. Checkpoint files outside a Hugging Face folder have no config.json; transformers'
defaults are the values above.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

from mvcompile.errors import UserError
from mvcompile.graphs.channel_order import preprocessor_config
from mvcompile.graphs.checkpoints import hf_folder

log = logging.getLogger(__name__)

# The values of each setting that mvcompile's graph computes (transformers' defaults).
BUILT_AS = {"hidden_act": ("silu", "swish"), "num_attention_heads": (4,),
            "output_stride": (32,), "patch_size": (2,)}
LAYER_NORM_EPS = "layer_norm_eps"


def hf_config(weights: str | Path) -> dict:
    """The config.json of the Hugging Face folder ``weights`` is in (or is), else {}."""
    folder = hf_folder(Path(weights))
    if folder is None or not (folder / "config.json").is_file():
        return {}
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"Cannot read {folder / 'config.json'} ({err}); it says how the "
                        "checkpoint's network is built. Fix or remove it.") from err
    if not isinstance(config, dict):
        raise UserError(f"{folder / 'config.json'} is not a JSON object of settings.")
    return config


# Our sizes as transformers.MobileViTConfig arguments (as in Apple's published HF checkpoints),
# and the architecture settings that are transformers' defaults at every size.
HF_SIZE_ARGS: dict[str, dict[str, Any]] = {
    "xxs": {"hidden_sizes": [64, 80, 96], "neck_hidden_sizes": [16, 16, 24, 48, 64, 80, 320],
            "expand_ratio": 2.0},
    "xs": {"hidden_sizes": [96, 120, 144], "neck_hidden_sizes": [16, 32, 48, 64, 80, 96, 384]},
    "s": {"hidden_sizes": [144, 192, 240], "neck_hidden_sizes": [16, 32, 64, 96, 128, 160, 640]},
}
HF_ARCHITECTURE_DEFAULTS: dict[str, Any] = {"num_channels": 3, "conv_kernel_size": 3,
                                            "expand_ratio": 4.0, "mlp_ratio": 2.0,
                                            "qkv_bias": True}

MODEL_TYPE = "mobilevit"  # transformers' model_type of MobileViT (v1), which mvcompile builds


def check_built_as_configured(weights: str | Path) -> float | None:
    """Refuse a checkpoint whose config.json is of another model type (MobileViTV2's
    ``mobilevitv2``, say) or sets what the graph cannot build (see the module docstring);
    return its ``layer_norm_eps`` (None if it sets none)."""
    config = hf_config(weights)
    model_type = config.get("model_type", MODEL_TYPE)
    if model_type != MODEL_TYPE:
        raise UserError(f"{weights} is a {model_type!r} checkpoint (config.json's model_type); "
                        f"mvcompile builds MobileViT, model_type {MODEL_TYPE!r}, only.")
    differ = [f"{key} = {config[key]!r} (mvcompile builds {' or '.join(map(repr, values))})"
              for key, values in BUILT_AS.items() if key in config and config[key] not in values]
    if differ:
        raise UserError(
            f"{weights}: its config.json builds a network that mvcompile cannot: "
            f"{'; '.join(differ)}. The weights would load (their shapes match) but the model "
            "would compute something else. Use a checkpoint trained with transformers' "
            "MobileViT defaults for these settings.")
    eps = config.get(LAYER_NORM_EPS)
    if eps is None:
        return None
    if not isinstance(eps, int | float) or isinstance(eps, bool) or not 0 < eps < math.inf:
        raise UserError(f"{weights}: config.json's layer_norm_eps {eps!r} is not a positive "
                        "number.")
    return float(eps)


def architecture_differences(config: dict, size: str) -> list[str]:
    """The settings in ``config`` (:func:`hf_config`) that describe another network than
    transformers' MobileViT-``size`` (a kernel size, hidden sizes, qkv_bias, ...), as
    "key = value (MobileViT-SIZE has expected)"; [] for an empty config."""
    expected = {**HF_ARCHITECTURE_DEFAULTS, **HF_SIZE_ARGS[size]}
    return [f"{key} = {config[key]!r} (MobileViT-{size.upper()} has {value!r})"
            for key, value in expected.items() if key in config and config[key] != value]


def patch_size_note(weights: str | Path, config: dict, patch_sizes: tuple[int, ...]
                    ) -> str | None:
    """Why building ``patch_sizes`` from the Hugging Face checkpoint ``weights`` (its
    config.json: ``config``, :func:`hf_config`) is not the network it was trained as
    (transformers' MobileViT unfolds every block in patches of config.json's one
    ``patch_size``, 2: Config-A), or None. Every weight keeps its shape under Config-B, so the
    weights load; the model computes another function."""
    if not config:
        return None
    trained = config.get("patch_size", BUILT_AS["patch_size"][0])
    if all(p == trained for p in patch_sizes):
        return None
    return (f"{weights}: its config.json unfolds every MobileViT block in {trained}x{trained} "
            f"patches (--patch-config A); building patch sizes {tuple(patch_sizes)} as asked, "
            "which is not the network these weights were trained as")


def other_preprocessing(weights: str | Path) -> str | None:
    """Why the checkpoint's preprocessor_config.json feeds its model other pixels than the
    built model takes (RGB in [0, 1], no mean/std: x/255), or None. A fine-tune saved with a
    generic image processor (``do_normalize`` with mean = std = 0.5, say) was trained on
    (x/255 − mean)/std; that is not folded into the stem conv, because the conv's zero padding
    would then pad with the mean instead of 0 (not exact at the borders)."""
    config = preprocessor_config(Path(weights)) or {}
    problems = []
    if config.get("do_normalize"):
        mean, std = config.get("image_mean", 0.0), config.get("image_std", 1.0)
        try:
            if not (np.allclose(mean, 0.0) and np.allclose(std, 1.0)):
                problems.append(f"normalizes with mean {mean} and std {std}")
        except (TypeError, ValueError):
            problems.append(f"normalizes with mean {mean!r} and std {std!r}")
    factor = config.get("rescale_factor", 1 / 255)
    if config.get("do_rescale") is False:
        problems.append("does not rescale the pixels to [0, 1]")
    elif not isinstance(factor, int | float) or not np.isclose(factor, 1 / 255):
        problems.append(f"rescales by {factor!r} rather than 1/255")
    if not problems:
        return None
    return (f"{weights}: its preprocessor_config.json {' and '.join(problems)}, but the built "
            "model takes RGB pixels in [0, 1] with no mean/std; it will not match the "
            "checkpoint's own pipeline unless its inputs are prepared that way")
