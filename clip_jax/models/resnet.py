"""The ResNet image tower: OpenAI's ``ModifiedResNet`` (CLIP RN50, RN101, RN50x4, ...).

As OpenAI's ``clip/model.py``: a three-conv stem (3x3 stride 2, 3x3, 3x3; widths
width/2, width/2, width) and a 2x2 average pool; four stages of bottleneck blocks
(expansion 4) whose strided steps are anti-aliased: an average pool of the stride
before the last 1x1 conv and before the shortcut's 1x1 conv, never a strided conv;
an attention-pooling head whose single query is the mean of the final feature map.
Parameter shapes match OpenAI's, so their weights load unchanged.

BatchNorm: the running statistics live in the ``batch_stats`` collection (buffers,
not parameters) and every BatchNorm ALWAYS normalises with them, in training too
(frozen BN, the usual practice for CLIP fine-tuning, and what OpenAI's checkpoints
were exported with). This trainer never updates them: a model trained from scratch
keeps mean 0, var 1, so its BatchNorms are learned per-channel affine maps. The
caller passes ``{"params": ..., "batch_stats": ...}`` to ``apply``.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from clip_jax.models import layers

EXPANSION = 4  # a bottleneck's output channels / its inner width
BATCH_NORM_EPS = 1e-5  # PyTorch's BatchNorm2d default, as OpenAI's checkpoints
HEAD_WIDTH = 64  # OpenAI's attention-pool head dim: heads = width * 32 // 64


@dataclasses.dataclass(frozen=True)
class ResNetConfig:
    """``layers``: bottleneck blocks per stage; ``width``: the stem's output channels (the
    first stage's inner width); features end with ``width * 32`` channels at 1/32 resolution."""

    layers: tuple[int, int, int, int]
    width: int
    image_size: int
    heads: int

    def __post_init__(self):
        object.__setattr__(self, "layers", tuple(self.layers))  # JSON lists -> tuples (hashable)
        if self.image_size % 32:
            raise ValueError(f"ResNetConfig.image_size={self.image_size} must be a multiple of 32")

    @property
    def embed_width(self) -> int:
        """Channels of the final feature map, the attention pool's width."""
        return self.width * 32

    @property
    def grid(self) -> int:
        return self.image_size // 32


def conv_init(names=(None, None, "conv_in", "conv_out")):
    """He-normal (fan in), for convs followed by ReLU; tagged with logical axis names."""
    return nn.with_logical_partitioning(nn.initializers.he_normal(), names)


def conv(features: int, kernel: int, dtype: layers.Dtype, name: str, stride: int = 1) -> nn.Conv:
    """A bias-free conv with PyTorch's ``padding=kernel // 2``, NHWC."""
    pad = kernel // 2
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=stride,
        padding=((pad, pad), (pad, pad)),
        use_bias=False,
        dtype=dtype,
        kernel_init=conv_init(),
        name=name,
    )


def batch_norm(name: str, dtype: layers.Dtype, zero_scale: bool = False) -> nn.BatchNorm:
    """Frozen BatchNorm (running statistics, see the module docstring); ``zero_scale`` for
    OpenAI's init of each block's last BN (the block starts as the identity)."""
    scale = nn.initializers.zeros_init() if zero_scale else nn.initializers.ones_init()
    return nn.BatchNorm(
        use_running_average=True,
        momentum=0.9,  # PyTorch's momentum 0.1
        epsilon=BATCH_NORM_EPS,
        dtype=dtype,
        scale_init=nn.with_logical_partitioning(scale, ("norm",)),
        bias_init=layers.zeros(("norm",)),
        name=name,
    )


def avg_pool(x: jax.Array, size: int) -> jax.Array:
    """PyTorch's ``AvgPool2d(size)``: window = stride = size, no padding. [B, H, W, C]."""
    return x if size == 1 else nn.avg_pool(x, (size, size), strides=(size, size), padding="VALID")


class Bottleneck(nn.Module):
    """1x1 -> 3x3 -> (avg pool of the stride) -> 1x1 (x4 channels), plus the shortcut."""

    planes: int
    stride: int = 1
    dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """[B, H, W, C] -> [B, H / stride, W / stride, 4 * planes]."""
        out = nn.relu(batch_norm("bn1", self.dtype)(conv(self.planes, 1, self.dtype, "conv1")(x)))
        out = nn.relu(batch_norm("bn2", self.dtype)(conv(self.planes, 3, self.dtype, "conv2")(out)))
        out = avg_pool(out, self.stride)
        out = conv(self.planes * EXPANSION, 1, self.dtype, "conv3")(out)
        out = batch_norm("bn3", self.dtype, zero_scale=True)(out)
        if self.stride > 1 or x.shape[-1] != self.planes * EXPANSION:
            x = conv(self.planes * EXPANSION, 1, self.dtype, "downsample_conv")(avg_pool(x, self.stride))
            x = batch_norm("downsample_bn", self.dtype)(x)
        return nn.relu(out + x)


