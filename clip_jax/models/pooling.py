"""Multi-head attention pooling (MAP): SigLIP's image-tower head (big_vision's ``MAPHead``).

A learned probe token attends over every patch token; then a pre-LN MLP with a
residual. No class token is needed. Parameters: ``probe`` [D], ``attn``
(query/key/value/out as `layers.Attention`), ``ln``, ``mlp`` (fc, proj).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from clip_jax.models import layers


class MAPHead(nn.Module):
    num_heads: int
    mlp_dim: int
    activation: str
    norm_eps: float = layers.LAYER_NORM_EPS
    dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Tokens [B, N, D] -> pooled [B, D]."""
        width = x.shape[-1]
        probe = self.param("probe", layers.normal(width**-0.5, ("embed",)), (width,))
        probe = jnp.broadcast_to(probe.astype(x.dtype), (x.shape[0], 1, width))
        stddev = width**-0.5
        x = layers.Attention(self.num_heads, stddev, causal=False, dtype=self.dtype, name="attn")(probe, x)
        h = layers.layer_norm("ln", self.dtype, self.norm_eps)(x)
        x = x + layers.Mlp(self.mlp_dim, self.activation, stddev, self.dtype, name="mlp")(h)
        return x[:, 0]
