"""The text tower: token + positional embedding, pre-LN blocks, final LayerNorm,
one pooled feature, projection. By default OpenAI's CLIP text encoder (causal
blocks, the feature at the end-of-text token, projection without bias); SigLIP's
is bidirectional, pooled at the last position, with a biased projection (``head``).

End-of-text position: token ids are laid out ``[BOS, ..., EOS, PAD, PAD, ...]``
with ``PAD == pad_id`` (0), so the end-of-text token is the last non-pad token.
For OpenAI's BPE this is the same position as their ``argmax(token id)``.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from clip_jax.models import layers

POOLINGS = ("eot", "last")  # the end-of-text token (CLIP) or the last position (SigLIP)


@dataclasses.dataclass(frozen=True)
class TextConfig:
    vocab_size: int
    context_length: int
    width: int
    layers: int
    heads: int
    mlp_ratio: float = 4.0
    activation: str = "quick_gelu"
    pad_id: int = 0
    mlp_dim: int | None = None  # the MLP's hidden size; None: width * mlp_ratio
    norm_eps: float = layers.LAYER_NORM_EPS
    causal: bool = True
    pooling: str = "eot"  # one of POOLINGS
    proj_bias: bool = False

    @property
    def mlp_hidden(self) -> int:
        return self.mlp_dim or int(self.width * self.mlp_ratio)


def end_of_text_index(tokens: jax.Array, pad_id: int) -> jax.Array:
    """[B, L] int -> [B] index of the last non-pad token (0 for an all-pad row)."""
    nonpad = tokens != pad_id
    last = tokens.shape[1] - 1 - jnp.argmax(nonpad[:, ::-1], axis=-1)
    return jnp.where(jnp.any(nonpad, axis=-1), last, 0)


class TextTransformer(nn.Module):
    config: TextConfig
    embed_dim: int
    dtype: layers.Dtype = jnp.float32
    remat: str = "none"
    scan: bool = False

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        """Token ids [B, L] (L <= context_length) -> unnormalised features [B, embed_dim]."""
        cfg = self.config
        x = nn.Embed(
            cfg.vocab_size,
            cfg.width,
            dtype=self.dtype,
            embedding_init=layers.normal(0.02, ("vocab", "embed")),
            name="token_embedding",
        )(tokens)
        pos_embedding = self.param(
            "pos_embedding",
            layers.normal(0.01, ("length", "embed")),
            (cfg.context_length, cfg.width),
        )
        x = x + pos_embedding[: tokens.shape[1]].astype(x.dtype)
        x = nn.with_logical_constraint(x, ("batch", "length", "act_embed"))
        if cfg.pooling == "last":  # SigLIP: texts are padded to full length; the last position sees all
            pooled = jnp.full(tokens.shape[:1], tokens.shape[1] - 1)
        else:
            pooled = end_of_text_index(tokens, cfg.pad_id)
        x = layers.Transformer(
            cfg.layers,
            cfg.heads,
            cfg.mlp_ratio,
            cfg.activation,
            causal=cfg.causal,
            dtype=self.dtype,
            remat=self.remat,
            scan=self.scan,
            mlp_dim=cfg.mlp_dim,
            norm_eps=cfg.norm_eps,
            name="transformer",
        )(x, pooled)  # [B, 1, D]: the pooled row alone
        x = layers.layer_norm("ln_final", self.dtype, cfg.norm_eps)(x[:, 0])
        proj = self.param(
            "proj", layers.normal(cfg.width**-0.5, ("embed", "joint")), (cfg.width, self.embed_dim)
        )
        x = jnp.dot(x.astype(jnp.float32), proj)
        if cfg.proj_bias:
            x = x + self.param("proj_bias", layers.zeros(("joint",)), (self.embed_dim,))
        return x
