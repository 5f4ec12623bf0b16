"""Ring versions of the contrastive losses: memory per device O(t * b + b * E), not O(b * B).

Inside ``shard_map`` over the batch axes each of the n devices holds b = B / n
rows. It keeps its images; the text chunks travel round the ring with
``ppermute``. At every hop a device computes the [b, b] block of logits of its
images against the visiting chunk's texts, t rows at a time (``tile_rows``),
so at most a [t, b] tile of logits exists at once:

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
    """n hops of ``(stay, travel) = body(hop, stay, travel)``, ``travel`` moving one device on after each.

    After n hops every travelling chunk is back on the device it started from.
    """
    perm = [(i, (i + 1) % n) for i in range(n)]

    def hop(carry, k):
        stay, travel = body(k, *carry)
        return (stay, jax.tree.map(lambda x: jax.lax.ppermute(x, BATCH_AXES, perm), travel)), None

    (stay, travel), _ = jax.lax.scan(hop, (stay, travel), jnp.arange(n))
    return stay, travel


def _tile_rows(rows: int, most: int) -> int:
    """The largest divisor of ``rows`` that is at most ``most``."""
    return max(d for d in range(1, min(rows, most) + 1) if rows % d == 0)


def _tiles(x, rows):
    """[b, ...] -> [b / rows, rows, ...]."""
    return x.reshape(x.shape[0] // rows, rows, *x.shape[1:])


def _untile(x):
    return x.reshape(-1, *x.shape[2:])


def _own_logit(logits, first_row, hop, previous):
    """The positives [t] of a tile's rows: at hop 0 (own texts), logit (i, first_row + i).

    Taken from the very logits the maxima see, so a positive that is its row's
    maximum compares equal to it.
    """
    columns = first_row + jnp.arange(logits.shape[0])
    own = jnp.take_along_axis(logits, columns[:, None], axis=1)[:, 0]
    return jnp.where(hop == 0, own, previous)


def _online_max_sum(m, s, logits, axis):
    """A tile into a running (max [k], sum of exp(x - max) [k]) along ``axis`` of logits."""
    new_m = jnp.maximum(m, jnp.max(logits, axis=axis))
    shift = jnp.expand_dims(new_m, axis)
    return new_m, s * jnp.exp(m - new_m) + jnp.sum(jnp.exp(logits - shift), axis=axis)


def _total(x, global_batch):
    return jax.lax.psum(jnp.sum(x), BATCH_AXES) / global_batch


def _accuracies(positive, row_max, col_max, global_batch):
    return {
        "i2t_acc": _total((positive >= row_max).astype(jnp.float32), global_batch),
        "t2i_acc": _total((positive >= col_max).astype(jnp.float32), global_batch),
    }


def _softmax_forward(image, text, scale, n, rows):
    """Local rows image, text [b, E] -> (loss, stats, residuals)."""
    neg_inf = jnp.full_like(image[:, 0], -jnp.inf)  # [b], varying like the rows
    zero = jnp.zeros_like(image[:, 0])
    first_rows = jnp.arange(0, image.shape[0], rows)

    def body(k, row, col):
        chunk, col_m, col_s = col

        def tile(col_acc, xs):
            image_t, m, s, positive, first = xs
            logits = scale * jnp.dot(image_t, chunk.T)  # [t rows, b visiting columns]
            positive = _own_logit(logits, first, k, positive)
            return _online_max_sum(*col_acc, logits, 0), (*_online_max_sum(m, s, logits, 1), positive)

        xs = (*(_tiles(x, rows) for x in (image, *row)), first_rows)
        (col_m, col_s), row = jax.lax.scan(tile, (col_m, col_s), xs)
        return tuple(_untile(x) for x in row), (chunk, col_m, col_s)

    row, col = _ring(body, (neg_inf, zero, zero), (text, neg_inf, zero), n)
    (row_m, row_s, positive), (_, col_m, col_s) = row, col
    row_lse, col_lse = row_m + jnp.log(row_s), col_m + jnp.log(col_s)
    global_batch = n * image.shape[0]
    loss = 0.5 * (_total(row_lse - positive, global_batch) + _total(col_lse - positive, global_batch))
    stats = _accuracies(positive, row_m, col_m, global_batch)
    return loss, stats, (image, text, scale, row_lse, col_lse)


def _softmax_backward(n, rows, residuals, cotangents):
    image, text, scale, row_lse, col_lse = residuals
    c = cotangents[0] / (2 * n * image.shape[0])  # d loss / d (each cross-entropy term)

    def body(k, stay, travel):
        d_image, d_scale = stay
        chunk, chunk_col_lse, d_chunk = travel

        def tile(acc, xs):
            d_chunk, d_scale = acc
            image_t, row_lse_t, d_image_t = xs
            dots = jnp.dot(image_t, chunk.T)  # [t, b]
            logits = scale * dots
            # d loss / d logits: the two softmaxes (the -1 of each positive is added below).
            p = c * (jnp.exp(logits - row_lse_t[:, None]) + jnp.exp(logits - chunk_col_lse[None, :]))
            acc = (d_chunk + scale * jnp.dot(p.T, image_t), d_scale + jnp.sum(p * dots))
            return acc, d_image_t + scale * jnp.dot(p, chunk)

        xs = tuple(_tiles(x, rows) for x in (image, row_lse, d_image))
        (d_chunk, d_scale), d_image = jax.lax.scan(tile, (d_chunk, d_scale), xs)
        return (_untile(d_image), d_scale), (chunk, chunk_col_lse, d_chunk)

    zero = jnp.zeros_like(image[0, 0])
    init = ((jnp.zeros_like(image), zero), (text, col_lse, jnp.zeros_like(text)))
    (d_image, d_scale), (_, _, d_text) = _ring(body, *init, n)
    # The positives: -1 in both cross-entropies -> -2c on the diagonal of the logits.
    d_image = d_image - 2 * c * scale * text
    d_text = d_text - 2 * c * scale * image
    d_scale = d_scale - 2 * c * jnp.sum(image * text)
    return d_image, d_text, jax.lax.psum(d_scale, BATCH_AXES)


def _sigmoid_forward(image, text, scale, bias, n, rows):
    """SigLIP over the ring: every pair a negative, then the diagonal corrected to positives."""
    neg_inf = jnp.full_like(image[:, 0], -jnp.inf)
    zero = jnp.zeros_like(neg_inf)
    first_rows = jnp.arange(0, image.shape[0], rows)

    def body(k, row, col):
        chunk, col_m = col

        def tile(col_m, xs):
            image_t, m, loss, positive, first = xs
            logits = scale * jnp.dot(image_t, chunk.T) + bias  # [t, b]
            positive = _own_logit(logits, first, k, positive)
            loss = loss - jnp.sum(jax.nn.log_sigmoid(-logits), axis=1)
            m = jnp.maximum(m, jnp.max(logits, axis=1))
            return jnp.maximum(col_m, jnp.max(logits, axis=0)), (m, loss, positive)

        xs = (*(_tiles(x, rows) for x in (image, *row)), first_rows)
        col_m, row = jax.lax.scan(tile, col_m, xs)
        return tuple(_untile(x) for x in row), (chunk, col_m)

    (row_m, row_loss, positive), (_, col_m) = _ring(body, (neg_inf, zero, zero), (text, neg_inf), n)
    row_loss = row_loss + jax.nn.log_sigmoid(-positive) - jax.nn.log_sigmoid(positive)
    global_batch = n * image.shape[0]
    stats = _accuracies(positive, row_m, col_m, global_batch)
    return _total(row_loss, global_batch), stats, (image, text, scale, bias)


def _sigmoid_backward(n, rows, residuals, cotangents):
    image, text, scale, bias = residuals
    c = cotangents[0] / (n * image.shape[0])

    def body(k, stay, travel):
        d_image, d_scale, d_bias = stay
        chunk, d_chunk = travel

        def tile(acc, xs):
            d_chunk, d_scale, d_bias = acc
            image_t, d_image_t = xs
            dots = jnp.dot(image_t, chunk.T)  # [t, b]
            p = c * jax.nn.sigmoid(scale * dots + bias)  # d loss / d logits, all pairs as negatives
            acc = (d_chunk + scale * jnp.dot(p.T, image_t), d_scale + jnp.sum(p * dots), d_bias + jnp.sum(p))
            return acc, d_image_t + scale * jnp.dot(p, chunk)

        xs = (_tiles(image, rows), _tiles(d_image, rows))
        (d_chunk, d_scale, d_bias), d_image = jax.lax.scan(tile, (d_chunk, d_scale, d_bias), xs)
        return (_untile(d_image), d_scale, d_bias), (chunk, d_chunk)

    zero = jnp.zeros_like(image[0, 0])
    init = ((jnp.zeros_like(image), zero, zero), (text, jnp.zeros_like(text)))
    (d_image, d_scale, d_bias), (_, d_text) = _ring(body, *init, n)
    # A positive's derivative is -sigmoid(-l), not sigmoid(l): the difference is exactly -c.
    d_image = d_image - c * scale * text
    d_text = d_text - c * scale * image
    d_scale = d_scale - c * jnp.sum(image * text)
    d_bias = d_bias - c * image.shape[0]
    return d_image, d_text, jax.lax.psum(d_scale, BATCH_AXES), jax.lax.psum(d_bias, BATCH_AXES)


def _with_custom_vjp(forward, backward, n, tile_rows):
    """A loss function of the local rows whose gradient is ``backward`` (a second ring)."""

    @jax.custom_vjp
    def loss_fn(image, *args):
        loss, stats, _ = forward(image, *args, n, _tile_rows(image.shape[0], tile_rows))
        return loss, stats

    def fwd(image, *args):
        loss, stats, residuals = forward(image, *args, n, _tile_rows(image.shape[0], tile_rows))
        return (loss, stats), residuals

    def bwd(residuals, cotangents):
        return backward(n, _tile_rows(residuals[0].shape[0], tile_rows), residuals, cotangents)

    loss_fn.defvjp(fwd, bwd)
    return loss_fn


# Rows per tile: a [512, b] f32 tile is 2 MiB per 1,024 local rows.
TILE_ROWS = 512


def make_ring_softmax(mesh: Mesh, tile_rows: int = TILE_ROWS):
    """`losses.softmax_contrastive` over the global batch, computed round a ring of devices."""
    local = _with_custom_vjp(_softmax_forward, _softmax_backward, _ring_size(mesh), tile_rows)
    batch = P(BATCH_AXES)
    mapped = jax.shard_map(local, mesh=mesh, in_specs=(batch, batch, P()), out_specs=(P(), P()))
    return lambda image_emb, text_emb, scale, bias=None: mapped(image_emb, text_emb, scale)


def make_ring_sigmoid(mesh: Mesh, tile_rows: int = TILE_ROWS):
    """`losses.sigmoid_contrastive` over the global batch, computed round a ring of devices."""
    local = _with_custom_vjp(_sigmoid_forward, _sigmoid_backward, _ring_size(mesh), tile_rows)
    batch = P(BATCH_AXES)
    return jax.shard_map(local, mesh=mesh, in_specs=(batch, batch, P(), P()), out_specs=(P(), P()))
