"""CLIP: an image tower, a text tower and a learnable temperature.

Public inference API: ``CLIP.encode_image`` and ``CLIP.encode_text`` return
L2-normalised float32 embeddings [B, embed_dim]. Variants are typed configs
(`VARIANTS`); `get_variant` looks one up with a clear error.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from clip_jax import cli
from clip_jax.models import layers, resnet
from clip_jax.models.resnet import ModifiedResNet, ResNetConfig
from clip_jax.models.text import TextConfig, TextTransformer
from clip_jax.models.vit import VisionConfig, VisionTransformer

# The paper's temperature: initialised to 0.07, logits scaled by at most 100.
LOGIT_SCALE_INIT = math.log(1 / 0.07)
MAX_LOGIT_SCALE = 100.0


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
    embed_dim: int
    vision: VisionConfig | ResNetConfig  # the image tower is chosen by this type
    text: TextConfig
    logit_scale_init: float = LOGIT_SCALE_INIT
    # SigLIP's learnable logit bias; None: no bias parameter (CLIP's softmax loss).
    logit_bias_init: float | None = None


def _openai_text(width: int, heads: int) -> TextConfig:
    return TextConfig(vocab_size=49408, context_length=77, width=width, layers=12, heads=heads)


def _open_clip(
    image: tuple[int, int, int, int, int], mlp: int, text: tuple[int, int, int]
) -> tuple[VisionConfig, TextConfig]:
    """open_clip's large ViTs (GELU): image (size, patch, width, layers, heads), its MLP
    hidden size, text (width, layers, heads) with OpenAI's vocabulary and context."""
    size, patch, width, depth, heads = image
    vision = VisionConfig(size, patch, width, depth, heads, activation="gelu", mlp_dim=mlp)
    text_width, text_layers, text_heads = text
    text_tower = TextConfig(49408, 77, text_width, text_layers, text_heads, activation="gelu")
    return vision, text_tower


def _siglip(image_size: int, patch: int, width: int, depth: int, heads: int, mlp: int) -> CLIPConfig:
    """big_vision's SigLIP two-towers (same shape in both towers, vocab 32,000, 64 tokens)."""
    tower = dict(mlp_dim=mlp, activation="gelu_tanh", norm_eps=1e-6)
    vision = VisionConfig(
        image_size, patch, width, depth, heads, pooling="map", class_token=False, patch_bias=True,
        ln_pre=False, projection=False, **tower,
    )  # fmt: skip
    text = TextConfig(32000, 64, width, depth, heads, causal=False, pooling="last", proj_bias=True, **tower)
    return CLIPConfig(width, vision, text, logit_scale_init=math.log(10.0), logit_bias_init=-10.0)


