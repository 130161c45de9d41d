"""Parameter-name mapping from our (Hugging Face) names to Apple ml-cvnets checkpoint keys.

Our initializers carry the HF names. ml-cvnets (``mobilevit_xxs.pt`` and friends) names the same
tensors by its own module tree, and stores q, k and v as one ``qkv_proj`` tensor of shape
[3d, d] (rows ordered q, k, v). The rules below, applied in order, turn an HF name into the
cvnets key; :func:`cvnets_key` also returns which third of ``qkv_proj`` holds it.

Mapping (HF / mvcompile  ->  ml-cvnets), ``i`` the stage, ``j`` the layer:

- mobilevit.conv_stem  ->  conv_1
- mobilevit.encoder.layer.{0,1}.layer.j  ->  layer_{1,2}.j.block
- mobilevit.encoder.layer.i.downsampling_layer  ->  layer_{i+1}.0.block
- ...expand_1x1 / reduce_1x1  ->  ...exp_1x1 / red_1x1
- mobilevit.encoder.layer.i.conv_kxk / conv_1x1  ->  layer_{i+1}.1.local_rep.conv_3x3 / conv_1x1
- ...transformer.layer.j  ->  ...global_rep.j
- ...layernorm_before / layernorm_after  ->  ...pre_norm_mha.0 / pre_norm_ffn.0
- ...attention.attention.{query,key,value}  ->  ...pre_norm_mha.1.qkv_proj (rows q | k | v)
- ...attention.output.dense  ->  ...pre_norm_mha.1.out_proj
- ...intermediate.dense / output.dense  ->  ...pre_norm_ffn.1 / pre_norm_ffn.4
- mobilevit.encoder.layer.i.layernorm  ->  layer_{i+1}.1.global_rep.L (L = the stage's depth)
- mobilevit.encoder.layer.i.conv_projection / fusion  ->  layer_{i+1}.1.conv_proj / fusion
- mobilevit.conv_1x1_exp  ->  conv_1x1_exp
- *.convolution / *.normalization  ->  *.block.conv / *.block.norm
- classifier  ->  classifier.fc
"""

from __future__ import annotations

import re
from collections.abc import Callable

_QKV_CHUNK = {"query": 0, "key": 1, "value": 2}


def _stage(i: str) -> str:
    return f"layer_{int(i) + 1}"


def _rules(depths: tuple[int, ...]) -> list[tuple[str, str | Callable[[re.Match], str]]]:
    return [
        (r"^classifier\.", "classifier.fc."),
        (r"^mobilevit\.", ""),
        (r"^conv_stem\.", "conv_1."),
        # MV2-only stages 1-2: encoder.layer.0.layer.j. -> layer_1.j.block.
        (r"^encoder\.layer\.([01])\.layer\.(\d+)\.", lambda m: f"{_stage(m[1])}.{m[2]}.block."),
        # MobileViT stages 3-5 are Sequential(MV2 downsample, MobileViT block).
        (r"^encoder\.layer\.(\d)\.downsampling_layer\.", lambda m: f"{_stage(m[1])}.0.block."),
        (r"^encoder\.layer\.(\d)\.conv_kxk\.", lambda m: f"{_stage(m[1])}.1.local_rep.conv_3x3."),
        (r"^encoder\.layer\.(\d)\.conv_1x1\.", lambda m: f"{_stage(m[1])}.1.local_rep.conv_1x1."),
        (r"^encoder\.layer\.(\d)\.transformer\.layer\.(\d+)\.",
         lambda m: f"{_stage(m[1])}.1.global_rep.{m[2]}."),
        (r"^encoder\.layer\.(\d)\.layernorm\.",
         lambda m: f"{_stage(m[1])}.1.global_rep.{depths[int(m[1]) - 2]}."),
        (r"^encoder\.layer\.(\d)\.conv_projection\.", lambda m: f"{_stage(m[1])}.1.conv_proj."),
        (r"^encoder\.layer\.(\d)\.fusion\.", lambda m: f"{_stage(m[1])}.1.fusion."),
        (r"\.expand_1x1\.", ".exp_1x1."),
        (r"\.reduce_1x1\.", ".red_1x1."),
        (r"\.layernorm_before\.", ".pre_norm_mha.0."),
        (r"\.attention\.attention\.(query|key|value)\.", ".pre_norm_mha.1.qkv_proj."),
        (r"\.attention\.output\.dense\.", ".pre_norm_mha.1.out_proj."),
        (r"\.layernorm_after\.", ".pre_norm_ffn.0."),
        (r"\.intermediate\.dense\.", ".pre_norm_ffn.1."),
        (r"\.output\.dense\.", ".pre_norm_ffn.4."),
        (r"\.convolution\.", ".block.conv."),
        (r"\.normalization\.", ".block.norm."),
    ]


def cvnets_key(name: str, depths: tuple[int, ...] = (2, 4, 3)) -> tuple[str, int | None]:
    """(ml-cvnets key, qkv chunk index or None) for one of our parameter names."""
    chunk_match = re.search(r"\.attention\.attention\.(query|key|value)\.", name)
    chunk = _QKV_CHUNK[chunk_match[1]] if chunk_match else None
    for pattern, replacement in _rules(depths):
        name = re.sub(pattern, replacement, name, count=1)
    return name, chunk


def looks_like_cvnets(keys: list[str]) -> bool:
    """True if the state dict uses ml-cvnets module names."""
    return any(k.startswith(("conv_1.block.", "layer_1.")) for k in keys)
