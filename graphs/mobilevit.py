"""MobileViT (Mehta & Rastegari, ICLR 2022) authored directly as an ONNX graph.

Read it top to bottom: the config, then one function per block, then the network.

Every weight is a named initializer. Names and layouts are exactly those of the Hugging Face
``MobileViTForImageClassification`` state dict (``mobilevit.conv_stem.convolution.weight``,
..., ``classifier.weight``), so an HF checkpoint loads with no renaming. ml-cvnets checkpoints
are renamed by :mod:`mvcompile.graphs.cvnets_names`.

The graph is the plain, unoptimised form: Conv → BatchNormalization → x·σ(x), Gemm for the
linear layers, and the reshape/transpose unfold/fold of the reference implementations. The
passes in :mod:`mvcompile.passes` rewrite it.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Protocol

import numpy as np
import onnx_ir as ir
import onnxscript

from mvcompile.errors import UserError

OPSET = 24
IR_VERSION = 10  # onnxruntime 1.31 refuses the IR version onnx 1.23 writes by default
INPUT_NAME = "pixel_values"
OUTPUT_NAME = "logits"
NETWORK_STRIDE = 32

PATCH_CONFIGS: dict[str, tuple[int, int, int]] = {"A": (2, 2, 2), "B": (8, 4, 2)}

# size -> (stem, 5 stage channels, last 1x1), transformer dims, MV2 expansion.
_SIZES: dict[str, tuple[tuple[int, ...], tuple[int, int, int], int]] = {
    "xxs": ((16, 16, 24, 48, 64, 80, 320), (64, 80, 96), 2),
    "xs": ((16, 32, 48, 64, 80, 96, 384), (96, 120, 144), 4),
    "s": ((16, 32, 64, 96, 128, 160, 640), (144, 192, 240), 4),
}
SIZES = tuple(_SIZES)


@dataclass(frozen=True)
class MobileViTConfig:
    """Architecture hyper-parameters. Use :meth:`for_size` for the paper's XXS/XS/S."""

    size: str
    channels: tuple[int, ...]  # stem, stage 1..5, last 1x1
    dims: tuple[int, int, int]  # transformer width d of the three MobileViT blocks
    expansion: int  # MV2 inverted-residual expansion factor
    depths: tuple[int, int, int] = (2, 4, 3)  # transformer layers L per MobileViT block
    heads: int = 4
    ffn_ratio: int = 2
    patch_sizes: tuple[int, int, int] = PATCH_CONFIGS["A"]
    num_classes: int = 1000
    resolution: int = 256
    conv_kernel: int = 3
    bn_eps: float = 1e-5
    ln_eps: float = 1e-5

    @classmethod
    def for_size(
        cls,
        size: str,
        *,
        resolution: int = 256,
        patch_config: str = "A",
        num_classes: int = 1000,
    ) -> MobileViTConfig:
        """The paper's configuration for ``size`` in {xxs, xs, s}; validates every argument."""
        if size not in _SIZES:
            raise UserError(f"Unknown MobileViT size {size!r}. Choose one of: {', '.join(SIZES)}.")
        if patch_config not in PATCH_CONFIGS:
            raise UserError(
                f"Unknown patch config {patch_config!r}. Choose A (2,2,2) or B (8,4,2)."
            )
        if not 1 <= num_classes <= MAX_CLASSES:
            raise UserError(f"--num-classes must be between 1 and {MAX_CLASSES:,}, got "
                            f"{num_classes}: the classifier is a [{num_classes}, C] weight, and "
                            "ONNX files hold at most 2 GiB.")
        channels, dims, expansion = _SIZES[size]
        config = cls(size, channels, dims, expansion, patch_sizes=PATCH_CONFIGS[patch_config],
                     num_classes=num_classes)
        check_resolution(resolution, config.patch_sizes)
        return replace(config, resolution=resolution)