def _openai_resnet(layers: tuple[int, int, int, int], width: int, image_size: int) -> ResNetConfig:
    return ResNetConfig(layers, width, image_size, heads=width * 32 // 64)


VARIANTS: dict[str, CLIPConfig] = {
    # OpenAI's shapes (Radford et al. 2021, tables 19-20; clip/model.py).
    "RN50": CLIPConfig(1024, _openai_resnet((3, 4, 6, 3), 64, 224), _openai_text(512, 8)),
    "RN101": CLIPConfig(512, _openai_resnet((3, 4, 23, 3), 64, 224), _openai_text(512, 8)),
    "RN50x4": CLIPConfig(640, _openai_resnet((4, 6, 10, 6), 80, 288), _openai_text(640, 10)),
    "RN50x16": CLIPConfig(768, _openai_resnet((6, 8, 18, 8), 96, 384), _openai_text(768, 12)),
    "RN50x64": CLIPConfig(1024, _openai_resnet((3, 15, 36, 10), 128, 448), _openai_text(1024, 16)),
    "ViT-B/32": CLIPConfig(512, VisionConfig(224, 32, 768, 12, 12), _openai_text(512, 8)),
    "ViT-B/16": CLIPConfig(512, VisionConfig(224, 16, 768, 12, 12), _openai_text(512, 8)),
    "ViT-L/14": CLIPConfig(768, VisionConfig(224, 14, 1024, 24, 16), _openai_text(768, 12)),
    "ViT-L/14-336": CLIPConfig(768, VisionConfig(336, 14, 1024, 24, 16), _openai_text(768, 12)),
    # open_clip's model configs (ViT-H-14.json, ViT-g-14.json, ViT-bigG-14.json).
    "ViT-H/14": CLIPConfig(1024, *_open_clip((224, 14, 1280, 32, 16), 5120, (1024, 24, 16))),
    "ViT-g/14": CLIPConfig(1024, *_open_clip((224, 14, 1408, 40, 16), 6144, (1024, 24, 16))),
    "ViT-bigG/14": CLIPConfig(1280, *_open_clip((224, 14, 1664, 48, 16), 8192, (1280, 32, 20))),
    # SigLIP (Zhai et al. 2023; google/siglip-* on the HF hub): the towers of big_vision.
    "SigLIP-B/16": _siglip(224, 16, 768, 12, 12, 3072),
    "SigLIP-B/16-256": _siglip(256, 16, 768, 12, 12, 3072),
    "SigLIP-B/16-384": _siglip(384, 16, 768, 12, 12, 3072),
    "SigLIP-L/16-256": _siglip(256, 16, 1024, 24, 16, 4096),
    "SigLIP-So400m/14-384": _siglip(384, 14, 1152, 27, 16, 4304),
    # Small models for CPU runs and tests.
    "tiny": CLIPConfig(
        128,
        VisionConfig(40, 8, 128, 4, 4),
        TextConfig(vocab_size=256, context_length=16, width=128, layers=3, heads=4),
    ),
    # A 4-block ResNet (512-channel features at 1/32 of a 64-pixel image).
    "tiny-rn": CLIPConfig(
        128,
        ResNetConfig((1, 1, 1, 1), 16, 64, heads=8),
        TextConfig(vocab_size=256, context_length=16, width=128, layers=3, heads=4),
    ),
    # SigLIP's towers at the tiny shape (configs/demo_siglip.py, tests).
    "tiny-siglip": dataclasses.replace(
        _siglip(40, 8, 128, 4, 4, 512),
        text=dataclasses.replace(_siglip(40, 8, 128, 3, 4, 512).text, vocab_size=256, context_length=16),
    ),
    "small": CLIPConfig(
        256,
        VisionConfig(64, 8, 256, 6, 4),
        TextConfig(vocab_size=8192, context_length=32, width=256, layers=6, heads=4),
    ),
}


def get_variant(name: str, **text_overrides: Any) -> CLIPConfig:
    """The named variant; ``text_overrides`` (e.g. vocab_size) replace text-tower fields."""
    if name not in VARIANTS:
        raise ValueError(f"config.model.variant={name!r} is unknown; known variants: {sorted(VARIANTS)}")
    config = VARIANTS[name]
    overrides = {k: v for k, v in text_overrides.items() if v is not None}
    return dataclasses.replace(config, text=dataclasses.replace(config.text, **overrides))


def _l2_normalize(x: jax.Array) -> jax.Array:
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), 1e-12))


class CLIP(nn.Module):
    """``patch_dropout`` (FLIP, training only), ``remat`` and ``scan`` change how the
    towers run, not their weights (``scan`` stacks each tower's blocks into one subtree).
    ``max_logit_scale``: the training cap on exp(logit_scale) (`scale_cap`)."""

    config: CLIPConfig
    dtype: layers.Dtype = jnp.float32
    patch_dropout: float = 0.0
    remat: str = "none"
    scan: bool = False
    max_logit_scale: float | None = None

    def setup(self):
        cfg = self.config
        if isinstance(cfg.vision, ResNetConfig):
            if self.patch_dropout:
                raise ValueError("config.model.patch_dropout (FLIP) needs a ViT image tower, not a ResNet")
            self.visual = ModifiedResNet(cfg.vision, cfg.embed_dim, self.dtype, self.remat)
        else:
            self.visual = VisionTransformer(
                cfg.vision, cfg.embed_dim, self.dtype, self.patch_dropout, self.remat, self.scan
            )
        self.text = TextTransformer(cfg.text, cfg.embed_dim, self.dtype, self.remat, self.scan)
        init = nn.initializers.constant(cfg.logit_scale_init)
        self.logit_scale = self.param("logit_scale", nn.with_logical_partitioning(init, ()), ())
        if cfg.logit_bias_init is not None:
            init = nn.initializers.constant(cfg.logit_bias_init)
            self.logit_bias = self.param("logit_bias", nn.with_logical_partitioning(init, ()), ())

    def encode_image(self, images: jax.Array, train: bool = False) -> jax.Array:
        """Normalised images [B, H, W, 3] -> unit-norm embeddings [B, embed_dim] (float32)."""
        return _l2_normalize(self.visual(images, train))

    def encode_text(self, tokens: jax.Array) -> jax.Array:
        """Token ids [B, L] -> unit-norm embeddings [B, embed_dim] (float32)."""
        return _l2_normalize(self.text(tokens))

    def temperature(self) -> tuple[jax.Array, jax.Array]:
        """(scale, bias) of the logits ``scale * x.y + bias``: scale = exp(logit_scale), bias 0 if none."""
        bias = self.logit_bias if self.config.logit_bias_init is not None else jnp.zeros((), jnp.float32)
        return jnp.exp(self.logit_scale), bias

    def __call__(self, images: jax.Array, tokens: jax.Array, train: bool = False):
        """Returns (image_emb [B, E], text_emb [B, E], scale [], bias [])."""
        return self.encode_image(images, train), self.encode_text(tokens), *self.temperature()


