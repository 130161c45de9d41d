"""MobileViT in PyTorch, mirroring :mod:`mvcompile.graphs.mobilevit` block for block.

Read it top to bottom, like nanoGPT's ``model.py``: one ``nn.Module`` per block, then the
network. The attribute names are chosen so that ``state_dict()`` keys are exactly the ONNX
graph's initializer names, which are the Hugging Face ``MobileViTForImageClassification``
names (``mobilevit.conv_stem.convolution.weight``, ``...normalization.running_mean``,
``classifier.weight``). BatchNorm running statistics are buffers, so a trained state dict,
saved as safetensors, loads into the ONNX graph with no renaming (the graph ignores
``num_batches_tracked``; :func:`export_state_dict` drops it).

Unlike the ONNX graph, which is built for one resolution, this module takes any resolution
the patch sizes divide (multiples of 64 for configs A and B), which multi-scale training needs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mvcompile.graphs.mobilevit import MobileViTConfig, _make_divisible


class ConvLayer(nn.Module):
    """y = act(BN(W * x)) with 'same' padding; [B,c_in,H,W] -> [B,c_out,H/s,W/s]."""

    def __init__(self, c_in: int, c_out: int, kernel: int, *, stride: int = 1, groups: int = 1,
                 norm: bool = True, act: bool = True, eps: float = 1e-5) -> None:
        super().__init__()
        self.convolution = nn.Conv2d(c_in, c_out, kernel, stride, (kernel - 1) // 2,
                                     groups=groups, bias=False)
        self.normalization = nn.BatchNorm2d(c_out, eps=eps) if norm else None
        self.act = act

    def forward(self, x: Tensor) -> Tensor:
        x = self.convolution(x)
        if self.normalization is not None:
            x = self.normalization(x)
        return F.silu(x) if self.act else x


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand → 3x3 depthwise (stride s) → 1x1 reduce, + x if shapes
    match. [B,c_in,H,W] -> [B,c_out,H/s,W/s]."""

    def __init__(self, c_in: int, c_out: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = _make_divisible(c_in * expansion)
        self.expand_1x1 = ConvLayer(c_in, hidden, 1)
        self.conv_3x3 = ConvLayer(hidden, hidden, 3, stride=stride, groups=hidden)
        self.reduce_1x1 = ConvLayer(hidden, c_out, 1, act=False)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: Tensor) -> Tensor:
        y = self.reduce_1x1(self.conv_3x3(self.expand_1x1(x)))
        return x + y if self.residual else y


