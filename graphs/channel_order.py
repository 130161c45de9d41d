"""The colour channel order a checkpoint was trained on, and folding BGR into the stem.

Every model mvcompile builds takes RGB pixels in [0, 1]. Apple's MobileViT checkpoints were
trained on BGR images (ml-cvnets read them with OpenCV), which is why transformers'
``MobileViTImageProcessor`` flips RGB to BGR by default (``do_flip_channel_order``) and the
published Hugging Face folders keep that in their ``preprocessor_config.json``. For such
weights the flip is folded into the first convolution, exactly:

    conv(x_bgr, W) = conv(x_rgb, W'),   W'[o, c] = W[o, 2 − c]

(the stem conv has no bias; its BatchNorm comes after it).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from mvcompile.errors import UserError
from mvcompile.graphs.checkpoints import hf_folder
from mvcompile.graphs.cvnets_names import looks_like_cvnets

log = logging.getLogger(__name__)

STEM_WEIGHT = "mobilevit.conv_stem.convolution.weight"
PREPROCESSOR_CONFIG = "preprocessor_config.json"
CHOICES = ("auto", "rgb", "bgr")


def trained_channel_order(path: str | Path, state: Mapping[str, np.ndarray]
                          ) -> tuple[str, str]:
    """("rgb" or "bgr", why) for the checkpoint at ``path`` whose raw tensors are ``state``:
    a Hugging Face folder's preprocessor_config.json decides (``do_flip_channel_order``,
    default true for MobileViT's image processor); else ml-cvnets tensor names mean BGR;
    else RGB (mvcompile train runs and other files)."""
    path = Path(path)
    config = preprocessor_config(path)
    if config is None and hf_folder(path) is not None and (hf_folder(path) / "config.json"
                                                            ).is_file():
        log.warning("%s has no %s to say which colour order its weights expect; taking RGB. "
                    "Weights fine-tuned from Apple's expect BGR: pass --checkpoint-channels "
                    "bgr then.", path, PREPROCESSOR_CONFIG)
    if config is not None:
        kind = str(config.get("image_processor_type") or config.get("feature_extractor_type")
                   or "")
        if config.get("do_flip_channel_order", kind.startswith("MobileViT")):
            return "bgr", f"its {PREPROCESSOR_CONFIG} flips RGB to BGR"
        return "rgb", f"its {PREPROCESSOR_CONFIG} keeps RGB"
    if looks_like_cvnets(list(state)):
        return "bgr", "an ml-cvnets checkpoint (trained on BGR images)"
    return "rgb", "no preprocessor_config.json says otherwise"


def stem_to_rgb(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``state`` (our tensor names) with the stem conv's input channels reversed, so that the
    model takes RGB where the weights expect BGR."""
    flipped = dict(state)
    if STEM_WEIGHT in flipped:
        flipped[STEM_WEIGHT] = np.ascontiguousarray(flipped[STEM_WEIGHT][:, ::-1])
    return flipped


def check_choice(channel_order: str) -> None:
    """UserError unless ``channel_order`` is one of :data:`CHOICES`."""
    if channel_order not in CHOICES:
        raise UserError(f"--checkpoint-channels must be one of {', '.join(CHOICES)}, got "
                        f"{channel_order!r}.")


def preprocessor_config(path: Path) -> dict | None:
    """The preprocessor_config.json beside a Hugging Face checkpoint, or None; UserError if it
    cannot be read or is not a JSON object (taking RGB instead would be wrong for a
    fine-tune of Apple's BGR weights)."""
    folder = hf_folder(path)
    config = folder / PREPROCESSOR_CONFIG if folder is not None else None
    if config is None or not config.is_file():
        return None
    try:
        data = json.loads(config.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"Cannot read {config} ({err}); it says which colour order and pixel "
                        "scale the checkpoint expects. Fix or remove it.") from err
    if not isinstance(data, dict):
        raise UserError(f"{config} is not a JSON object of settings; it says which colour order "
                        "the checkpoint expects. Fix or remove it.")
    return data
