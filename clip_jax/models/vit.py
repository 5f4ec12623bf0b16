"""The image tower: a Vision Transformer, by default laid out exactly as OpenAI's CLIP ViT.

Default (OpenAI): conv patch embedding without bias, class token, learned positional
embedding, ``ln_pre``, pre-LN blocks, ``ln_post`` on the class token, projection
without bias. Parameter shapes match OpenAI's, so their weights load unchanged.
SigLIP (big_vision's two_towers/vit): patch embedding with bias, no class token,
no ``ln_pre``, ``ln_post`` on every token, attention pooling (`pooling.MAPHead`),
no projection (the embedding is the pooled width), tanh GELU, LayerNorm eps 1e-6.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from clip_jax.models import layers, pooling

POOLINGS = ("class_token", "map", "mean")


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    image_size: int
    patch_size: int
    width: int
    layers: int
    heads: int
    mlp_ratio: float = 4.0
    activation: str = "quick_gelu"
    mlp_dim: int | None = None  # the MLP's hidden size; None: width * mlp_ratio
    norm_eps: float = layers.LAYER_NORM_EPS
    pooling: str = "class_token"  # one of POOLINGS; "map": SigLIP's attention-pooling head
    class_token: bool = True
    patch_bias: bool = False
    ln_pre: bool = True
    projection: bool = True  # False: the pooled [width] feature is the embedding (SigLIP)
    proj_bias: bool = False

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_positions(self) -> int:
        """Rows of the positional embedding: the patches, plus one for the class token."""
        return self.num_patches + int(self.class_token)

    @property
    def mlp_hidden(self) -> int:
        return self.mlp_dim or int(self.width * self.mlp_ratio)


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

    def _tokens(self, images: jax.Array, train: bool) -> jax.Array:
        """Images [B, H, W, 3] -> tokens [B, T, D] with positions (class token first, if any)."""
        cfg = self.config
        x = nn.Conv(
            cfg.width,
            (cfg.patch_size, cfg.patch_size),
            strides=cfg.patch_size,
            padding="VALID",
            use_bias=cfg.patch_bias,
            dtype=self.dtype,
            kernel_init=layers.normal((3 * cfg.patch_size**2) ** -0.5, (None, None, None, "embed")),
            bias_init=layers.zeros(("embed",)),
            name="patch_embed",
        )(images)
        x = x.reshape(x.shape[0], -1, cfg.width)  # [B, N, D]
        if cfg.class_token:  # created before pos_embedding: the init draws in OpenAI-layout order
            class_token = self.param("class_token", layers.normal(cfg.width**-0.5, ("embed",)), (cfg.width,))
        pos_embedding = self.param(
            "pos_embedding",
            layers.normal(cfg.width**-0.5, ("length", "embed")),
            (cfg.num_positions, cfg.width),
        ).astype(x.dtype)
        first = int(cfg.class_token)
        x = x + pos_embedding[first:]
        keep = cfg.num_patches - int(cfg.num_patches * self.patch_dropout)
        if train and keep < cfg.num_patches:
            x = drop_patches(x, max(keep, 1), self.make_rng("patch_dropout"))
        if cfg.class_token:
            class_token = class_token.astype(x.dtype) + pos_embedding[0]
            class_tokens = jnp.broadcast_to(class_token, (x.shape[0], 1, cfg.width))
            x = jnp.concatenate([class_tokens, x], axis=1)
        return nn.with_logical_constraint(x, ("batch", "length", "act_embed"))

    def _pool(self, x: jax.Array) -> jax.Array:
        """Tokens after the blocks [B, T, D] -> [B, D], ``ln_post`` included."""
        cfg = self.config
        ln_post = layers.layer_norm("ln_post", self.dtype, cfg.norm_eps)
        if cfg.pooling == "class_token":  # x: [B, 1, D], the class token alone
            return ln_post(x[:, 0])
        x = ln_post(x)
        if cfg.pooling == "map":
            head = pooling.MAPHead(
                cfg.heads, cfg.mlp_hidden, cfg.activation, cfg.norm_eps, self.dtype, name="map_head"
            )
            return head(x)
        return jnp.mean(x[:, int(cfg.class_token) :], axis=1)

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
        """Normalised images [B, H, W, 3] -> unnormalised features [B, embed_dim] (float32).

        ``train`` drops patches (``patch_dropout``) with the "patch_dropout" rng.
        """
        cfg = self.config
        x = self._tokens(images, train)
        if cfg.ln_pre:
            x = layers.layer_norm("ln_pre", self.dtype, cfg.norm_eps)(x)
        x = layers.Transformer(
            cfg.layers,
            cfg.heads,
            cfg.mlp_ratio,
            cfg.activation,
            causal=False,
            dtype=self.dtype,
            remat=self.remat,
            scan=self.scan,
            mlp_dim=cfg.mlp_dim,
            norm_eps=cfg.norm_eps,
            name="transformer",
        )(x, jnp.zeros(x.shape[:1], jnp.int32) if cfg.pooling == "class_token" else None)
        x = self._pool(x).astype(jnp.float32)
        if not cfg.projection:
            return x
        proj_init = layers.normal(cfg.width**-0.5, ("embed", "joint"))
        proj = self.param("proj", proj_init, (cfg.width, self.embed_dim))
        x = jnp.dot(x, proj)
        if cfg.proj_bias:
            x = x + self.param("proj_bias", layers.zeros(("joint",)), (self.embed_dim,))
        return x
