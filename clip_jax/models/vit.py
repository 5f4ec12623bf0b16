"""The image tower: a Vision Transformer laid out exactly as OpenAI's CLIP ViT.

Conv patch embedding without bias, class token, learned positional embedding,
``ln_pre``, pre-LN blocks, ``ln_post`` on the class token, projection without
bias. Parameter shapes match OpenAI's, so their weights load unchanged.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from clip_jax.models import layers


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    image_size: int
    patch_size: int
    width: int
    layers: int
    heads: int
    mlp_ratio: float = 4.0
    activation: str = "quick_gelu"

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


def drop_patches(patches: jax.Array, keep: int, rng: jax.Array) -> jax.Array:
    """FLIP (Li et al. 2023): a random ``keep`` of the N patches of each image. [B, N, D] -> [B, keep, D]."""
    order = jnp.argsort(jax.random.uniform(rng, patches.shape[:2]), axis=1)[:, :keep]
    return jnp.take_along_axis(patches, order[..., None], axis=1)


class VisionTransformer(nn.Module):
    """``patch_dropout`` is the share of patches FLIP drops in training (none at evaluation);
    ``remat`` and ``scan`` as in `layers.Transformer`."""

    config: VisionConfig
    embed_dim: int
    dtype: layers.Dtype = jnp.float32
    patch_dropout: float = 0.0
    remat: str = "none"
    scan: bool = False

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
        """Normalised images [B, H, W, 3] -> unnormalised features [B, embed_dim] (float32).

        ``train`` drops patches (``patch_dropout``) with the "patch_dropout" rng.
        """
        cfg = self.config
        scale = cfg.width**-0.5
        x = nn.Conv(
            cfg.width,
            (cfg.patch_size, cfg.patch_size),
            strides=cfg.patch_size,
            padding="VALID",
            use_bias=False,
            dtype=self.dtype,
            kernel_init=layers.normal((3 * cfg.patch_size**2) ** -0.5, (None, None, None, "embed")),
            name="patch_embed",
        )(images)
        x = x.reshape(x.shape[0], -1, cfg.width)  # [B, N, D]
        class_token = self.param("class_token", layers.normal(scale, ("embed",)), (cfg.width,))
        pos_embedding = self.param(
            "pos_embedding",
            layers.normal(scale, ("length", "embed")),
            (cfg.num_patches + 1, cfg.width),
        ).astype(x.dtype)
        x = x + pos_embedding[1:]
        keep = cfg.num_patches - int(cfg.num_patches * self.patch_dropout)
        if train and keep < cfg.num_patches:
            x = drop_patches(x, max(keep, 1), self.make_rng("patch_dropout"))
        class_token = class_token.astype(x.dtype) + pos_embedding[0]
        class_tokens = jnp.broadcast_to(class_token, (x.shape[0], 1, cfg.width))
        x = jnp.concatenate([class_tokens, x], axis=1)
        x = nn.with_logical_constraint(x, ("batch", "length", "act_embed"))
        x = layers.layer_norm("ln_pre", self.dtype)(x)
        x = layers.Transformer(
            cfg.layers,
            cfg.heads,
            cfg.mlp_ratio,
            cfg.activation,
            causal=False,
            dtype=self.dtype,
            remat=self.remat,
            scan=self.scan,
            name="transformer",
        )(x)
        x = layers.layer_norm("ln_post", self.dtype)(x[:, 0])
        proj = self.param("proj", layers.normal(scale, ("embed", "joint")), (cfg.width, self.embed_dim))
        return jnp.dot(x.astype(jnp.float32), proj)
