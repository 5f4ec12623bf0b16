"""Transformer building blocks shared by the image and text towers.

Every parameter carries logical axis names (``nn.with_logical_partitioning``);
`clip_jax.sharding.RULES` maps them onto the mesh. The layout follows OpenAI's
CLIP (pre-LN residual blocks, 4x MLP, QuickGELU or GELU) with separate q/k/v
projections, which hold exactly the parameters of OpenAI's fused ``in_proj``.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from clip_jax.models import cpu_backward, matmul

Dtype = Any

# OpenAI's LayerNorm is PyTorch's (eps 1e-5); keep it for weight compatibility.
LAYER_NORM_EPS = 1e-5


def _quick_gelu(x: jax.Array) -> jax.Array:
    return x * jax.nn.sigmoid(1.702 * x)


def _quick_gelu_cpu_backward(x: jax.Array, dy: jax.Array) -> tuple[jax.Array]:
    # The sigmoid recomputed from x, written through tanh so that XLA's CSE does not merge it
    # with the forward's: merged, the forward writes the sigmoid out for the backward to read,
    # two more passes over [B, L, 4D] (ViT-B/32 step on CPU ~1.5% faster without them).
    s = 0.5 + 0.5 * jnp.tanh(0.851 * x)
    return (dy * s * (1 + 1.702 * x * (1 - s)),)


# OpenAI's approximation ``x * sigmoid(1.702 x)``, used by their checkpoints.
quick_gelu = cpu_backward.with_cpu_backward(_quick_gelu, _quick_gelu_cpu_backward)


ACTIVATIONS = {
    "quick_gelu": quick_gelu,
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    # tanh-approximated GELU: SigLIP's (big_vision's nn.gelu, HF's "gelu_pytorch_tanh").
    "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True),
}


def normal(stddev: float, names: tuple[str | None, ...]):
    """A normal initialiser tagged with logical axis names."""
    return nn.with_logical_partitioning(nn.initializers.normal(stddev), names)


def zeros(names: tuple[str | None, ...]):
    return nn.with_logical_partitioning(nn.initializers.zeros_init(), names)


def layer_norm(name: str, dtype: Dtype, eps: float = LAYER_NORM_EPS) -> LayerNorm:
    """LayerNorm whose statistics are computed in float32 whatever ``dtype`` is (SigLIP: eps 1e-6)."""
    return LayerNorm(epsilon=eps, dtype=dtype, name=name)


class LayerNorm(nn.Module):
    """flax's ``nn.LayerNorm`` over the last axis: the same parameters, init and forward (op
    for op), with `cpu_backward`'s gradients on CPU (`_layer_norm_cpu_backward`)."""

    epsilon: float
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        width = x.shape[-1]
        ones = nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",))
        scale = self.param("scale", ones, (width,))
        bias = self.param("bias", zeros(("norm",)), (width,))
        return _layer_norm(self.epsilon, jnp.dtype(self.dtype))(x, scale, bias)


@functools.cache
def _layer_norm(eps: float, dtype: jnp.dtype):
    return cpu_backward.with_cpu_backward(
        functools.partial(_layer_norm_forward, eps=eps, dtype=dtype),
        functools.partial(_layer_norm_cpu_backward, eps=eps),
    )


def _statistics(x: jax.Array, eps: float) -> tuple[jax.Array, jax.Array]:
    """flax's fast variance, in x's dtype (float32 or wider): the mean and
    ``rsqrt(E[x^2] - E[x]^2 + eps)`` per row."""
    mean = x.mean(-1, keepdims=True)
    var = jnp.maximum(0.0, lax.square(x).mean(-1, keepdims=True) - lax.square(mean))
    return mean, lax.rsqrt(var + eps)


def _layer_norm_forward(x, scale, bias, eps, dtype):
    mean, rstd = _statistics(x.astype(jnp.promote_types(dtype, jnp.float32)), eps)
    return jnp.asarray((x - mean) * (rstd * scale) + bias, dtype)


def _layer_norm_cpu_backward(x, scale, bias, dy, eps):
    # The two row sums that carry the scale are matrix-vector products with it. Written as
    # reductions of ``dy * scale`` (autodiff's), XLA:CPU materialises the scale broadcast to
    # [B, L, D] for each norm and keeps it from the forward to the backward (ViT-B/32 on CPU:
    # 81 such arrays, the step ~1.5% slower).
    x32, dy32 = x.astype(jnp.float32), dy.astype(jnp.float32)
    mean, rstd = _statistics(x32, eps)
    xhat = (x32 - mean) * rstd
    dy_xhat = dy32 * xhat
    row_dy, row_dy_xhat = (a @ scale for a in (dy32, dy_xhat))
    dx = rstd * (dy32 * scale - (row_dy[..., None] + xhat * row_dy_xhat[..., None]) / x.shape[-1])
    rows = tuple(range(x.ndim - 1))
    return dx.astype(x.dtype), dy_xhat.sum(rows).astype(scale.dtype), dy32.sum(rows).astype(bias.dtype)