MAX_RESOLUTION = 4096  # attention at R/8 holds (R/8)^4/4 scores a head: 275 GB for S at 4096
MAX_CLASSES = 100_000  # ImageNet-21k has 21,841; S's classifier at this size is 256 MB


def valid_resolutions(patch_sizes: tuple[int, ...], up_to: int = 1024) -> list[int]:
    """Square sizes R for which the stride-32 network and every block's patch size divide.

    The three MobileViT blocks see maps of R/8, R/16 and R/32, so R must be a multiple of 32
    and R/(8·2^i) a multiple of patch size p_i.
    """
    steps = [NETWORK_STRIDE] + [8 * 2**i * p for i, p in enumerate(patch_sizes)]
    step = math.lcm(*steps)
    return list(range(step, up_to + 1, step))


def check_resolution(resolution: int, patch_sizes: tuple[int, ...]) -> None:
    """Raise :class:`UserError` naming the nearest valid sizes if ``resolution`` is invalid
    (not a positive multiple of the smallest valid size, or above :data:`MAX_RESOLUTION`)."""
    valid = valid_resolutions(patch_sizes)
    if resolution > MAX_RESOLUTION:
        raise UserError(f"Resolution {resolution} is above {MAX_RESOLUTION}, the largest this "
                        "tool builds: MobileViT's attention memory grows with the fourth power "
                        "of the resolution (MobileViT was trained at 256).")
    if resolution > 0 and resolution % valid[0] == 0:
        return
    step = valid[0]
    below = [resolution // step * step] if resolution > step else []
    above = [max(step, -(-resolution // step) * step)]
    nearest = " or ".join(str(r) for r in below + above)
    raise UserError(
        f"Resolution {resolution} does not work with patch sizes {patch_sizes}: the network "
        f"has stride {NETWORK_STRIDE} and each MobileViT block must split its feature map into "
        f"whole patches, so the size must be a positive multiple of {valid[0]} "
        f"({', '.join(map(str, valid[:4]))}, ...). Nearest: {nearest}."
    )


class ParamSource(Protocol):
    """Supplies the tensor for a parameter, given its name, shape and role.

    Roles: conv, bn_weight, bn_bias, bn_mean, bn_var, linear_weight, linear_bias,
    ln_weight, ln_bias.
    """

    def __call__(self, name: str, shape: tuple[int, ...], role: str) -> np.ndarray: ...


class _Builder:
    """An onnxscript GraphBuilder plus a module-name stack for HF-style initializer names."""

    def __init__(self, graph: ir.Graph, params: ParamSource) -> None:
        self.gb = onnxscript.GraphBuilder(graph)
        self.op = self.gb.op
        self.params = params
        self._scope: list[str] = []

    @contextlib.contextmanager
    def scope(self, name: str) -> Iterator[None]:
        parts = [p for p in name.split(".") if p]
        for part in parts:
            self._scope.append(part)
            self.gb.push_module(part)
        try:
            yield
        finally:
            for _ in parts:
                self._scope.pop()
                self.gb.pop_module()

    def param(self, name: str, shape: tuple[int, ...], role: str) -> ir.Value:
        full_name = ".".join([*self._scope, name])
        array = np.ascontiguousarray(self.params(full_name, shape, role), dtype=np.float32)
        return self.gb.initializer(ir.tensor(array, name=full_name), full_name, qualify=False)


# ---------------------------------------------------------------------------------------------
# Blocks
# ---------------------------------------------------------------------------------------------


def swish(b: _Builder, x: ir.Value) -> ir.Value:
    """Swish/SiLU, y = x·σ(x), written as Sigmoid → Mul (fused by passes.fuse_swish)."""
    return b.op.Mul(x, b.op.Sigmoid(x))


def conv_bn_act(
    b: _Builder,
    x: ir.Value,
    c_in: int,
    c_out: int,
    kernel: int,
    *,
    stride: int = 1,
    groups: int = 1,
    norm: bool = True,
    act: bool = True,
    eps: float = 1e-5,
) -> ir.Value:
    """y = act(BN(W * x)), 'same' padding; [B,c_in,H,W] -> [B,c_out,H/s,W/s]."""
    w = b.param("convolution.weight", (c_out, c_in // groups, kernel, kernel), "conv")
    pad = (kernel - 1) // 2
    y = b.op.Conv(x, w, strides=[stride, stride], pads=[pad] * 4, group=groups,
                  kernel_shape=[kernel, kernel])
    if norm:
        with b.scope("normalization"):
            gamma = b.param("weight", (c_out,), "bn_weight")
            beta = b.param("bias", (c_out,), "bn_bias")
            mean = b.param("running_mean", (c_out,), "bn_mean")
            var = b.param("running_var", (c_out,), "bn_var")
        y = b.op.BatchNormalization(y, gamma, beta, mean, var, epsilon=eps)
    return swish(b, y) if act else y


def inverted_residual(
    b: _Builder, x: ir.Value, c_in: int, c_out: int, stride: int, expansion: int
) -> ir.Value:
    """MobileNetV2 block: 1x1 expand → 3x3 depthwise (stride s) → 1x1 reduce, + x if shapes match.

    [B,c_in,H,W] -> [B,c_out,H/s,W/s]
    """
    hidden = _make_divisible(c_in * expansion)
    with b.scope("expand_1x1"):
        y = conv_bn_act(b, x, c_in, hidden, 1)
    with b.scope("conv_3x3"):
        y = conv_bn_act(b, y, hidden, hidden, 3, stride=stride, groups=hidden)
    with b.scope("reduce_1x1"):
        y = conv_bn_act(b, y, hidden, c_out, 1, act=False)
    return b.op.Add(x, y) if stride == 1 and c_in == c_out else y


def linear(b: _Builder, x: ir.Value, d_in: int, d_out: int) -> ir.Value:
    """y = x·Wᵀ + b with the checkpoint's W of shape [d_out, d_in]; [T,d_in] -> [T,d_out]."""
    w = b.param("weight", (d_out, d_in), "linear_weight")
    bias = b.param("bias", (d_out,), "linear_bias")
    return b.op.Gemm(x, w, bias, transB=1)


def layer_norm(b: _Builder, x: ir.Value, d: int, eps: float) -> ir.Value:
    """y = (x − E[x]) / sqrt(Var[x] + ε) · γ + β over the last axis."""
    gamma = b.param("weight", (d,), "ln_weight")
    beta = b.param("bias", (d,), "ln_bias")
    return b.op.LayerNormalization(x, gamma, beta, axis=-1, epsilon=eps)


def self_attention(b: _Builder, x: ir.Value, d: int, heads: int, tokens: int) -> ir.Value:
    """Multi-head attention within each patch group, softmax(q·kᵀ/√d_h)·v.

    x: [B·P·N, d] (N tokens per group). Returns [B·P·N, d] before the output projection.
    """
    head_dim = d // heads
    split = [-1, tokens, heads, head_dim]
    with b.scope("query"):
        q = b.op.Transpose(b.op.Reshape(linear(b, x, d, d), split), perm=[0, 2, 1, 3])
    with b.scope("key"):
        k_t = b.op.Transpose(b.op.Reshape(linear(b, x, d, d), split), perm=[0, 2, 3, 1])
    with b.scope("value"):
        v = b.op.Transpose(b.op.Reshape(linear(b, x, d, d), split), perm=[0, 2, 1, 3])
    # [B·P,h,N,dh] @ [B·P,h,dh,N] -> [B·P,h,N,N]
    scores = b.op.Mul(b.op.MatMul(q, k_t), 1.0 / math.sqrt(head_dim))
    context = b.op.MatMul(b.op.Softmax(scores, axis=-1), v)  # [B·P,h,N,dh]
    context = b.op.Transpose(context, perm=[0, 2, 1, 3])  # [B·P,N,h,dh]
    return b.op.Reshape(context, [-1, d])  # [B·P·N, d]


def transformer_layer(b: _Builder, x: ir.Value, d: int, cfg: MobileViTConfig, tokens: int
                      ) -> ir.Value:
    """Pre-norm transformer layer: x += MHA(LN(x)); x += W₂·swish(W₁·LN(x)). [T,d] -> [T,d]."""
    with b.scope("layernorm_before"):
        h = layer_norm(b, x, d, cfg.ln_eps)
    with b.scope("attention.attention"):
        h = self_attention(b, h, d, cfg.heads, tokens)
    with b.scope("attention.output.dense"):
        h = linear(b, h, d, d)
    x = b.op.Add(h, x)
    with b.scope("layernorm_after"):
        h = layer_norm(b, x, d, cfg.ln_eps)
    with b.scope("intermediate.dense"):
        h = swish(b, linear(b, h, d, cfg.ffn_ratio * d))
    with b.scope("output.dense"):
        h = linear(b, h, cfg.ffn_ratio * d, d)
    return b.op.Add(h, x)


def unfold(b: _Builder, x: ir.Value, c: int, size: int, p: int) -> ir.Value:
    """[B,C,H,W] -> [B·P·N, C]: P = p² positions within a patch, N = (H/p)·(W/p) patches.

    Token (i, j) of patch group P=(pi,pj) is pixel (i·p+pi, j·p+pj); as in HF/ml-cvnets.
    """
    n_side = size // p
    x = b.op.Reshape(x, [-1, p, n_side, p])  # [B·C·nh, ph, nw, pw]
    x = b.op.Transpose(x, perm=[0, 2, 1, 3])  # [B·C·nh, nw, ph, pw]
    x = b.op.Reshape(x, [-1, c, n_side * n_side, p * p])  # [B,C,N,P]
    x = b.op.Transpose(x, perm=[0, 3, 2, 1])  # [B,P,N,C]
    return b.op.Reshape(x, [-1, c])  # [B·P·N, C]


def fold(b: _Builder, x: ir.Value, c: int, size: int, p: int) -> ir.Value:
    """Inverse of :func:`unfold`: [B·P·N, C] -> [B,C,H,W]."""
    n_side = size // p
    x = b.op.Reshape(x, [-1, p * p, n_side * n_side, c])  # [B,P,N,C]
    x = b.op.Transpose(x, perm=[0, 3, 2, 1])  # [B,C,N,P]
    x = b.op.Reshape(x, [-1, n_side, p, p])  # [B·C·nh, nw, ph, pw]
    x = b.op.Transpose(x, perm=[0, 2, 1, 3])  # [B·C·nh, ph, nw, pw]
    return b.op.Reshape(x, [-1, c, size, size])  # [B,C,H,W]


def mobilevit_block(
    b: _Builder, x: ir.Value, c: int, d: int, depth: int, p: int, size: int,
    cfg: MobileViTConfig,
) -> ir.Value:
    """Local conv n×n → 1x1 (C→d) → unfold → L transformer layers → LN → fold → 1x1 (d→C),
    then concat with the input and fuse with conv n×n (2C→C). [B,C,H,W] -> [B,C,H,W].
    """
    k = cfg.conv_kernel
    with b.scope("conv_kxk"):
        y = conv_bn_act(b, x, c, c, k)
    with b.scope("conv_1x1"):
        y = conv_bn_act(b, y, c, d, 1, norm=False, act=False)  # [B,d,H,W]
    tokens = (size // p) ** 2
    y = unfold(b, y, d, size, p)  # [B,d,H,W] -> [B·P·N, d]
    for i in range(depth):
        with b.scope(f"transformer.layer.{i}"):
            y = transformer_layer(b, y, d, cfg, tokens)
    with b.scope("layernorm"):
        y = layer_norm(b, y, d, cfg.ln_eps)
    y = fold(b, y, d, size, p)  # [B·P·N, d] -> [B,d,H,W]
    with b.scope("conv_projection"):
        y = conv_bn_act(b, y, d, c, 1)
    y = b.op.Concat(x, y, axis=1)  # [B,2C,H,W]
    with b.scope("fusion"):
        return conv_bn_act(b, y, 2 * c, c, k)


def classifier(b: _Builder, x: ir.Value, c: int, num_classes: int) -> ir.Value:
    """Global average pool then linear: [B,C,H,W] -> [B,C] -> [B,num_classes]."""
    pooled = b.op.Flatten(b.op.GlobalAveragePool(x), axis=1)
    with b.scope("classifier"):
        return linear(b, pooled, c, num_classes)


# ---------------------------------------------------------------------------------------------
# Network
# ---------------------------------------------------------------------------------------------


def build_graph(cfg: MobileViTConfig, params: ParamSource) -> ir.Model:
    """The whole network as an ``ir.Model``: pixel_values [B,3,R,R] -> logits [B,classes]."""
    graph = ir.Graph([], [], nodes=[], opset_imports={"": OPSET}, name=f"mobilevit_{cfg.size}")
    b = _Builder(graph, params)
    r = cfg.resolution
    x = b.gb.input(INPUT_NAME, ir.DataType.FLOAT, ["batch", 3, r, r])
    c = cfg.channels
    with b.scope("mobilevit"):
        with b.scope("conv_stem"):
            y = conv_bn_act(b, x, 3, c[0], 3, stride=2)  # [B,16,R/2,R/2]
        with b.scope("encoder.layer.0.layer.0"):
            y = inverted_residual(b, y, c[0], c[1], 1, cfg.expansion)
        for i in range(3):  # [B,c1,R/2,..] -> [B,c2,R/4,..]
            with b.scope(f"encoder.layer.1.layer.{i}"):
                y = inverted_residual(b, y, c[1] if i == 0 else c[2], c[2], 2 if i == 0 else 1,
                                      cfg.expansion)
        size = r // 4
        for i in range(3):  # three MobileViT stages at R/8, R/16, R/32
            size //= 2
            with b.scope(f"encoder.layer.{i + 2}"):
                with b.scope("downsampling_layer"):
                    y = inverted_residual(b, y, c[i + 2], c[i + 3], 2, cfg.expansion)
                y = mobilevit_block(b, y, c[i + 3], cfg.dims[i], cfg.depths[i],
                                    cfg.patch_sizes[i], size, cfg)
        with b.scope("conv_1x1_exp"):
            y = conv_bn_act(b, y, c[5], c[6], 1)  # [B,last,R/32,R/32]
    logits = classifier(b, y, c[6], cfg.num_classes)
    b.gb.add_output(logits, OUTPUT_NAME)
    logits.shape = ir.Shape(["batch", cfg.num_classes])
    logits.type = ir.TensorType(ir.DataType.FLOAT)
    model = ir.Model(graph, ir_version=IR_VERSION, producer_name="mvcompile")
    model.metadata_props.update(_metadata(cfg))
    return model


def _metadata(cfg: MobileViTConfig) -> dict[str, str]:
    return {
        "mvcompile.size": cfg.size,
        "mvcompile.resolution": str(cfg.resolution),
        "mvcompile.patch_sizes": ",".join(map(str, cfg.patch_sizes)),
        "mvcompile.num_classes": str(cfg.num_classes),
        "mvcompile.preprocessing": "RGB, resize + centre crop, scale 1/255 to [0,1], no mean/std",
    }


def _make_divisible(value: float, divisor: int = 8) -> int:
    """Round channel counts to a multiple of 8 without losing more than 10% (MobileNetV2)."""
    new_value = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if new_value < 0.9 * value:
        new_value += divisor
    return new_value
