"""Ring versions of the contrastive losses: memory per device O(b^2 + b * E), not O(b * B).

Inside ``shard_map`` over the batch axes each of the n devices holds b = B / n
rows. It keeps its images; the text chunks travel round the ring with
``ppermute``. At every hop a device computes one [b, b] block of logits,
its images' rows against the visiting chunk's texts:

- forward: the rows' log-sum-exp (image->text) is accumulated online on the
  device; the columns' (text->image) travels WITH the chunk and comes home
  complete after n hops, so every logit is computed once;
- backward (a custom VJP; autodiff would keep every block): a second ring
  recomputes the blocks, the image gradient accumulates on the device and the
  text gradient travels with its chunk, home after n hops.

Top-1 accuracies come from running maxima the same way: a row's positive is a
hit when it is the row's maximum (ties count as hits; random embeddings have none).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from clip_jax.sharding import BATCH_AXES


def _ring_size(mesh: Mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]


def _ring(body, stay, travel, n: int):
    """n hops of ``(stay, travel) = body(stay, travel)``, ``travel`` moving one device on after each.

    After n hops every travelling chunk is back on the device it started from.
    """
    perm = [(i, (i + 1) % n) for i in range(n)]

    def hop(carry, _):
        stay, travel = body(*carry)
        return (stay, jax.tree.map(lambda x: jax.lax.ppermute(x, BATCH_AXES, perm), travel)), None

    (stay, travel), _ = jax.lax.scan(hop, (stay, travel), None, length=n)
    return stay, travel


def _own_block(image, text, scale, bias=0.0):
    """The positives [b]: the diagonal of this device's own block of logits [b, b].

    Computed as the ring computes every block (not as a row-wise dot product), so a
    positive that is its row's maximum compares equal to that maximum.
    """
    logits = scale * jnp.dot(image, text.T) + bias
    return jnp.diagonal(logits)


def _online_max_sum(m, s, logits, axis):
    """One block into a running (max [k], sum of exp(x - max) [k]) along ``axis`` of logits [b, b]."""
    new_m = jnp.maximum(m, jnp.max(logits, axis=axis))
    shift = jnp.expand_dims(new_m, axis)
    return new_m, s * jnp.exp(m - new_m) + jnp.sum(jnp.exp(logits - shift), axis=axis)


def _total(x, global_batch):
    return jax.lax.psum(jnp.sum(x), BATCH_AXES) / global_batch


def _softmax_forward(image, text, scale, n):
    """Local rows image, text [b, E] -> (loss, stats, residuals)."""
    neg_inf = jnp.full_like(image[:, 0], -jnp.inf)  # [b], varying like the rows
    zero = jnp.zeros_like(image[:, 0])

    def body(row, col):
        (row_m, row_s), (chunk, col_m, col_s) = row, col
        logits = scale * jnp.dot(image, chunk.T)  # [b rows, b visiting columns]
        row = _online_max_sum(row_m, row_s, logits, axis=1)
        return row, (chunk, *_online_max_sum(col_m, col_s, logits, axis=0))

    (row_m, row_s), (_, col_m, col_s) = _ring(body, (neg_inf, zero), (text, neg_inf, zero), n)
    positive = _own_block(image, text, scale)  # [b]
    row_lse, col_lse = row_m + jnp.log(row_s), col_m + jnp.log(col_s)
    global_batch = n * image.shape[0]
    loss = 0.5 * (_total(row_lse - positive, global_batch) + _total(col_lse - positive, global_batch))
    stats = {
        "i2t_acc": _total((positive >= row_m).astype(jnp.float32), global_batch),
        "t2i_acc": _total((positive >= col_m).astype(jnp.float32), global_batch),
    }
    return loss, stats, (image, text, scale, row_lse, col_lse)


def _softmax_backward(n, residuals, cotangents):
    image, text, scale, row_lse, col_lse = residuals
    c = cotangents[0] / (2 * n * image.shape[0])  # d loss / d (each cross-entropy term)

    def body(stay, travel):
        d_image, d_scale = stay
        chunk, chunk_col_lse, d_chunk = travel
        dots = jnp.dot(image, chunk.T)  # [b, b]
        logits = scale * dots
        # d loss / d logits: the two softmaxes (the -1 of each positive is added below).
        p = c * (jnp.exp(logits - row_lse[:, None]) + jnp.exp(logits - chunk_col_lse[None, :]))
        d_image = d_image + scale * jnp.dot(p, chunk)
        d_chunk = d_chunk + scale * jnp.dot(p.T, image)
        return (d_image, d_scale + jnp.sum(p * dots)), (chunk, chunk_col_lse, d_chunk)

    zero = jnp.zeros_like(image[0, 0])
    init = ((jnp.zeros_like(image), zero), (text, col_lse, jnp.zeros_like(text)))
    (d_image, d_scale), (_, _, d_text) = _ring(body, *init, n)
    # The positives: -1 in both cross-entropies -> -2c on the diagonal of the logits.
    d_image = d_image - 2 * c * scale * text
    d_text = d_text - 2 * c * scale * image
    d_scale = d_scale - 2 * c * jnp.sum(image * text)
    return d_image, d_text, jax.lax.psum(d_scale, BATCH_AXES)


def _sigmoid_forward(image, text, scale, bias, n):
    """SigLIP over the ring: every pair a negative, then the diagonal corrected to positives."""
    neg_inf = jnp.full_like(image[:, 0], -jnp.inf)

    def body(row, col):
        row_m, row_loss = row
        chunk, col_m = col
        logits = scale * jnp.dot(image, chunk.T) + bias  # [b, b]
        row_loss = row_loss - jnp.sum(jax.nn.log_sigmoid(-logits), axis=1)
        return (jnp.maximum(row_m, jnp.max(logits, axis=1)), row_loss), (
            chunk,
            jnp.maximum(col_m, jnp.max(logits, axis=0)),
        )

    (row_m, row_loss), (_, col_m) = _ring(body, (neg_inf, jnp.zeros_like(neg_inf)), (text, neg_inf), n)
    positive = _own_block(image, text, scale, bias)  # [b]
    row_loss = row_loss + jax.nn.log_sigmoid(-positive) - jax.nn.log_sigmoid(positive)
    global_batch = n * image.shape[0]
    stats = {
        "i2t_acc": _total((positive >= row_m).astype(jnp.float32), global_batch),
        "t2i_acc": _total((positive >= col_m).astype(jnp.float32), global_batch),
    }
    return _total(row_loss, global_batch), stats, (image, text, scale, bias)


def _sigmoid_backward(n, residuals, cotangents):
    image, text, scale, bias = residuals
    c = cotangents[0] / (n * image.shape[0])

    def body(stay, travel):
        d_image, d_scale, d_bias = stay
        chunk, d_chunk = travel
        dots = jnp.dot(image, chunk.T)
        p = c * jax.nn.sigmoid(scale * dots + bias)  # d loss / d logits, all pairs as negatives
        d_image = d_image + scale * jnp.dot(p, chunk)
        d_chunk = d_chunk + scale * jnp.dot(p.T, image)
        return (d_image, d_scale + jnp.sum(p * dots), d_bias + jnp.sum(p)), (chunk, d_chunk)

    zero = jnp.zeros_like(image[0, 0])
    init = ((jnp.zeros_like(image), zero, zero), (text, jnp.zeros_like(text)))
    (d_image, d_scale, d_bias), (_, d_text) = _ring(body, *init, n)
    # A positive's derivative is -sigmoid(-l), not sigmoid(l): the difference is exactly -c.
    d_image = d_image - c * scale * text
    d_text = d_text - c * scale * image
    d_scale = d_scale - c * jnp.sum(image * text)
    d_bias = d_bias - c * image.shape[0]
    return d_image, d_text, jax.lax.psum(d_scale, BATCH_AXES), jax.lax.psum(d_bias, BATCH_AXES)


def _with_custom_vjp(forward, backward, n):
    """A loss function of the local rows whose gradient is ``backward`` (a second ring)."""

    @jax.custom_vjp
    def loss_fn(*args):
        loss, stats, _ = forward(*args, n)
        return loss, stats

    def fwd(*args):
        loss, stats, residuals = forward(*args, n)
        return (loss, stats), residuals

    loss_fn.defvjp(fwd, lambda residuals, cotangents: backward(n, residuals, cotangents))
    return loss_fn


def make_ring_softmax(mesh: Mesh):
    """`losses.softmax_contrastive` over the global batch, computed round a ring of devices."""
    n = _ring_size(mesh)
    local = _with_custom_vjp(_softmax_forward, _softmax_backward, n)
    batch = P(BATCH_AXES)
    mapped = jax.shard_map(local, mesh=mesh, in_specs=(batch, batch, P()), out_specs=(P(), P()))
    return lambda image_emb, text_emb, scale, bias=None: mapped(image_emb, text_emb, scale)


def make_ring_sigmoid(mesh: Mesh):
    """`losses.sigmoid_contrastive` over the global batch, computed round a ring of devices."""
    n = _ring_size(mesh)
    local = _with_custom_vjp(_sigmoid_forward, _sigmoid_backward, n)
    batch = P(BATCH_AXES)
    return jax.shard_map(local, mesh=mesh, in_specs=(batch, batch, P(), P()), out_specs=(P(), P()))