def scale_cap(model: CLIP) -> float | None:
    """The cap on exp(logit_scale) while training ``model``; None: no cap.

    ``model.max_logit_scale`` (``config.train.max_logit_scale``; ``inf``: no cap) when
    given; else CLIP's 100 for a model without a logit bias (softmax losses), and no cap
    for one with it (SigLIP: big_vision never clips its learned t, and an imported
    SigLIP's exp(t) may already exceed 100).
    """
    if model.max_logit_scale is not None:
        if not model.max_logit_scale > 0:
            limit = model.max_logit_scale
            raise cli.UserError(f"config.train.max_logit_scale={limit} must be > 0 (inf: no cap)")
        return None if math.isinf(model.max_logit_scale) else float(model.max_logit_scale)
    return MAX_LOGIT_SCALE if model.config.logit_bias_init is None else None


def clamp_logit_scale(params: dict, max_scale: float | None = MAX_LOGIT_SCALE) -> dict:
    """Keeps exp(logit_scale) <= ``max_scale`` (applied after every update, as CLIP and
    open_clip do at 100); ``max_scale`` None: unchanged."""
    if max_scale is None:
        return params
    return {**params, "logit_scale": jnp.minimum(params["logit_scale"], math.log(max_scale))}


def dummy_inputs(config: CLIPConfig, batch: int = 1) -> tuple[jax.Array, jax.Array]:
    """Zero inputs of the model's shapes, for ``init`` and ``jax.eval_shape``."""
    size = config.vision.image_size
    images = jnp.zeros((batch, size, size, 3), jnp.float32)
    tokens = jnp.zeros((batch, config.text.context_length), jnp.int32)
    return images, tokens


def tower_flops(tokens: int, width: int, depth: int, pooled_row: bool) -> float:
    """FLOPs of ``depth`` blocks over ``tokens`` rows: 24 n d^2 + 4 n^2 d each (ANCHORS.md).
    ``pooled_row``: the tower pools one row and its last block computes only that one
    (`layers.ResidualBlock`): keys and values at every row (4 n d^2), the query, attention
    output and 4x MLP at one (20 d^2), one query's attention over n keys (4 n d)."""
    layer = 24 * tokens * width**2 + 4 * tokens**2 * width
    if not (pooled_row and depth):
        return depth * layer
    return (depth - 1) * layer + 4 * tokens * width**2 + 20 * width**2 + 4 * tokens * width


def forward_flops_per_pair(config, kept_patches: int | None = None) -> float:
    """Model FLOPs (2 x multiply-adds) of one image-text pair's forward pass: ANCHORS.md's
    count, less what the towers need not compute (FLIP's dropped patches, and the rows of
    a last block that the tower does not pool: `tower_flops`)."""
    vision, text = config.vision, config.text
    text_flops = tower_flops(text.context_length, text.width, text.layers, pooled_row=True)
    if isinstance(vision, ResNetConfig):
        return resnet.forward_flops(vision, config.embed_dim) + text_flops + 2 * config.embed_dim * text.width
    patches = vision.num_patches if kept_patches is None else kept_patches
    patch_embed = 2 * patches * 3 * vision.patch_size**2 * vision.width
    tokens = patches + int(vision.class_token)
    image = tower_flops(tokens, vision.width, vision.layers, vision.pooling == "class_token") + patch_embed
    projections = 2 * config.embed_dim * (vision.width + text.width)
    return image + text_flops + projections