class SelfAttention(nn.Module):
    """softmax(q·kᵀ/√d_h)·v with h heads, within each patch group; [G,N,d] -> [G,N,d]."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(d, d)
        self.key = nn.Linear(d, d)
        self.value = nn.Linear(d, d)

    def forward(self, x: Tensor) -> Tensor:
        g, n, d = x.shape

        def split(t: Tensor) -> Tensor:  # [G,N,d] -> [G,h,N,d/h]
            return t.view(g, n, self.heads, d // self.heads).transpose(1, 2)

        y = F.scaled_dot_product_attention(split(self.query(x)), split(self.key(x)),
                                           split(self.value(x)))
        return y.transpose(1, 2).reshape(g, n, d)


class Attention(nn.Module):
    """Attention then its output projection (HF names: ``attention.attention``,
    ``attention.output.dense``)."""

    def __init__(self, d: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.attention = SelfAttention(d, heads)
        self.output = nn.Module()
        self.output.dense = nn.Linear(d, d)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.output.dense(self.attention(x)))


class TransformerLayer(nn.Module):
    """Pre-norm layer: x += MHA(LN(x)); x += W₂·swish(W₁·LN(x)). [G,N,d] -> [G,N,d]."""

    def __init__(self, d: int, cfg: MobileViTConfig, dropout: float) -> None:
        super().__init__()
        self.layernorm_before = nn.LayerNorm(d, eps=cfg.ln_eps)
        self.attention = Attention(d, cfg.heads, dropout)
        self.layernorm_after = nn.LayerNorm(d, eps=cfg.ln_eps)
        self.intermediate = nn.Module()
        self.intermediate.dense = nn.Linear(d, cfg.ffn_ratio * d)
        self.output = nn.Module()
        self.output.dense = nn.Linear(cfg.ffn_ratio * d, d)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attention(self.layernorm_before(x))
        h = F.silu(self.intermediate.dense(self.layernorm_after(x)))
        return x + self.dropout(self.output.dense(h))


def unfold(x: Tensor, p: int) -> Tensor:
    """[B,C,H,W] -> [B·P,N,C]: P = p² positions within a patch, N = (H/p)·(W/p) patches.

    Token (i, j) of group (pi, pj) is pixel (i·p+pi, j·p+pj), as in the ONNX graph and HF.
    """
    b, c, h, w = x.shape
    x = x.reshape(b * c * (h // p), p, w // p, p).transpose(1, 2)  # [B·C·nh, nw, ph, pw]
    x = x.reshape(b, c, (h // p) * (w // p), p * p).transpose(1, 3)  # [B,P,N,C]
    return x.reshape(b * p * p, -1, c)


def fold(x: Tensor, p: int, b: int, h: int, w: int) -> Tensor:
    """Inverse of :func:`unfold`: [B·P,N,C] -> [B,C,H,W]."""
    c = x.shape[-1]
    x = x.reshape(b, p * p, (h // p) * (w // p), c).transpose(1, 3)  # [B,C,N,P]
    x = x.reshape(b * c * (h // p), w // p, p, p).transpose(1, 2)  # [B·C·nh, ph, nw, pw]
    return x.reshape(b, c, h, w)


class Transformer(nn.Module):
    """L transformer layers (HF name ``transformer.layer.{i}``)."""

    def __init__(self, d: int, depth: int, cfg: MobileViTConfig, dropout: float) -> None:
        super().__init__()
        self.layer = nn.ModuleList(TransformerLayer(d, cfg, dropout) for _ in range(depth))

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layer:
            x = layer(x)
        return x


class MobileViTLayer(nn.Module):
    """MV2 downsampling, then the MobileViT block: conv n×n → 1x1 (C→d) → unfold → L layers →
    LN → fold → 1x1 (d→C) → concat with the block input → conv n×n (2C→C).
    [B,c_in,H,W] -> [B,C,H/2,W/2]."""

    def __init__(self, c_in: int, c: int, d: int, depth: int, p: int, cfg: MobileViTConfig,
                 dropout: float) -> None:
        super().__init__()
        k = cfg.conv_kernel
        self.patch_size = p
        self.downsampling_layer = InvertedResidual(c_in, c, 2, cfg.expansion)
        self.conv_kxk = ConvLayer(c, c, k, eps=cfg.bn_eps)
        self.conv_1x1 = ConvLayer(c, d, 1, norm=False, act=False)
        self.transformer = Transformer(d, depth, cfg, dropout)
        self.layernorm = nn.LayerNorm(d, eps=cfg.ln_eps)
        self.conv_projection = ConvLayer(d, c, 1, eps=cfg.bn_eps)
        self.fusion = ConvLayer(2 * c, c, k, eps=cfg.bn_eps)

    def forward(self, x: Tensor) -> Tensor:
        x = self.downsampling_layer(x)
        b, _, h, w = x.shape
        y = self.conv_1x1(self.conv_kxk(x))  # [B,d,H,W]
        y = self.layernorm(self.transformer(unfold(y, self.patch_size)))  # [B·P,N,d]
        y = self.conv_projection(fold(y, self.patch_size, b, h, w))  # [B,C,H,W]
        return self.fusion(torch.cat([x, y], dim=1))


class MobileNetLayer(nn.Module):
    """A stack of MV2 blocks (HF name ``layer.{i}``)."""

    def __init__(self, blocks: list[InvertedResidual]) -> None:
        super().__init__()
        self.layer = nn.ModuleList(blocks)

    def forward(self, x: Tensor) -> Tensor:
        for block in self.layer:
            x = block(x)
        return x


class Encoder(nn.Module):
    """Stage 1 (MV2 ×1), stage 2 (MV2 ×3, stride 2), stages 3-5 (MobileViT layers)."""

    def __init__(self, cfg: MobileViTConfig, dropout: float) -> None:
        super().__init__()
        c, e = cfg.channels, cfg.expansion
        stage2 = [InvertedResidual(c[1] if i == 0 else c[2], c[2], 2 if i == 0 else 1, e)
                  for i in range(3)]
        self.layer = nn.ModuleList([
            MobileNetLayer([InvertedResidual(c[0], c[1], 1, e)]),
            MobileNetLayer(stage2),
            *(MobileViTLayer(c[i + 2], c[i + 3], cfg.dims[i], cfg.depths[i], cfg.patch_sizes[i],
                             cfg, dropout) for i in range(3)),
        ])

    def forward(self, x: Tensor) -> Tensor:
        for stage in self.layer:
            x = stage(x)
        return x


class Backbone(nn.Module):
    """Stem → encoder → 1x1 expansion; [B,3,R,R] -> [B,last,R/32,R/32]."""

    def __init__(self, cfg: MobileViTConfig, dropout: float) -> None:
        super().__init__()
        c = cfg.channels
        self.conv_stem = ConvLayer(3, c[0], 3, stride=2, eps=cfg.bn_eps)
        self.encoder = Encoder(cfg, dropout)
        self.conv_1x1_exp = ConvLayer(c[5], c[6], 1, eps=cfg.bn_eps)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv_1x1_exp(self.encoder(self.conv_stem(x)))


class MobileViT(nn.Module):
    """The classifier: backbone → global average pool → dropout → linear.

    ``dropout`` applies after attention and the FFN (HF ``hidden_dropout_prob``);
    ``classifier_dropout`` before the classifier. Both are identity in eval mode.
    """

    def __init__(self, cfg: MobileViTConfig, dropout: float = 0.0,
                 classifier_dropout: float = 0.1) -> None:
        super().__init__()
        self.config = cfg
        self.mobilevit = Backbone(cfg, dropout)
        self.dropout = nn.Dropout(classifier_dropout)
        self.classifier = nn.Linear(cfg.channels[6], cfg.num_classes)
        self.apply(_init_weights)

    def forward(self, pixel_values: Tensor) -> Tensor:
        """pixel_values [B,3,R,R] in [0,1] RGB -> logits [B,num_classes]."""
        features = self.mobilevit(pixel_values).mean(dim=(2, 3))  # [B,last]
        return self.classifier(self.dropout(features))


def _init_weights(module: nn.Module) -> None:
    """ml-cvnets init: convs Kaiming-normal (fan_out), linears N(0, 0.02²), zero biases."""
    if isinstance(module, nn.Conv2d):
        nn.init.kaiming_normal_(module.weight, mode="fan_out")
    elif isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        nn.init.zeros_(module.bias)


def export_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Contiguous float32 CPU copies of every parameter and buffer the ONNX graph reads."""
    return {name: t.detach().to("cpu", torch.float32).contiguous()
            for name, t in model.state_dict().items()
            if not name.endswith("num_batches_tracked")}


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())