class Projection(nn.Module):
    """A kernel of named axes and a bias: x [..., *in] -> [..., *out] over any dims.

    ``kernel_shape`` [*in, *out] and ``names`` describe the kernel, whose trailing
    ``num_out`` dims form the output and the bias (the einsums "bld,dhk->blhk",
    "blhk,hkd->bld", or a Dense's "...d,dm->...m"); `matmul.contract` computes it.
    (flax's DenseGeneral initialises a flattened kernel, which breaks logical sharding.)
    """

    kernel_shape: tuple[int, ...]
    names: tuple[str, ...]
    num_out: int
    stddev: float
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", normal(self.stddev, self.names), self.kernel_shape)
        out_shape, out_names = self.kernel_shape[-self.num_out :], self.names[-self.num_out :]
        bias = self.param("bias", zeros(out_names), out_shape)
        num_in = len(self.kernel_shape) - self.num_out
        y = matmul.contract(x.astype(self.dtype), kernel.astype(self.dtype), num_in)
        return y + bias.astype(self.dtype)


def attend(
    q: jax.Array, k: jax.Array, v: jax.Array, causal: bool = False, query_positions: jax.Array | None = None
) -> jax.Array:
    """``softmax(q k^T / sqrt(Dh)) v`` per head: q [B, T, H, Dh], k and v [B, S, H, Dh] -> [B, T, H, Dh].

    The math of ``jax.nn.dot_product_attention``'s XLA path (which its default picks on every
    backend): logits in float32 scaled after the dot, masked positions at a large negative,
    softmax in float32. Written with the heads leading the batched dots, which XLA:CPU runs
    ~2x faster forward + backward than that function's vmapped form (ViT-B/32 batch 32:
    465 -> 229 ms of a 4.4 s step; `clip_jax.benchmark`). tests/test_attention.py: equal to it.
    ``query_positions`` [B or 1, T]: each query's position among the keys, for the causal
    mask (default ``0 .. T-1``, self-attention).
    """
    q, k, v = (x.transpose(0, 2, 1, 3) for x in (q, k, v))  # [B, H, L, Dh]
    logits_dtype = jnp.promote_types(q.dtype, jnp.float32)
    logits = jnp.einsum("bhtd,bhsd->bhts", q, k, preferred_element_type=logits_dtype)
    logits = logits * jnp.asarray(q.shape[-1] ** -0.5, logits_dtype)
    if causal:  # query t sees the keys at positions <= its own
        if query_positions is None:
            query_positions = jnp.arange(q.shape[2])[None]
        mask = jnp.arange(k.shape[2]) <= query_positions[..., None]  # [B or 1, T, S]
        logits = jnp.where(mask[:, None], logits, -0.7 * jnp.finfo(logits_dtype).max)
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
    return jnp.einsum("bhts,bhsd->bhtd", probs, v).transpose(0, 2, 1, 3)