class AttentionPool2d(nn.Module):
    """The mean token (plus the positional embedding) attends over [mean, every position]."""

    heads: int
    out_dim: int
    dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """[B, H, W, D] -> [B, out_dim]."""
        width = x.shape[-1]
        x = x.reshape(x.shape[0], -1, width)  # [B, HW, D], row-major as PyTorch's flatten
        x = jnp.concatenate([x.mean(axis=1, keepdims=True), x], axis=1)  # [B, HW + 1, D]
        pos = self.param(
            "pos_embedding", layers.normal(width**-0.5, ("length", "embed")), (x.shape[1], width)
        )
        x = x + pos.astype(x.dtype)
        std, shape = width**-0.5, (width, self.heads, width // self.heads)
        names = ("embed", "heads", "kv")
        q, k, v = (
            layers.Projection(shape, names, 2, std, self.dtype, name=name)(y)
            for name, y in (("query", x[:, :1]), ("key", x), ("value", x))
        )  # [B, 1 or HW + 1, H, Dh]
        out = layers.attend(q, k, v)  # [B, 1, H, Dh]
        out_shape = (self.heads, width // self.heads, self.out_dim)
        out = layers.Projection(out_shape, ("heads", "kv", "joint"), 1, std, self.dtype, name="out")(out)
        return out[:, 0]


class ResNetStage(nn.Module):
    """``blocks`` bottlenecks; the first one strides and changes the channel count."""

    planes: int
    blocks: int
    stride: int
    dtype: layers.Dtype = jnp.float32
    remat: str = "none"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        block = Bottleneck
        if self.remat != "none":
            block = nn.remat(Bottleneck, policy=layers.REMAT_POLICIES[self.remat])
        for i in range(self.blocks):
            x = block(self.planes, self.stride if i == 0 else 1, self.dtype, name=f"block_{i}")(x)
        return x


class ModifiedResNet(nn.Module):
    """OpenAI's CLIP ResNet image tower; ``remat`` rematerialises each bottleneck."""

    config: ResNetConfig
    embed_dim: int
    dtype: layers.Dtype = jnp.float32
    remat: str = "none"

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
        """Normalised images [B, H, W, 3] -> unnormalised features [B, embed_dim] (float32).

        ``train`` changes nothing: BatchNorm is frozen (module docstring).
        """
        del train
        cfg = self.config
        x = images.astype(self.dtype)
        stem = ((cfg.width // 2, 2), (cfg.width // 2, 1), (cfg.width, 1))
        for i, (features, stride) in enumerate(stem, 1):
            x = conv(features, 3, self.dtype, f"conv{i}", stride)(x)
            x = nn.relu(batch_norm(f"bn{i}", self.dtype)(x))
        x = avg_pool(x, 2)
        for i, blocks in enumerate(cfg.layers):
            stage = ResNetStage(
                cfg.width * 2**i, blocks, 1 if i == 0 else 2, self.dtype, self.remat, name=f"layer{i + 1}"
            )
            x = stage(x)
        x = nn.with_logical_constraint(x, ("batch", None, None, "act_embed"))
        x = AttentionPool2d(cfg.heads, self.embed_dim, self.dtype, name="attnpool")(x)
        return x.astype(jnp.float32)


def forward_flops(config: ResNetConfig, embed_dim: int) -> float:
    """Model FLOPs (2 x multiply-adds) of one image's forward pass: convs and the attention pool."""
    flops, size = 0.0, config.image_size

    def conv_flops(size: int, kernel: int, c_in: int, c_out: int) -> float:
        return 2.0 * size * size * kernel * kernel * c_in * c_out

    size //= 2
    w = config.width
    flops += (
        conv_flops(size, 3, 3, w // 2) + conv_flops(size, 3, w // 2, w // 2) + conv_flops(size, 3, w // 2, w)
    )
    size //= 2
    c_in = w
    for i, blocks in enumerate(config.layers):
        planes = w * 2**i
        for b in range(blocks):
            stride = 2 if (i > 0 and b == 0) else 1
            flops += conv_flops(size, 1, c_in, planes) + conv_flops(size, 3, planes, planes)
            size //= stride
            flops += conv_flops(size, 1, planes, planes * EXPANSION)
            if stride > 1 or c_in != planes * EXPANSION:
                flops += conv_flops(size, 1, c_in, planes * EXPANSION)
            c_in = planes * EXPANSION
    tokens, d = size * size + 1, config.embed_width
    flops += 2.0 * d * d * (1 + 2 * tokens) + 4.0 * tokens * d + 2.0 * d * embed_dim
    return flops