class Attention(nn.Module):
    """Multi-head attention (`attend`): self-attention, or queries from ``x`` attending
    over ``context`` (the MAP head's probe)."""

    num_heads: int
    out_stddev: float
    causal: bool
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self, x: jax.Array, context: jax.Array | None = None, query_positions: jax.Array | None = None
    ) -> jax.Array:
        """[B, L, D] (and context [B, S, D]) -> [B, L, D]; ``query_positions`` as in `attend`."""
        width = x.shape[-1]
        shape = (width, self.num_heads, width // self.num_heads)
        names = ("embed", "heads", "kv")
        context = x if context is None else context
        q, k, v = (
            Projection(shape, names, 2, width**-0.5, self.dtype, name=name)(source)
            for name, source in (("query", x), ("key", context), ("value", context))
        )  # [B, L or S, H, Dh]
        out = attend(q, k, v, self.causal, query_positions)
        return Projection(
            shape[1:] + shape[:1], names[1:] + names[:1], 1, self.out_stddev, self.dtype, name="out"
        )(out)


class Mlp(nn.Module):
    hidden: int
    activation: str
    out_stddev: float
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """[B, L, D] -> [B, L, D]."""
        width = x.shape[-1]
        # The parameters (and their init) of flax's nn.Dense, through `matmul.contract`.
        fc = Projection((width, self.hidden), ("embed", "mlp"), 1, (2 * width) ** -0.5, self.dtype, name="fc")
        h = nn.with_logical_constraint(ACTIVATIONS[self.activation](fc(x)), ("batch", "length", "mlp"))
        proj = Projection((self.hidden, width), ("mlp", "embed"), 1, self.out_stddev, self.dtype, name="proj")
        return proj(h)


def take_rows(x: jax.Array, rows: jax.Array) -> jax.Array:
    """[B, L, D] and one position per example [B] -> [B, 1, D], exactly.

    A one-hot contraction, a dot batched over B: sharded along B like the activations,
    it partitions with no communication, where a gather of the same rows made XLA's
    partitioner all-gather x over the batch (AOT v5p-256 B/16: 22.6 GiB per device
    instead of 4.6). HIGHEST precision keeps float32 rows exact on TPUs.
    """
    one_hot = jax.nn.one_hot(rows, x.shape[1], dtype=x.dtype)
    out = jnp.einsum("bl,bld->bd", one_hot, x, precision=lax.Precision.HIGHEST)
    return out[:, None]


class ResidualBlock(nn.Module):
    """Pre-LN block: ``x + attn(ln_1(x))`` then ``x + mlp(ln_2(x))``.

    With ``rows`` (one position per example, [B]) it computes only those rows of its
    output, [B, 1, D]: the keys and values still come from every row, the queries,
    residual and MLP from those rows alone. A tower's last block needs no more than the
    row it pools, so it skips ~5/6 of that block's matmuls and their backward.
    """

    num_heads: int
    mlp_ratio: float
    activation: str
    num_layers: int
    causal: bool
    dtype: Dtype = jnp.float32
    mlp_dim: int | None = None  # the MLP's hidden size; None: width * mlp_ratio
    norm_eps: float = LAYER_NORM_EPS

    @nn.compact
    def __call__(self, x: jax.Array, rows: jax.Array | None = None) -> jax.Array:
        width = x.shape[-1]
        # OpenAI's init: residual projections shrink with depth.
        out_stddev = width**-0.5 * (2 * self.num_layers) ** -0.5
        h = layer_norm("ln_1", self.dtype, self.norm_eps)(x)
        attn = Attention(self.num_heads, out_stddev, self.causal, self.dtype, name="attn")
        # The queries and the residual at the rows computed; the keys and values at every row.
        query, positions = (h, None) if rows is None else (take_rows(h, rows), rows[:, None])
        x = x if rows is None else take_rows(x, rows)
        x = x + attn(query, h, positions)
        h = layer_norm("ln_2", self.dtype, self.norm_eps)(x)
        hidden = self.mlp_dim or int(width * self.mlp_ratio)
        mlp = Mlp(hidden, self.activation, out_stddev, self.dtype, name="mlp")
        x = x + mlp(h)
        return nn.with_logical_constraint(x, ("batch", "length", "act_embed"))


class _ScanBlock(ResidualBlock):
    """A block with ``nn.scan``'s signature ``(carry, x) -> (carry, y)``."""

    @nn.compact
    def __call__(self, x: jax.Array, _=None):
        return super().__call__(x), None


# What a rematerialised block keeps for the backward pass (``config.model.remat``).
REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,  # recompute the whole block
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep the matmul outputs
}


class Transformer(nn.Module):
    """A stack of ``num_layers`` residual blocks.

    Parameters are ``block_0 ... block_{L-1}``, or with ``scan`` ONE ``blocks``
    subtree whose arrays have a leading layer axis (logical name "layers"): the
    step then compiles one block instead of L (compile time ~L x shorter).
    ``remat`` ("none", "full", "dots") trades recomputation for activation memory.
    ``pool_rows`` [B]: the tower pools one row per example; the stack then returns only
    that row, [B, 1, D], and its last block computes no other (`ResidualBlock`; with
    ``scan`` the blocks share one body, so the whole output is computed and the row taken).
    """

    num_layers: int
    num_heads: int
    mlp_ratio: float
    activation: str
    causal: bool
    dtype: Dtype = jnp.float32
    remat: str = "none"
    scan: bool = False
    mlp_dim: int | None = None
    norm_eps: float = LAYER_NORM_EPS

    @nn.compact
    def __call__(self, x: jax.Array, pool_rows: jax.Array | None = None) -> jax.Array:
        fields = (self.num_heads, self.mlp_ratio, self.activation, self.num_layers, self.causal, self.dtype)
        fields += (self.mlp_dim, self.norm_eps)
        block = _ScanBlock if self.scan else ResidualBlock
        if self.remat != "none":
            block = nn.remat(block, policy=REMAT_POLICIES[self.remat], prevent_cse=not self.scan)
        if self.scan:
            stack = nn.scan(
                block,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                length=self.num_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            x = stack(*fields, name="blocks")(x, None)[0]
            return x if pool_rows is None else take_rows(x, pool_rows)
        if pool_rows is not None and not self.num_layers:
            return take_rows(x, pool_rows)
        for i in range(self.num_layers):
            rows = pool_rows if i == self.num_layers - 1 else None
            x = block(*fields, name=f"block_{i}")(x, rows)
        return x


def unstack_layers(params: Any) -> Any:
    """A scanned tower's params (``blocks`` with a leading layer axis) -> ``block_0 ... block_{L-1}``."""
    if not isinstance(params, dict):
        return params
    out = {}
    for name, value in params.items():
        if name == "blocks":
            count = jax.tree.leaves(value)[0].shape[0]
            out.update({f"block_{i}": jax.tree.map(lambda x, i=i: x[i], value) for i in range(count)})
        else:
            out[name] = unstack_layers(value)
    return out
